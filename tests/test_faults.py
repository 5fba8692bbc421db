"""Faults real clusters meet: concurrent writers on the same tables."""

from __future__ import annotations

import threading

import pytest


def test_two_runs_creating_the_same_tables_at_once_both_land(spark, tmp_path):
    """Two runs started together into a new output folder: Delta lets one create each table and
    the other sees ProtocolChanged / MetadataChanged; the store writes again (a run replaces
    only its own rows, so that is safe) and both runs' rows are there."""
    from seqclust.io import TableStore

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


def test_conflict_retry_gives_up_on_other_errors_at_once():
    from pyspark.errors import PySparkException

    from seqclust.io import retry_conflicts

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
