"""Live segments, one micro-batch at a time: what ``seqclust stream`` runs in ``foreachBatch``.

A micro-batch (``LiveScorer.process``):

1. **ingest**: validation and quarantine as in a batch run (``ingest.ingest_rows``; the bad rows
   go to ``quarantine`` tagged with the batch's window key); valid rows older than the watermark
   are quarantined as ``late``. The valid rows join the events of the sessions the batch before
   left open (``live_open_events``) and are de-duplicated with them (``ingest.dedup``: a copy of
   an event of an open session is a duplicate; a copy of an event of a closed one is older than
   the watermark, so late).
2. **sessionize**: those events (each open session's whole chain and the new events) go through
   the batch sessionizer (``sessionize_arrow``): the pieces and their ids are the batch run's,
   since a session's rules and id depend only on its own chain of events.
3. **close**: a chain (the pieces of one cut session) is closed when it ended more than
   ``sessionize.gap_minutes`` before the watermark (the latest event time seen so far minus
   ``stream.allowed_lateness_minutes``): an event that could still change it would be older
   than the watermark, so late. ``--flush`` closes every chain (the end of the log, as a batch
   run sees it). The events of the chains still open are the next batch's ``live_open_events``.
4. **embed and assign** the newly closed modelled sessions (the batch Arrow path) and add them
   to their users' pooling state (``live_state``), which places each user as ``seqclust assign
   --model`` does.

Nothing grows with the stream's history: a micro-batch reads the open sessions' events (bounded
by the lateness and the gap), its own rows, and the state of the users it touches (MERGEd by
user). The stream run's ``events`` and ``sessions`` are written only with
``stream.keep_history`` (each event and session once, when its session closes).

Exactly once, with one rule per table, so that a micro-batch run again (a crash after some of
its writes, before Spark's commit) writes the same rows once: a step (micro-batch or flush)
reads the open events of the latest other step that finished (its ``live_progress`` row,
written last) and writes its own generation of them replacing every generation but that one;
the appends (``live_sessions``, ``session_quarantine``, the history) are Delta's idempotent
appends versioned by the number of steps finished before; the users' state and segments are
MERGEd by user, a state row keeping the state before the batch that wrote it (``prev_*``);
quarantine is replaced by the batch's window key; progress by batch id.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from seqclust.core.config import PipelineConfig
from seqclust.ingest import stage as ingest
from seqclust.represent import embed
from seqclust.runtime.context import RunContext
from seqclust.runtime.spark import concurrently, materialised, release
from seqclust.runtime.store import one_row
from seqclust.serve.live_state import split_updated, updated_users
from seqclust.serve.live_writes import OPEN_COLUMNS, Step, StepWrites, Write, read_open_events, read_step, read_user_state
from seqclust.serve.placement import Model
from seqclust.sessionize.arrow_engine import sessionize_arrow

log = logging.getLogger(__name__)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
FLUSH_BATCH = -1  # the progress row of a --flush (closes every open session)


def window_key(batch_id: int) -> dt.datetime:
    """The window key (``window_start`` in ``events``/``quarantine``) of micro-batch ``batch_id``:
    the epoch plus that many seconds (a key, not a time)."""
    return EPOCH + dt.timedelta(seconds=int(batch_id) + 1)


@dataclass(frozen=True)
class BatchResult:
    batch_id: int
    input_rows: int
    quarantined: int
    late: int
    new_events: int
    closed_sessions: int
    users_updated: int
    watermark: dt.datetime | None
    seconds: float


def split_chains(
    pieces: DataFrame, events: DataFrame, watermark: dt.datetime | None, gap_us: int
) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(closed pieces, events of the open chains, events of the closed chains) of the sessionizer's
    ``pieces`` over ``events``: a chain (the pieces sharing ``root_start_ts``) is closed when its
    last piece ended more than ``gap_us`` before ``watermark`` (None: every chain is)."""
    chains = pieces.groupBy("user_id", "root_start_ts").agg(F.max("end_ts").alias("_end"))
    ended = F.lit(True) if watermark is None else F.unix_micros("_end") < F.unix_micros(F.lit(watermark)) - gap_us
    chains = chains.withColumn("_closed", ended)
    # a user's chains are disjoint in time: the events from the first open chain's start on are open
    open_from = chains.where(~F.col("_closed")).groupBy("user_id").agg(F.min("root_start_ts").alias("_from"))
    with_from = events.join(open_from, "user_id", "left")
    still_open = with_from.where(F.col("ts") >= F.col("_from")).select(*OPEN_COLUMNS)
    gone = with_from.where(F.col("_from").isNull() | (F.col("ts") < F.col("_from"))).select(*OPEN_COLUMNS)
    closed = pieces.join(chains.where("_closed").select("user_id", "root_start_ts"), ["user_id", "root_start_ts"], "left_semi")
    return closed, still_open, gone


def ingest_batch(
    spark: SparkSession,
    cfg: PipelineConfig,
    ctx: RunContext,
    raw: DataFrame,
    late_before: dt.datetime | None,
    open_: DataFrame | None,
    n_open: int,
    done: list[DataFrame],
) -> tuple[int, ingest.IngestResult | None, DataFrame | None, dt.datetime | None]:
    """(input rows, the ingest's counts, the open sessions' events and the new ones de-duplicated
    together, the newest new event's time) of micro-batch ``raw`` (``ctx.since``: its window key)."""  # fmt: skip
    key = F.lit(ctx.window_start).cast("timestamp")
    held: dict[str, Any] = {}

    def sink(valid: DataFrame) -> int:
        rows = valid.withColumn("window_start", key)
        events = materialised(ingest.dedup(rows.unionByName(open_) if open_ is not None else rows, ("window_start",)), done)
        row = one_row(events.agg(F.count("*").alias("n"), F.max(F.when(F.col("window_start") == key, F.col("ts"))).alias("m")))
        held.update(events=events, max_new=row["m"])
        return int(row["n"]) - n_open

    raw = raw.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n_input = raw.count()
        res = None
        if n_input:
            salt = cfg.privacy.salt()
            res = ingest.ingest_rows(spark, ctx, raw, cfg.source, n_input, None, salt, late_before, skip_empty=True, clean_sink=sink)
    finally:
        raw.unpersist()
    return n_input, res, held.get("events", open_), held.get("max_new")


class LiveScorer:
    """Processes micro-batches for one stream run id (``ctx.run_id``) against one model."""

    def __init__(self, spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, model: Model):
        self.spark, self.cfg, self.ctx, self.model = spark, cfg, ctx, model
        self.lateness = dt.timedelta(minutes=cfg.stream.allowed_lateness_minutes)
        self.gap_us = int(cfg.sessionize.gap_minutes * 60 * 1_000_000)

    def process(self, raw: DataFrame, batch_id: int) -> BatchResult:
        """Ingest, sessionize, close, embed and assign one micro-batch (see the module doc)."""
        t0 = time.monotonic()
        step = read_step(self.spark, self.ctx, batch_id)
        late_before = step.seen - self.lateness if step.seen is not None else None
        ctx = dataclasses.replace(self.ctx, since=window_key(batch_id), written={})
        open_, n_open = read_open_events(self.spark, ctx, step)
        done: list[DataFrame] = []
        try:
            n_input, res, events, batch_max = ingest_batch(self.spark, self.cfg, ctx, raw, late_before, open_, n_open, done)
            t_ingest = time.monotonic() - t0
            seen = max([t for t in (step.seen, batch_max) if t is not None], default=None)
            watermark = seen - self.lateness if seen is not None else None
            closed, users, n_open_after = self.close(step, events, watermark, done, n_open)
        finally:
            release(done)
        q, late, new = (res.quarantined_rows, res.reasons.get(ingest.LATE, 0), res.clean_rows) if res else (0, 0, 0)
        r = BatchResult(batch_id, n_input, q, late, new, closed, users, watermark, time.monotonic() - t0)
        self._progress(step, r, batch_max if batch_max is not None else step.seen)
        log.info(
            "stream: batch %d: %d input rows, %d quarantined (%d late), %d new events, %d sessions closed, %d users updated, "
            "%d events in open sessions, watermark %s, %.1fs (ingest %.1fs)",
            batch_id, n_input, q, late, new, closed, users, n_open_after, watermark.isoformat() if watermark else "-", r.seconds,
            t_ingest,
        )  # fmt: skip
        return r

    def flush(self, batch_id: int | None = None) -> BatchResult:
        """Close every open session (the end of the log) and assign their users. Each flush has
        its own negative batch id (-1, -2, ...: one more than the flushes that completed), so a
        flush re-run after a crash is the same batch and a later flush is not."""
        t0 = time.monotonic()
        if batch_id is None:
            name = self.ctx.tables.live_progress
            prog = self.ctx.store.read(self.spark, name, self.ctx.run_id) if self.ctx.store.exists(name) else None
            batch_id = FLUSH_BATCH - (prog.where(F.col("batch_id") < 0).select("batch_id").distinct().count() if prog is not None else 0)
        step = read_step(self.spark, self.ctx, batch_id)
        open_, n_open = read_open_events(self.spark, self.ctx, step)
        done: list[DataFrame] = []
        try:
            closed, users, _ = self.close(step, open_, None, done, n_open)
        finally:
            release(done)
        r = BatchResult(batch_id, 0, 0, 0, 0, closed, users, None, time.monotonic() - t0)
        self._progress(step, r, None)
        log.info("stream: flush: %d sessions closed, %d users updated, %.1fs", closed, users, r.seconds)
        return r

    def close(
        self, step: Step, events: DataFrame | None, watermark: dt.datetime | None, done: list[DataFrame], n_open: int
    ) -> tuple[int, int, int]:
        """(modelled sessions closed, users updated, events left open): sessionize ``events``
        (the open sessions' and the new ones), close the chains that ended a gap before
        ``watermark`` (None: every chain, a flush), embed and assign the closed modelled
        sessions and write every table of the step at once (see the module doc)."""
        if events is None:
            return 0, 0, 0
        t0 = time.monotonic()
        n = int(self.spark.conf.get("spark.sql.shuffle.partitions") or 4)
        pieces = materialised(sessionize_arrow(events, self.cfg.sessionize, n), done)
        closed, still_open, gone = split_chains(pieces, events, watermark, self.gap_us)
        closed = materialised(closed, done)
        modelled = F.col("reason").isNull() & F.col("is_modelled")
        row = one_row(
            closed.agg(
                F.sum(modelled.cast("long")).alias("n"),
                F.sum(F.col("reason").isNotNull().cast("long")).alias("bots"),
                F.count("*").alias("all"),
            )
        )
        n_closed, n_users = int(row["n"] or 0), 0
        writes = StepWrites(self.spark, self.ctx, step)
        tasks: dict[str, Write] = {}
        if n_closed:
            t = time.monotonic()
            fresh = closed.where(modelled)
            keep = ("session_id", "user_id", "start_ts", "end_ts", "n_events")
            fresh_emb = materialised(embed.embed_sessions(self.spark, fresh, self.model.artifact, keep=keep), done)
            t1 = time.monotonic()
            old = read_user_state(self.spark, self.ctx)
            upd = materialised(updated_users(self.model, self.cfg.embed, old, step.batch_id, fresh, fresh_emb), done)
            n_users = upd.count()
            log.info(
                "stream: batch %d: %d sessions closed (sessionized in %.1fs), embedded in %.1fs, %d users' state and segment in %.1fs",
                step.batch_id, n_closed, t - t0, t1 - t, n_users, time.monotonic() - t1,
            )  # fmt: skip
            state, labels = split_updated(step.batch_id, upd)
            tasks.update(writes.users(self.model, fresh_emb, labels, state))
        if row["bots"]:
            tasks.update(writes.runaways(closed))
        if self.cfg.stream.keep_history and row["all"]:
            tasks.update(writes.history(closed, gone))
        still_open = materialised(still_open, done)
        n_left = still_open.count()
        if n_open or n_left:  # (none before and none after: the generation it read is empty too)
            tasks.update(writes.open_events(still_open))
        t2 = time.monotonic()
        wrote = concurrently(tasks)
        log.info("stream: batch %d: %s written in %.1fs", step.batch_id, ", ".join(sorted(wrote)) or "nothing", time.monotonic() - t2)
        for key, written in wrote.items():
            if key in ("live_user_state", "live_segments") and isinstance(written, int):
                self.ctx.wrote(getattr(self.ctx.tables, key), written)
        return n_closed, n_users, n_left

    def _progress(self, step: Step, r: BatchResult, max_ts: dt.datetime | None) -> None:
        row = (r.batch_id, r.input_rows, r.quarantined, r.late, r.new_events, r.closed_sessions, r.users_updated)
        StepWrites(self.spark, self.ctx, step).progress((*[int(x) for x in row], max_ts, r.watermark, float(r.seconds)))
