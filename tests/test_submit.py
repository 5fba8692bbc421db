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
