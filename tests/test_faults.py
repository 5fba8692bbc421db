"""Faults real clusters meet: concurrent writers on the same tables."""

from __future__ import annotations

import threading

import pytest


def test_two_runs_creating_the_same_tables_at_once_both_land(spark, tmp_path):
    """Two runs started together into a new output folder: Delta lets one create each table and
    the other sees ProtocolChanged / MetadataChanged; the store writes again (a run replaces
    only its own rows, so that is safe) and both runs' rows are there."""
    from seqclust.runtime.store import TableStore

    for attempt in range(3):  # the race is not certain every time; three fresh folders
        store = TableStore(str(tmp_path / f"out{attempt}"))
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def write(run_id: str, n: int, store=store, barrier=barrier, errors=errors) -> None:
            try:
                df = spark.range(n).selectExpr("id", f"'{run_id}' AS source")
                barrier.wait()
                store.write_run(df, "runs", run_id)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=write, args=(f"r{attempt}-{i}", 10 + i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        got = {r["run_id"]: r["count"] for r in store.read(spark, "runs").groupBy("run_id").count().collect()}
        assert got == {f"r{attempt}-0": 10, f"r{attempt}-1": 11}


def test_a_conflict_injected_between_two_creators_is_retried_and_both_land(spark, tmp_path, monkeypatch, caplog):
    """The race above, made certain: run a's first save is held until run b has created the
    table and then fails with the conflict Delta reports in that case; the store's retry path
    must run (logged) and write a's rows after b's, neither run losing a row."""
    import logging

    from pyspark.errors import PySparkException

    from seqclust.runtime import store as store_mod
    from seqclust.runtime.store import TableStore

    st = TableStore(str(tmp_path / "out"))
    b_done = threading.Event()
    real_retry = store_mod.retry_conflicts
    attempts: dict[str, int] = {}

    def retry(fn, what, **kw):
        def held():
            if what.endswith("run a"):  # the store names a run's write 'table <name>, run <id>'
                attempts["a"] = attempts.get("a", 0) + 1
                if attempts["a"] == 1:
                    assert b_done.wait(120)
                    raise PySparkException("[DELTA_PROTOCOL_CHANGED] ProtocolChangedException: the table was created concurrently")
            return fn()

        return real_retry(held, what, base_s=0.0, **kw)

    monkeypatch.setattr(store_mod, "retry_conflicts", retry)
    caplog.set_level(logging.WARNING, logger="seqclust.runtime.store")
    errors: list[BaseException] = []

    def write(run_id: str, n: int) -> None:
        try:
            st.write_run(spark.range(n).selectExpr("id", f"'{run_id}' AS source"), "runs", run_id)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            if run_id == "b":
                b_done.set()

    threads = [threading.Thread(target=write, args=("a", 10)), threading.Thread(target=write, args=("b", 11))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert attempts.get("a", 0) >= 2  # a's save ran again after the conflict
    assert any("committed first" in r.getMessage() for r in caplog.records)
    got = {r["run_id"]: r["count"] for r in st.read(spark, "runs").groupBy("run_id").count().collect()}
    assert got == {"a": 10, "b": 11}


def test_conflict_retry_gives_up_on_other_errors_at_once():
    from pyspark.errors import PySparkException

    from seqclust.runtime.store import retry_conflicts

    calls = []

    def boom():
        calls.append(1)
        raise PySparkException("something else entirely")

    with pytest.raises(PySparkException):
        retry_conflicts(boom, "t", base_s=0.0)
    assert len(calls) == 1

    def conflict():
        calls.append(1)
        raise PySparkException("[DELTA_PROTOCOL_CHANGED] ProtocolChangedException: concurrent update")

    calls.clear()
    with pytest.raises(PySparkException):
        retry_conflicts(conflict, "t", attempts=3, base_s=0.0)
    assert len(calls) == 3


def test_an_expected_conflict_is_retried_quietly_and_an_unexpected_one_warns(caplog):
    import logging

    from pyspark.errors import PySparkException

    from seqclust.runtime.store import retry_conflicts

    def flaky():
        """A write that meets a concurrent append on its first try only."""
        calls = []

        def write():
            calls.append(1)
            if len(calls) == 1:
                raise PySparkException("[DELTA_CONCURRENT_APPEND] ConcurrentAppendException: files were added")
            return "done"

        return write

    def retry_levels(expected: bool) -> set[int]:
        caplog.clear()
        assert retry_conflicts(flaky(), "w", base_s=0.0, expected=expected) == "done"
        return {r.levelno for r in caplog.records if "committed first" in r.getMessage()}

    caplog.set_level(logging.INFO, logger="seqclust.runtime.store")
    assert retry_levels(expected=True) == {logging.INFO}  # the lease heartbeat beside the run's own commits
    assert retry_levels(expected=False) == {logging.WARNING}


def _mount_tmpfs(where, size: str) -> bool:
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0


def test_a_full_disk_mid_write_leaves_the_tables_as_they_were_and_a_rerun_completes(spark, tmp_path, capsys):
    """The output volume fills up while sessionize rewrites its tables: the write fails with one
    line naming the table, every table stays at its previous version (Delta commits nothing),
    and after space is freed the same command completes with the same sessions."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from deltalake import DeltaTable
    from pyspark.sql import functions as F

    from seqclust.app.cli import main
    from seqclust.datasets.generated import write_dataset

    out = tmp_path / "vol"
    if not _mount_tmpfs(out, "64m"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root / CAP_SYS_ADMIN); the full-disk fault is not exercised")
    try:
        data = tmp_path / "gen"
        write_dataset(data, users=400, seed=9, bad_rate=0.0)
        conf = str(Path(__file__).resolve().parents[1] / "conf" / "local.yaml")
        base = ["--run-id", "disk", "--conf", conf, "--input", str(data / "events"), "--output", str(out)]
        for stage in ("ingest", "sessionize"):
            assert main([stage, *base]) == 0, capsys.readouterr().err[-2000:]
        capsys.readouterr()
        before = {t: DeltaTable(str(out / t)).version() for t in ("events", "sessions", "session_quarantine")}

        def sessions():  # event_counts (a map) as JSON: set operations take no maps
            df = spark.read.format("delta").load(str(out / "sessions")).where("run_id = 'disk'").drop("run_id")
            return df.withColumn("event_counts", F.to_json("event_counts"))

        sessions_before = sessions().cache()
        n_before = sessions_before.count()
        # fill the volume, leaving a few kilobytes: too little for the sessions rewrite
        free = shutil.disk_usage(out).free
        filler = out / "filler.bin"
        subprocess.run(["fallocate", "-l", str(max(free - 48 * 1024, 0)), str(filler)], check=True)
        assert shutil.disk_usage(out).free < 200 * 1024
        assert main(["sessionize", *base]) == 2
        err = capsys.readouterr().err
        assert "seqclust: error:" in err and "Traceback" not in err
        assert "the output volume is full (No space left on device); nothing was committed" in err
        # nothing committed: each table at its version, readable, the same rows
        assert {t: DeltaTable(str(out / t)).version() for t in before} == before
        assert sessions().count() == n_before
        runs = DeltaTable(str(out / "runs")).to_pyarrow_table().to_pylist()
        rec = next(r for r in runs if r["run_id"] == "disk")
        assert rec["status"] in ("failed", "running")  # "failed" when the bookkeeping itself still fit
        if rec["status"] == "failed":
            assert rec["error"].startswith("sessionize:")
        # space freed: the same command completes, with the same sessions
        os.remove(filler)
        assert main(["sessionize", *base]) == 0, capsys.readouterr().err[-2000:]
        again = sessions()
        assert again.count() == n_before and again.exceptAll(sessions_before).count() == 0
        rec = next(r for r in DeltaTable(str(out / "runs")).to_pyarrow_table().to_pylist() if r["run_id"] == "disk")
        assert rec["error"] is None and "sessionize" in rec["stages_completed"]
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
