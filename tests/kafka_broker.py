"""A real single-node Kafka broker (KRaft mode, no ZooKeeper) for the stream's Kafka test.

Its jars are Apache Kafka's own from Maven Central, resolved by Spark's Ivy resolver (the one
that fetches Delta's jars: the same caches, nothing else to install); the broker runs as a
plain ``java`` process on a free port, and messages are sent with Kafka's own producer
(``java`` runs a single source file against the broker's jars: no Python Kafka client).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

KAFKA = "org.apache.kafka:kafka_2.13:3.9.2"  # the client line Spark 4.2's Kafka source is built on

PRODUCER = textwrap.dedent(
    """
    import java.io.*;
    import java.nio.charset.StandardCharsets;
    import java.util.Properties;
    import org.apache.kafka.clients.producer.*;

    public class Produce {
        public static void main(String[] a) throws Exception {
            Properties p = new Properties();
            p.put("bootstrap.servers", a[0]);
            p.put("key.serializer", "org.apache.kafka.common.serialization.StringSerializer");
            p.put("value.serializer", "org.apache.kafka.common.serialization.StringSerializer");
            p.put("acks", "all");
            long n = 0;
            try (KafkaProducer<String, String> prod = new KafkaProducer<>(p);
                 BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
                for (String line; (line = in.readLine()) != null; n++) {
                    int tab = line.indexOf('\\t');  // key TAB value; the key spreads users over partitions
                    prod.send(new ProducerRecord<>(a[1], line.substring(0, tab), line.substring(tab + 1)));
                }
                prod.flush();
            }
            System.out.println("sent " + n);
        }
    }
    """
)


def kafka_jars(python: str = sys.executable, timeout: float = 600) -> list[str]:
    """The broker's jars (Kafka and its dependencies) as local paths, resolved through Spark."""
    code = (
        "from pyspark.sql import SparkSession\n"
        f"s = SparkSession.builder.master('local[1]').config('spark.jars.packages', '{KAFKA}')"
        ".config('spark.ui.enabled', 'false').getOrCreate()\n"
        "print('JARS=' + s.sparkContext.getConf().get('spark.jars'))\n"
        "s.stop()\n"
    )
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0 and "download failed" in r.stderr and shutil.which("mvn"):
        # Ivy gives up on a module whose POM is in ~/.m2 without its jar (a partial earlier
        # Maven fetch); Maven completes it, then Ivy finds it there
        subprocess.run(["mvn", "-q", "dependency:get", f"-Dartifact={KAFKA}"], capture_output=True, timeout=timeout)
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    line = next((x for x in r.stdout.splitlines() if x.startswith("JARS=")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"could not resolve {KAFKA}: {r.stderr[-1500:]}")
    jars = [j.removeprefix("file://").removeprefix("file:") for j in line[5:].split(",") if j]
    # Spark's resolver leaves out what Spark itself ships (the Scala library): take pyspark's
    r = subprocess.run([python, "-c", "import pyspark, os; print(os.path.dirname(pyspark.__file__))"], capture_output=True, text=True)
    return jars + [str(p) for p in Path(r.stdout.strip(), "jars").glob("scala-library-*.jar")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """``with Broker(folder) as b:`` a broker at ``b.bootstrap`` until the block ends."""

    def __init__(self, folder: Path, jars: list[str], partitions: int = 2):
        self.folder, self.cp = folder, os.pathsep.join(jars)
        self.port, self.controller = _free_port(), _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.partitions = partitions
        self.proc: subprocess.Popen | None = None

    def _java(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["java", "-Xmx256m", "-cp", self.cp, *args], capture_output=True, text=True, **kw)

    def __enter__(self) -> Broker:
        self.folder.mkdir(parents=True, exist_ok=True)
        props = self.folder / "server.properties"
        props.write_text(
            textwrap.dedent(
                f"""
                process.roles=broker,controller
                node.id=1
                controller.quorum.voters=1@127.0.0.1:{self.controller}
                listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller}
                advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}
                controller.listener.names=CONTROLLER
                listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
                inter.broker.listener.name=PLAINTEXT
                log.dirs={self.folder / "data"}
                num.partitions={self.partitions}
                offsets.topic.replication.factor=1
                transaction.state.log.replication.factor=1
                transaction.state.log.min.isr=1
                group.initial.rebalance.delay.ms=0
                auto.create.topics.enable=true
                """
            )
        )
        log4j = self.folder / "log4j.properties"
        log4j.write_text(
            "log4j.rootLogger=WARN, stderr\nlog4j.appender.stderr=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stderr.Target=System.err\nlog4j.appender.stderr.layout=org.apache.log4j.PatternLayout\n"
        )
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        r = self._java("kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(props), timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"kafka storage format failed: {r.stdout[-800:]} {r.stderr[-800:]}")
        self.log = open(self.folder / "broker.log", "w")
        self.proc = subprocess.Popen(
            ["java", "-Xmx512m", f"-Dlog4j.configuration=file:{log4j}", "-cp", self.cp, "kafka.Kafka", str(props)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the broker exited: {(self.folder / 'broker.log').read_text()[-1500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the broker did not listen within 120 s")

    def produce(self, topic: str, messages: list[tuple[str, str]]) -> None:
        """Send ``(key, value)`` messages (values on one line each) and wait for every ack."""
        src = self.folder / "Produce.java"
        src.write_text(PRODUCER)
        body = "".join(f"{k}\t{v}\n" for k, v in messages)
        r = self._java(str(src), self.bootstrap, topic, input=body, timeout=300)
        if r.returncode != 0 or f"sent {len(messages)}" not in r.stdout:
            raise RuntimeError(f"producing failed: {r.stdout[-500:]} {r.stderr[-1500:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
