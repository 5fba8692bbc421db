"""One process per run id at a time: a lease in the run's ``runs`` row.

A scheduler may start the same run id twice (a retry of a task that is still alive, a
backfill and a manual rerun). Two processes writing one run id's tables at once would
interleave their stages. So a process takes the run's lease before any work: ``lease_owner``
(``host:pid:token``) and ``lease_heartbeat`` in the ``runs`` row, set by a Delta statement whose
condition is the lease it saw (compare-and-set: of two processes that saw the same lease,
Delta's conflict detection lets one commit; the other's retried statement no longer matches):
a MERGE that inserts the row of a new run id, a conditional UPDATE of an existing row (the
stages of a scheduled run, each its own process: ~1 s against ~6 s for a cold MERGE). The
loser reads the row back, finds another owner and stops with one line.

A live owner renews ``lease_heartbeat`` every ``lease_timeout_s / 5`` seconds from a daemon
thread. A lease is free when the run is not ``running``, when its heartbeat is older than
``run.lease_timeout_s``, or at once when its owner is a process of this host that no longer
exists (a SIGKILLed run resumed on the same machine). The lease is released when the run ends.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import uuid
from typing import TYPE_CHECKING

from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.errors import SeqclustError
from seqclust.runtime.store import retry_conflicts, spark_error_line

if TYPE_CHECKING:
    from seqclust.core.tables import RunRecord
    from seqclust.runtime.context import RunContext

log = logging.getLogger(__name__)

# the leases runs of this process hold now: an owner with this host and pid that is not here
# belongs to an earlier run of this process that ended without recording it (a notebook that
# reruns after a failure whose bookkeeping could not be written)
_HELD: set[str] = set()


def new_owner() -> str:
    """``host:pid:token`` of this process (SQL-safe characters only)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:100] or "host"
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _alive_here(owner: str) -> bool | None:
    """Whether the owner process still exists: True / False on this host, None elsewhere."""
    parts = owner.split(":")
    if len(parts) != 3 or parts[0] != new_owner().split(":")[0] or not parts[1].isdigit():
        return None
    if int(parts[1]) == os.getpid():
        return owner in _HELD
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(prev: RunRecord | None, me: str, timeout_s: float, now: dt.datetime) -> str | None:
    """Who holds the lease of ``prev`` against ``me``: None when it is free for us, else a
    sentence naming the holder."""
    if prev is None or prev.status != "running" or not prev.lease_owner or prev.lease_owner == me:
        return None
    beat = prev.lease_heartbeat
    if beat is None:
        age = float("inf")
    elif beat.tzinfo is None:  # PySpark hands timestamps back as naive local time
        age = (now.astimezone().replace(tzinfo=None) - beat).total_seconds()
    else:
        age = (now - beat).total_seconds()
    alive = _alive_here(prev.lease_owner)
    if alive is False:
        log.warning("run lease: held by %s, a process of this host that is gone; taking it over", prev.lease_owner)
        return None
    if age > timeout_s:
        log.warning(
            "run lease: last heartbeat of %s was %.0f s ago (> run.lease_timeout_s = %g); taking it over", prev.lease_owner, age, timeout_s
        )
        return None
    return f"{prev.lease_owner} (last heartbeat {age:.0f} s ago)"


def acquire(spark: SparkSession, ctx: RunContext, rec: RunRecord, prev: RunRecord | None, me: str, timeout_s: float) -> None:
    """Take the lease of ``ctx.run_id`` for ``me`` and write ``rec`` (with the lease) as the
    run's row, atomically against another process doing the same; SeqclustError when another
    live process holds it."""
    from seqclust.core.tables import RUNS

    now = dt.datetime.now(dt.timezone.utc)
    held = holder(prev, me, timeout_s, now)
    if held:
        raise SeqclustError(_refusal(ctx.run_id, held, timeout_s))
    seen = prev.lease_owner if prev is not None else None
    rec.lease_owner, rec.lease_heartbeat = me, now
    if not ctx.store.exists(ctx.tables.runs):  # MERGE needs a table: create it empty, replacing nothing
        empty = spark.createDataFrame([], RUNS).withColumn("run_id", F.lit(None).cast("string"))
        ctx.store.create_if_absent(empty, ctx.tables.runs)
    path = ctx.store.path(ctx.tables.runs)
    _add_missing_columns(spark, ctx, path)
    same = "t.lease_owner IS NULL" if seen is None else f"t.lease_owner = '{seen}'"
    cas = f"({same}) OR t.lease_owner = '{me}'"

    def merge() -> None:  # no row yet: insert it unless another process did so first
        src = spark.createDataFrame([rec.row()], RUNS).withColumn("run_id", F.lit(ctx.run_id))
        (
            ctx.store.delta_table(spark, ctx.tables.runs)
            .alias("t")
            .merge(src.alias("s"), f"t.run_id = '{ctx.run_id}'")
            .whenMatchedUpdateAll(condition=cas)
            .whenNotMatchedInsertAll()
            .execute()
        )

    def update() -> None:  # the row exists: a conditional UPDATE is the same compare-and-set at a
        # sixth of a cold MERGE's cost (~1 s against ~6 s at the start of a stage's process)
        (
            ctx.store.delta_table(spark, ctx.tables.runs)
            .alias("t")
            .update(condition=f"t.run_id = '{ctx.run_id}' AND ({cas})", set=record_columns(rec))
        )

    try:
        retry_conflicts(merge if prev is None else update, f"table {ctx.tables.runs}, lease of run {ctx.run_id}")
    except Exception as e:
        raise SeqclustError(f"run {ctx.run_id}: could not take the run's lease ({spark_error_line(e)[:300]})") from None
    row = ctx.store.read(spark, ctx.tables.runs, ctx.run_id).select("lease_owner", "lease_heartbeat").first()
    if row is None or row["lease_owner"] != me:
        other = row["lease_owner"] if row is not None else "another process"
        raise SeqclustError(_refusal(ctx.run_id, f"{other} (it took the lease at the same moment)", timeout_s))
    _HELD.add(me)
    log.info("run lease: run %s held by %s", ctx.run_id, me)


def record_columns(rec: RunRecord) -> dict[str, Column]:
    """Every column of ``rec``'s ``runs`` row as a literal (maps and lists through JSON), for an UPDATE."""
    from seqclust.core.tables import RUNS

    out = {}
    for f, value in zip(RUNS.fields, rec.row()):
        if value is None:
            out[f.name] = F.lit(None).cast(f.dataType)
        elif isinstance(f.dataType, (T.MapType, T.ArrayType)):
            out[f.name] = F.from_json(F.lit(json.dumps(value)), f.dataType.simpleString())
        else:
            out[f.name] = F.lit(value).cast(f.dataType)
    return out


def forget(me: str) -> None:
    """This process no longer runs under ``me`` (the run ended, recorded or not)."""
    _HELD.discard(me)


def _add_missing_columns(spark: SparkSession, ctx: RunContext, path: str) -> None:
    """A ``runs`` table written by an older seqclust lacks the newer columns (the lease's among
    them); MERGE does not add them, so add them first (ALTER TABLE ... ADD COLUMNS; a
    concurrent upgrader's commit is retried and then finds nothing to add)."""
    from seqclust.core.tables import RUNS

    def add() -> None:
        have = set(ctx.store.read(spark, ctx.tables.runs).columns)
        missing = [f for f in RUNS.fields if f.name not in have]
        if not missing:
            return
        if "`" in path:
            raise SeqclustError(f"table {ctx.tables.runs} at {path}: a backquote in the path cannot be quoted in SQL; move run.output")
        target = path if ctx.store.in_metastore else f"delta.`{path}`"
        cols = ", ".join(f"{f.name} {f.dataType.simpleString()}" for f in missing)
        log.info("table %s: adding the columns %s (written by an older seqclust)", ctx.tables.runs, ", ".join(f.name for f in missing))
        spark.sql(f"ALTER TABLE {target} ADD COLUMNS ({cols})")

    retry_conflicts(add, f"table {ctx.tables.runs}, new columns")


def _refusal(run_id: str, held: str, timeout_s: float) -> str:
    return (
        f"run {run_id} is already running in {held}; wait for it to finish, or use another run id "
        f"(a lease whose owner stopped renewing it is taken over after run.lease_timeout_s = {timeout_s:g} s)"
    )


class Heartbeat:
    """Renews ``me``'s lease every ``every_s`` seconds from a daemon thread, from ``start``
    until ``stop`` (which also tells this process it no longer holds the lease)."""

    def __init__(self, spark: SparkSession, ctx: RunContext, me: str, every_s: float) -> None:
        self.spark, self.ctx, self.me, self.every_s = spark, ctx, me, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"seqclust-lease-{ctx.run_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Idempotent: the run ended, recorded or not."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        forget(self.me)

    def beat(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        self.ctx.store.delta_table(self.spark, self.ctx.tables.runs).update(
            condition=f"run_id = '{self.ctx.run_id}' AND lease_owner = '{self.me}'",
            set={"lease_heartbeat": F.lit(now).cast("timestamp")},
        )

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                retry_conflicts(self.beat, f"lease heartbeat of run {self.ctx.run_id}", expected=True)
            except Exception as e:  # noqa: BLE001 - a missed beat is logged; the next one may land
                log.warning("run lease: heartbeat of run %s failed (%s)", self.ctx.run_id, spark_error_line(e)[:200])
