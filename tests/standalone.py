"""A Spark standalone cluster on this machine: one master and N workers as real daemons.

pip's pyspark ships ``sbin/spark-daemon.sh`` but not ``start-master.sh``/``start-worker.sh``;
this module drives ``spark-daemon.sh`` directly. Every daemon writes its pid file into the
cluster's own directory, so :func:`stop` stops exactly the daemons that :func:`start`
started (and nothing else on the machine), also after a crash of the caller.

    python tests/standalone.py start --dir build/cluster --workers 2   # prints the master URL
    ./spark-submit.sh --master spark://127.0.0.1:PORT pipeline ...
    python tests/standalone.py stop --dir build/cluster
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
IDENT = "seqclust"


class ClusterError(RuntimeError):
    """The cluster did not come up (the message names the daemon log to read)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spark_home() -> str:
    from pyspark.find_spark_home import _find_spark_home

    return _find_spark_home()


@dataclass(frozen=True)
class StandaloneCluster:
    root: Path
    host: str
    port: int
    webui_port: int
    workers: int

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.port}"

    @property
    def webui_url(self) -> str:
        return f"http://{self.host}:{self.webui_port}"

    def alive_workers(self) -> int:
        with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=5) as r:
            return int(json.load(r).get("aliveworkers", 0))

    def stop(self, timeout: float = 30) -> list[int]:
        return stop(self.root, timeout)


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SPARK_HOME=spark_home(),
        SPARK_PID_DIR=str(root / "pids"),
        SPARK_LOG_DIR=str(root / "logs"),
        SPARK_WORKER_DIR=str(root / "work"),
        SPARK_IDENT_STRING=IDENT,
        SPARK_LOCAL_IP="127.0.0.1",
    )
    env.pop("SPARK_NO_DAEMONIZE", None)  # spark-daemon.sh must fork and write its pid file
    return env


def _daemon(root: Path, cls: str, instance: int, *args: str) -> None:
    script = Path(spark_home()) / "sbin" / "spark-daemon.sh"
    if not script.is_file():
        raise ClusterError(f"{script} not found: is pyspark installed?")
    r = subprocess.run(
        ["bash", str(script), "start", cls, str(instance), *args], env=_env(root), capture_output=True, text=True, timeout=120
    )
    if r.returncode != 0:
        raise ClusterError(f"spark-daemon.sh start {cls} {instance} failed: {(r.stdout + r.stderr).strip()[-2000:]}")


def start(
    root: str | Path,
    workers: int = 2,
    cores: int = 1,
    memory: str = "2g",
    host: str = "127.0.0.1",
    timeout: float = 90,
) -> StandaloneCluster:
    """Start a master and ``workers`` workers bound to ``host`` on free ports; wait until every
    worker has registered. On failure, whatever was started is stopped again."""
    root = Path(root).resolve()
    for d in ("pids", "logs", "work"):
        (root / d).mkdir(parents=True, exist_ok=True)
    if list((root / "pids").glob("*.pid")):
        raise ClusterError(f"{root} already has pid files: stop that cluster first (python tests/standalone.py stop --dir {root})")
    port, webui = free_port(host), free_port(host)
    cluster = StandaloneCluster(root, host, port, webui, workers)
    try:
        _daemon(root, MASTER_CLASS, 1, "--host", host, "--port", str(port), "--webui-port", str(webui))
        log.info("standalone: master %s (web UI %s)", cluster.master_url, cluster.webui_url)
        for i in range(1, workers + 1):
            _daemon(
                root,
                WORKER_CLASS,
                i,
                "--host",
                host,
                "--port",
                str(free_port(host)),
                "--webui-port",
                str(free_port(host)),
                "--cores",
                str(cores),
                "--memory",
                memory,
                "--work-dir",
                str(root / "work"),
                cluster.master_url,
            )
        deadline = time.monotonic() + timeout
        alive = 0
        while time.monotonic() < deadline:
            try:
                alive = cluster.alive_workers()
            except OSError:
                alive = 0
            if alive == workers:
                log.info("standalone: %d workers alive (%d core(s), %s each)", workers, cores, memory)
                return cluster
            time.sleep(0.5)
        raise ClusterError(f"only {alive} of {workers} workers registered within {timeout:.0f}s; logs in {root / 'logs'}")
    except BaseException:
        stop(root)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(root: str | Path, timeout: float = 30) -> list[int]:
    """Stop the daemons whose pid files are under ``root/pids`` (SIGTERM, then SIGKILL after
    ``timeout``); remove the pid files. Returns the pids that were running."""
    pid_dir = Path(root).resolve() / "pids"
    stopped: list[int] = []
    files = sorted(pid_dir.glob("*.pid")) if pid_dir.is_dir() else []
    # workers first, so they do not try to reconnect to a master that is going away
    files.sort(key=lambda f: "Master" in f.name)
    for f in files:
        try:
            pid = int(f.read_text().strip())
        except ValueError:
            f.unlink()
            continue
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        f.unlink()
    deadline = time.monotonic() + timeout
    for pid in stopped:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            log.warning("standalone: pid %d ignored SIGTERM; killing it", pid)
            os.kill(pid, signal.SIGKILL)
    if stopped:
        log.info("standalone: stopped %d daemon(s)", len(stopped))
    return stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/standalone.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a master and workers; print the master URL")
    s.add_argument("--dir", default="build/cluster", help="pid files, logs and work dirs (default %(default)s)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--cores", type=int, default=1, help="cores per worker")
    s.add_argument("--memory", default="2g", help="memory per worker")
    t = sub.add_parser("stop", help="stop the daemons started with this --dir")
    t.add_argument("--dir", default="build/cluster")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if a.cmd == "start":
            print(start(a.dir, a.workers, a.cores, a.memory).master_url)
        else:
            print(f"stopped {len(stop(a.dir))} daemon(s)")
    except ClusterError as e:
        print(f"standalone: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
