"""spark-submit.sh: its contract on the command line, and one real submit of a job."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from seqclust.runtime.spark import _jar_list, _remember_jars, cached_delta_jars, delta_package

REPO = Path(__file__).resolve().parents[1]


def _run(*args, **kw):
    return subprocess.run([str(REPO / "spark-submit.sh"), *args], capture_output=True, text=True, timeout=300, **kw)


def test_help_and_unknown_job():
    r = _run("--help")
    assert r.returncode == 0 and "Usage: ./spark-submit.sh" in r.stdout and "--master URL" in r.stdout
    r = _run("nosuchjob")
    assert r.returncode == 2 and "unknown job 'nosuchjob'" in r.stderr


def test_submits_a_job_through_spark_submit(tmp_path):
    env = dict(os.environ, SPARK_MASTER="local[1]")
    r = _run("generate", "--out", str(tmp_path / "g"), "--users", "20", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "generated" in r.stdout
    assert pq.read_table(tmp_path / "g" / "personas").num_rows == 20
    assert (REPO / "build" / "seqclust.zip").is_file()
    # a quiet start: the JVM logs at WARN (no INFO lines of Spark's default profile), and with
    # Delta's jars resolved once (`make setup`), Ivy does not resolve them again
    assert not re.search(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d INFO ", r.stderr, re.M), r.stderr[:2000]
    if cached_delta_jars():
        assert ":: resolving dependencies" not in r.stderr, r.stderr[:2000]


def test_delta_jars_are_the_resolved_files_when_all_are_there(tmp_path, monkeypatch):
    """spark-submit.sh (and the session factory) hand Spark the jar files an earlier start
    resolved, only while every one of them exists; otherwise Delta's Maven coordinate."""
    monkeypatch.setenv("SEQCLUST_CACHE", str(tmp_path / "cache"))
    env = dict(os.environ)

    def delta_opt():
        r = _run("--dry-run", "ingest", "--run-id", "a", env=env)
        assert r.returncode == 0, r.stderr
        cmd = r.stdout.split()
        flag = "--jars" if "--jars" in cmd else "--packages"
        return flag, cmd[cmd.index(flag) + 1].replace("\\", "")

    assert cached_delta_jars() is None and delta_opt() == ("--packages", delta_package())
    jars = [tmp_path / "a.jar", tmp_path / "b.jar"]
    for j in jars:
        j.write_bytes(b"PK")

    class Conf:  # what a started session reports: its spark.jars as file: URIs
        def get(self, key, default=""):
            return ",".join(f"file://{j}" for j in jars) if key == "spark.jars" else default

    class Session:
        class sparkContext:  # noqa: N801 - mirrors SparkSession.sparkContext
            @staticmethod
            def getConf():
                return Conf()

    _remember_jars(Session(), delta_package())
    assert _jar_list(delta_package()).read_text().split() == [str(j) for j in jars]
    assert cached_delta_jars() == [str(j) for j in jars]
    assert delta_opt() == ("--jars", ",".join(str(j) for j in jars))
    jars[1].unlink()  # a cleaned Ivy cache: resolve again
    assert cached_delta_jars() is None and delta_opt() == ("--packages", delta_package())


def test_packed_environment_is_shipped_as_an_archive(tmp_path):
    env_tar = tmp_path / "env.tar.gz"
    env_tar.write_bytes(b"")
    r = _run("--dry-run", "--env-archive", str(env_tar), "--master", "spark://127.0.0.1:7077", "pipeline", "--run-id", "a")
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert cmd[cmd.index("--archives") + 1] == f"{env_tar}#environment"
    assert "spark.pyspark.python=./environment/bin/python" in cmd
    assert cmd[cmd.index("--master") + 1] == "spark://127.0.0.1:7077" and cmd[-3:] == [str(REPO / "jobs" / "pipeline.py"), "--run-id", "a"]
    r = _run("--dry-run", "--env-archive", str(tmp_path / "missing.tar.gz"), "pipeline")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = _run("--dry-run", "pipeline")
    assert "--archives" not in r.stdout.split()


def test_a_users_driver_options_and_jars_are_kept(tmp_path):
    """The session factory adds its log4j2 option beside a user's own driver Java options (not
    instead of them), and a user's spark.jars.packages is left to Spark and never recorded as
    Delta's jars."""
    code = r"""
import json, sys
from seqclust.core.config import SparkConfig
from seqclust.runtime.spark import get_spark, _jar_list, delta_package
spark = get_spark(SparkConfig(master="local[1]", shuffle_partitions=1, log_level="ERROR", conf={
    "spark.driver.extraJavaOptions": "-Dseqclust.probe=kept",
    "spark.jars.packages": delta_package(),
}))
conf = spark.sparkContext.getConf()
print(json.dumps({"probe": spark.sparkContext._jvm.System.getProperty("seqclust.probe"),
                  "opts": conf.get("spark.driver.extraJavaOptions"), "listed": _jar_list(delta_package()).exists()}))
"""
    env = dict(os.environ, SEQCLUST_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["probe"] == "kept" and "log4j2.configurationFile" in got["opts"] and not got["listed"]
