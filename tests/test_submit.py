"""spark-submit.sh: its contract on the command line, and one real submit of a job."""

import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq

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
