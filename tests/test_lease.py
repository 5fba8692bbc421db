"""One process per run id: the second start of a live run id is refused with one line;
a lease whose owner is gone (dead process here, or no heartbeat for run.lease_timeout_s) is
taken over; two processes taking the same lease at once: exactly one wins."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from seqclust.core.tables import RunRecord
from seqclust.runtime import lease

REPO = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_who_holds_a_lease():
    me = lease.new_owner()
    host = me.split(":")[0]
    live_remote = RunRecord(status="running", lease_owner="elsewhere.example:77:abcd1234", lease_heartbeat=NOW - dt.timedelta(seconds=30))
    assert "elsewhere.example:77:abcd1234 (last heartbeat 30 s ago)" == lease.holder(live_remote, me, 300, NOW)
    assert lease.holder(None, me, 300, NOW) is None
    assert lease.holder(RunRecord(status="failed", lease_owner="elsewhere.example:77:x", lease_heartbeat=NOW), me, 300, NOW) is None
    stale = RunRecord(status="running", lease_owner="elsewhere.example:77:x", lease_heartbeat=NOW - dt.timedelta(seconds=301))
    assert lease.holder(stale, me, 300, NOW) is None
    dead_here = RunRecord(status="running", lease_owner=f"{host}:{_dead_pid()}:x", lease_heartbeat=NOW)
    assert lease.holder(dead_here, me, 300, NOW) is None  # SIGKILLed on this machine: resume at once
    import os

    live_here = RunRecord(status="running", lease_owner=f"{host}:{os.getppid()}:x", lease_heartbeat=NOW)
    assert lease.holder(live_here, me, 300, NOW) is not None
    assert lease.holder(RunRecord(status="running", lease_owner=me, lease_heartbeat=NOW), me, 300, NOW) is None
    # an earlier run of this very process that ended without recording it (a notebook rerun)
    earlier = RunRecord(status="running", lease_owner=f"{host}:{os.getpid()}:old", lease_heartbeat=NOW)
    assert lease.holder(earlier, me, 300, NOW) is None


def test_a_second_start_of_a_live_run_id_is_refused_and_a_stale_lease_taken_over(spark, tmp_path, capsys):
    from seqclust.app.cli import main
    from seqclust.app.pipeline import load_record, save_record
    from seqclust.core.config import TablesConfig
    from seqclust.runtime.context import RunContext
    from seqclust.runtime.store import TableStore

    src = tmp_path / "ev.csv"
    src.write_text("user_id,ts,event_type\nu1,2026-10-01T10:00:00Z,view\nu2,2026-10-01T10:01:00Z,view\n")
    out = tmp_path / "out"
    args = ["ingest", "--run-id", "busy", "--conf", str(REPO / "conf" / "local.yaml"), "--input", str(src), "--output", str(out)]
    ctx = RunContext(run_id="busy", store=TableStore(str(out)), tables=TablesConfig(), started_at=NOW)
    now = dt.datetime.now(dt.timezone.utc)
    save_record(spark, ctx, RunRecord(status="running", lease_owner="elsewhere.example:77:abcd1234", lease_heartbeat=now))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("seqclust: error: run busy is already running in elsewhere.example:77:abcd1234 (last heartbeat")
    assert load_record(spark, ctx).lease_owner == "elsewhere.example:77:abcd1234"  # untouched
    # the other process stopped renewing it long ago: taken over, the stage runs, the lease is released
    save_record(
        spark, ctx, RunRecord(status="running", lease_owner="elsewhere.example:77:abcd1234", lease_heartbeat=now - dt.timedelta(hours=1))
    )
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    rec = load_record(spark, ctx)
    assert rec.lease_owner is None and rec.rows_clean == 2 and "ingest" in rec.stages_completed


@pytest.mark.parametrize("order", ["overlapping commits", "one after the other"])
@pytest.mark.parametrize("row", ["new run id", "finished run id"])
def test_two_processes_taking_one_lease_at_once_one_wins(spark, tmp_path, monkeypatch, row, order):
    """A new run id takes its lease by MERGE (insert unless present), an existing row by a
    conditional UPDATE; both racers read the run's row before either writes (the same ``prev``),
    so both pass the holder check and only the compare-and-set can stop one. Each interleaving
    is forced, not hoped for: *overlapping commits* — the loser's first commit is held until
    the winner has committed and then fails with the conflict Delta reports when two commits
    overlap; its retry must run and find the row taken; *one after the other* — the loser
    starts only once the winner has committed, from the stale row."""
    from pyspark.errors import PySparkException

    from seqclust.app.pipeline import load_record, save_record
    from seqclust.core.config import TablesConfig
    from seqclust.core.errors import SeqclustError
    from seqclust.runtime.context import RunContext
    from seqclust.runtime.store import TableStore

    ctx = RunContext(run_id="twice", store=TableStore(str(tmp_path / "out")), tables=TablesConfig(), started_at=NOW)
    prev = None
    if row == "finished run id":
        save_record(spark, ctx, RunRecord(status="succeeded", stages_completed=["ingest"]))
        prev = load_record(spark, ctx)
        assert prev is not None and prev.lease_owner is None
    winner, loser = "host.example:1:w", "host.example:2:l"
    won_done = threading.Event()
    attempts: list[str] = []
    real_retry = lease.retry_conflicts

    def retry(fn, what, **kw):
        me = threading.current_thread().name

        def held():
            if what.startswith("table runs, lease"):
                attempts.append(me)
                if me == loser and attempts.count(loser) == 1 and order == "overlapping commits":
                    assert won_done.wait(120)
                    raise PySparkException("[DELTA_CONCURRENT_APPEND] ConcurrentAppendException: files were added by a concurrent update")
            return fn()

        return real_retry(held, what, **{**kw, "base_s": 0.0})

    monkeypatch.setattr(lease, "retry_conflicts", retry)
    outcome: dict[str, str] = {}

    def start(me: str) -> None:
        try:
            if me == loser and order == "one after the other":
                assert won_done.wait(120)
            lease.acquire(spark, ctx, RunRecord(status="running"), prev, me, 300)
            outcome[me] = "won"
        except SeqclustError as e:
            outcome[me] = str(e)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome[me] = f"unexpected {e!r}"
        finally:
            if me == winner:
                won_done.set()

    threads = [threading.Thread(target=start, args=(me,), name=me) for me in (winner, loser)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert outcome[winner] == "won", outcome
    assert outcome[loser].startswith("run twice is already running in host.example:1:w"), outcome
    # the loser's compare-and-set ran: twice when its first commit met the conflict (the retry)
    assert attempts.count(loser) == (2 if order == "overlapping commits" else 1), attempts
    rows = ctx.store.read(spark, "runs", "twice").collect()
    assert len(rows) == 1 and rows[0]["lease_owner"] == winner


def test_the_lease_update_writes_the_whole_record(spark, tmp_path):
    """Taking the lease of an existing run's row rewrites every column of it (maps, lists and
    timestamps included): what an earlier run of the id left is not kept by accident."""
    from seqclust.app.pipeline import load_record, save_record
    from seqclust.core.config import TablesConfig
    from seqclust.runtime.context import RunContext
    from seqclust.runtime.store import TableStore

    ctx = RunContext(run_id="again", store=TableStore(str(tmp_path / "out")), tables=TablesConfig(), started_at=NOW)
    old = RunRecord(
        status="succeeded", k=7, stages_completed=["ingest", "sessionize"], stage_seconds={"ingest": 1.5},
        quarantine_reasons={"null_ts": 3}, rows_clean=10, encoder_id="e1", finished_at=NOW,
    )  # fmt: skip
    save_record(spark, ctx, old)
    prev = load_record(spark, ctx)
    new = RunRecord(
        status="running", started_at=NOW + dt.timedelta(hours=1), config_json='{"a": 1}', config_hash="h",
        stage_seconds={"ingest": 2.25, "train": 3.0}, quarantine_reasons={}, rows_empty_optional={"price": 4},
    )  # fmt: skip
    lease.acquire(spark, ctx, new, prev, "host.example:9:abc", 300)
    got = load_record(spark, ctx)
    assert got is not None
    assert got.lease_owner == "host.example:9:abc" and got.lease_heartbeat is not None
    for f in (
        "status",
        "config_json",
        "config_hash",
        "stage_seconds",
        "rows_empty_optional",
        "k",
        "encoder_id",
        "rows_clean",
        "finished_at",
    ):
        assert getattr(got, f) == getattr(new, f), f
    assert got.stages_completed == [] and got.quarantine_reasons == {}  # the earlier run's, replaced
    assert got.started_at.replace(tzinfo=None) == (NOW + dt.timedelta(hours=1)).astimezone().replace(tzinfo=None)


@pytest.mark.parametrize("timeout", [5, -1])
def test_lease_timeout_is_checked(timeout):
    from seqclust.core.config import load_config
    from seqclust.core.errors import ConfigError

    with pytest.raises(ConfigError, match="run.lease_timeout_s: must be >= 10 seconds"):
        load_config(REPO / "conf" / "local.yaml", overrides=[f"run.lease_timeout_s={timeout}"])


def test_a_runs_table_of_an_older_version_gets_the_lease_columns(spark, tmp_path):
    """A runs table written before the lease existed: the lease's MERGE adds its columns first."""
    from seqclust.core.config import TablesConfig
    from seqclust.core.tables import RUNS
    from seqclust.runtime.context import RunContext
    from seqclust.runtime.store import TableStore

    old = [f for f in RUNS.fields if f.name not in ("lease_owner", "lease_heartbeat", "rows_empty_optional")]
    from pyspark.sql import types as T

    store = TableStore(str(tmp_path / "out"))
    store.write_run(spark.createDataFrame([("succeeded",) + (None,) * (len(old) - 1)], T.StructType(old)), "runs", "older", count=False)
    ctx = RunContext(run_id="newer", store=store, tables=TablesConfig(), started_at=NOW)
    lease.acquire(spark, ctx, RunRecord(status="running"), None, "host.example:1:new", 300)
    rows = {r["run_id"]: r for r in store.read(spark, "runs").collect()}
    assert rows["newer"]["lease_owner"] == "host.example:1:new" and rows["older"]["status"] == "succeeded"


def test_creating_the_runs_table_never_replaces_a_row_committed_meanwhile(spark, tmp_path):
    """The race the two-process test once lost: the second creator's retried create had
    replaced the run's rows, wiping the lease the first had just committed. Creating is now an
    append of nothing."""
    from pyspark.sql import functions as F

    from seqclust.core.tables import RUNS
    from seqclust.runtime.store import TableStore

    store = TableStore(str(tmp_path / "out"))
    empty = spark.createDataFrame([], RUNS).withColumn("run_id", F.lit(None).cast("string"))
    store.create_if_absent(empty, "runs")
    store.create_if_absent(empty, "runs")  # idempotent
    assert store.read(spark, "runs").count() == 0
    row = spark.createDataFrame([RunRecord(status="running", lease_owner="h:1:t").row()], RUNS)
    store.write_run(row, "runs", "twice", count=False)
    store.create_if_absent(empty, "runs")  # a late creator
    got = store.read(spark, "runs", "twice").collect()
    assert [r["lease_owner"] for r in got] == ["h:1:t"]
