"""Crash consistency: SIGKILL the whole job (driver, JVM, Python workers) during embedding and
again during a Delta write, check every table is still readable at a committed version,
resume, and get exactly the clusters of an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from seqclust.datasets.generated import write_dataset

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [
    "encoder.epochs=2",
    "encoder.train_sample=1000",
    "encoder.embedding_dim=8",
    "encoder.hidden=16",
    "cluster.k=4",
    "cluster.stability_runs=0",
    "cluster.n_init=1",
    "baseline.bag_of_events=false",
    "evaluate.downstream=false",
    "spark.shuffle_partitions=2",
    "spark.master=local[2]",
    "spark.log_level=ERROR",
]


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    args = ["run", "--conf", str(REPO / "conf" / "local.yaml"), "--input", str(data / "events"), "--output", str(out), "--run-id", "crash"]
    return [sys.executable, "-m", "seqclust.app.cli", *args, *[x for s in SETTINGS for x in ("--set", s)], *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYSPARK_PYTHON=sys.executable, PYTHONUNBUFFERED="1")


def _run_and_kill(cmd: list[str], trigger: str, delay: float, timeout: float = 400, after: str | None = None) -> list[str]:
    """Run ``cmd`` in its own process group; SIGKILL the group ``delay`` s after a stderr line
    contains ``trigger`` (with ``after``: the first such line that follows a line containing
    ``after``). Returns the stderr lines seen. Fails if the job ended on its own."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(), start_new_session=True)
    lines: list[str] = []
    hit = threading.Event()

    def pump() -> None:
        armed = after is None
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())
            armed = armed or after in line
            if armed and trigger in line:
                hit.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + timeout
        while not hit.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                t.join(5)
                raise AssertionError(f"never saw {trigger!r} (exit {proc.poll()}); last lines:\n" + "\n".join(lines[-30:]))
        time.sleep(delay)
        assert proc.poll() is None, "the job ended before it could be killed:\n" + "\n".join(lines[-30:])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    # no orphan JVM or Python worker of the killed job survives
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(proc.pid)], capture_output=True, text=True).stdout.strip()
        if not [x for x in left.splitlines() if x.split()[1][0] != "Z"]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"processes of the killed job survive:\n{left}")
    return lines


def _check_tables_readable(spark, out: Path) -> dict[str, int]:
    from deltalake import DeltaTable

    from seqclust.runtime.store import TableStore

    counts = {}
    for d in sorted(p for p in out.iterdir() if (p / "_delta_log").is_dir()):
        if not any((d / "_delta_log").glob("*.json")):  # its first commit was killed: no table yet
            assert not TableStore(str(out)).exists(d.name)
            continue
        n = spark.read.format("delta").load(str(d)).count()
        assert DeltaTable(str(d)).to_pyarrow_table().num_rows == n, d.name  # a second reader agrees
        counts[d.name] = n
    return counts


def test_sigkill_during_embedding_and_during_a_write_then_resume(spark, tmp_path):
    data = tmp_path / "gen"
    write_dataset(data, users=80, seed=3, bad_rate=0.01)
    out = tmp_path / "out"

    # 1. killed while the embeddings are computed and written (the Delta write drives the UDF)
    _run_and_kill(_cmd(data, out), "table embeddings: writing run crash", delay=1.5)
    counts = _check_tables_readable(spark, out)
    rec = spark.read.format("delta").load(str(out / "runs")).first()
    assert rec["status"] == "running" and rec["stages_completed"] == ["ingest", "sessionize", "train"]
    assert counts["sessions"] > 0 and counts.get("clusters", 0) == 0

    # 2. resumed, and killed again in the middle of the clusters table's write
    lines = _run_and_kill(_cmd(data, out, "--resume"), "table clusters: writing run crash", delay=0.3)
    assert any("resume run crash: ingest, sessionize, train already completed" in x for x in lines)
    _check_tables_readable(spark, out)
    rec = spark.read.format("delta").load(str(out / "runs")).first()
    assert rec["stages_completed"] == ["ingest", "sessionize", "train", "embed"]

    # 3. resumed to the end (in this process: a third JVM start buys nothing)
    from seqclust.app.cli import main

    assert main(_cmd(data, out, "--resume")[3:]) == 0
    after = _check_tables_readable(spark, out)
    rec = spark.read.format("delta").load(str(out / "runs")).first()
    assert rec["status"] == "succeeded" and len(rec["stages_completed"]) == 6

    # an uninterrupted run of the same input and seed, elsewhere
    ref = tmp_path / "ref"
    assert main(_cmd(data, ref)[3:]) == 0
    ref_counts = _check_tables_readable(spark, ref)
    assert {k: v for k, v in after.items() if k != "runs"} == {k: v for k, v in ref_counts.items() if k != "runs"}

    def clusters(root: Path) -> dict[str, int]:
        return {
            (r["entity_id"], r["granularity"]): r["cluster_id"] for r in spark.read.format("delta").load(str(root / "clusters")).collect()
        }

    got, want = clusters(out), clusters(ref)
    assert len(got) == 2 * 80 and got == want  # every user at the top level and at their leaf
