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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.config import PipelineConfig
from seqclust.core.tables import LIVE_PROGRESS, conform
from seqclust.ingest import stage as ingest
from seqclust.represent import embed
from seqclust.runtime.context import RunContext
from seqclust.runtime.merge import append_once, merge_replace
from seqclust.runtime.spark import concurrently, materialised, release
from seqclust.runtime.store import one_row
from seqclust.serve.live_state import PLACEMENT, split_updated, updated_users
from seqclust.serve.placement import Model
from seqclust.sessionize.arrow_engine import sessionize_arrow

log = logging.getLogger(__name__)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
FLUSH_BATCH = -1  # the progress row of a --flush (closes every open session)
OPEN_COLUMNS = (*ingest.EVENT_COLUMNS, "window_start")


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


@dataclass(frozen=True)
class Step:
    """Where a step (micro-batch or flush) starts, from the progress rows of the *other* steps
    (so a step run again after its own progress row was written starts where it did)."""

    prev: int | None  # the latest step that finished: its open events are this step's
    seq: int  # how many steps finished: the version of this step's idempotent appends
    seen: dt.datetime | None  # the latest event time of the micro-batches before this one


@dataclass
class Closed:
    """What closing a step's chains found and wrote."""

    sessions: int = 0  # modelled sessions closed (embedded and counted)
    users: int = 0
    open_events: int = 0


class LiveScorer:
    """Processes micro-batches for one stream run id (``ctx.run_id``) against one model."""

    def __init__(self, spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, model: Model):
        self.spark, self.cfg, self.ctx, self.model = spark, cfg, ctx, model
        self.lateness = dt.timedelta(minutes=cfg.stream.allowed_lateness_minutes)
        self.gap_us = int(cfg.sessionize.gap_minutes * 60 * 1_000_000)

    def _read(self, key: str) -> DataFrame | None:
        name = getattr(self.ctx.tables, key)
        return self.ctx.store.read(self.spark, name, self.ctx.run_id) if self.ctx.store.exists(name) else None

    def step(self, batch_id: int) -> Step:
        prog = self._read("live_progress")
        if prog is None:
            return Step(None, 0, None)
        b = F.col("batch_id")
        row = one_row(
            prog.where(~b.eqNullSafe(batch_id)).agg(
                F.count("*").alias("n"),
                F.max_by("batch_id", "finished_at").alias("prev"),
                F.max(F.when((b < batch_id) & (b >= 0), F.col("max_ts"))).alias("seen"),
            )
        )
        return Step(None if row["prev"] is None else int(row["prev"]), int(row["n"]), row["seen"])

    def open_events(self, step: Step) -> tuple[DataFrame | None, int]:
        """The events of the sessions step ``step.prev`` left open, and how many."""
        table = self._read("live_open_events") if step.prev is not None else None
        if table is None:
            return None, 0
        rows = table.where(F.col("batch_id") == F.lit(step.prev)).select(*OPEN_COLUMNS)
        return rows, rows.count()

    # -- one micro-batch -----------------------------------------------------------------

    def process(self, raw: DataFrame, batch_id: int) -> BatchResult:
        """Ingest, sessionize, close, embed and assign one micro-batch (see the module doc)."""
        t0 = time.monotonic()
        step = self.step(batch_id)
        late_before = step.seen - self.lateness if step.seen is not None else None
        ctx = dataclasses.replace(self.ctx, since=window_key(batch_id), written={})
        open_, n_open = self.open_events(step)
        done: list[DataFrame] = []
        held: dict[str, Any] = {}
        key = F.lit(ctx.window_start).cast("timestamp")

        def sink(valid: DataFrame) -> int:
            rows = valid.withColumn("window_start", key)
            events = materialised(ingest.dedup(rows.unionByName(open_) if open_ is not None else rows, ("window_start",)), done)
            row = one_row(events.agg(F.count("*").alias("n"), F.max(F.when(F.col("window_start") == key, F.col("ts"))).alias("m")))
            held.update(events=events, max_new=row["m"])
            return int(row["n"]) - n_open

        try:
            raw = raw.persist(StorageLevel.MEMORY_AND_DISK)
            try:
                n_input = raw.count()
                res = None
                if n_input:
                    salt = self.cfg.privacy.salt()
                    res = ingest.ingest_rows(
                        self.spark, ctx, raw, self.cfg.source, n_input, None, salt, late_before, skip_empty=True, clean_sink=sink
                    )
            finally:
                raw.unpersist()
            batch_max = held.get("max_new")
            seen_now = max([t for t in (step.seen, batch_max) if t is not None], default=None)
            watermark = seen_now - self.lateness if seen_now is not None else None
            events = held.get("events", open_)
            closed = self.close(batch_id, step, events, watermark, done, n_open)
        finally:
            release(done)
        r = BatchResult(
            batch_id,
            n_input,
            res.quarantined_rows if res else 0,
            res.reasons.get(ingest.LATE, 0) if res else 0,
            res.clean_rows if res else 0,
            closed.sessions,
            closed.users,
            watermark,
            time.monotonic() - t0,
        )
        self._progress(r, batch_max if batch_max is not None else step.seen)
        log.info(
            "stream: batch %d: %d input rows, %d quarantined (%d late), %d new events, %d sessions closed, %d users updated, "
            "%d events in open sessions, watermark %s, %.1fs",
            batch_id, r.input_rows, r.quarantined, r.late, r.new_events, r.closed_sessions, r.users_updated, closed.open_events,
            r.watermark.isoformat() if r.watermark else "-", r.seconds,
        )  # fmt: skip
        return r

    def flush(self, batch_id: int | None = None) -> BatchResult:
        """Close every open session (the end of the log) and assign their users. Each flush has
        its own negative batch id (-1, -2, ...: one more than the flushes that completed), so a
        flush re-run after a crash is the same batch and a later flush is not."""
        t0 = time.monotonic()
        if batch_id is None:
            prog = self._read("live_progress")
            done_flushes = prog.where(F.col("batch_id") < 0).select("batch_id").distinct().count() if prog is not None else 0
            batch_id = FLUSH_BATCH - done_flushes
        step = self.step(batch_id)
        open_, n_open = self.open_events(step)
        done: list[DataFrame] = []
        try:
            closed = self.close(batch_id, step, open_, None, done, n_open)
        finally:
            release(done)
        r = BatchResult(batch_id, 0, 0, 0, 0, closed.sessions, closed.users, None, time.monotonic() - t0)
        self._progress(r, None)
        log.info("stream: flush: %d sessions closed, %d users updated, %.1fs", r.closed_sessions, r.users_updated, r.seconds)
        return r

    def close(
        self, batch_id: int, step: Step, events: DataFrame | None, watermark: dt.datetime | None, done: list[DataFrame], n_open: int
    ) -> Closed:
        """Sessionize ``events`` (the open sessions' and the new ones), close the chains that
        ended a gap before ``watermark`` (None: every chain, a flush), embed and assign the
        closed modelled sessions and write every table of the step (see the module doc)."""
        out = Closed()
        if events is None:
            return out
        t0 = time.monotonic()
        n = int(self.spark.conf.get("spark.sql.shuffle.partitions") or 4)
        pieces = materialised(sessionize_arrow(events, self.cfg.sessionize, n), done)
        chains = pieces.groupBy("user_id", "root_start_ts").agg(F.max("end_ts").alias("_end"))
        ended = F.lit(True) if watermark is None else F.unix_micros("_end") < F.unix_micros(F.lit(watermark)) - self.gap_us
        chains = chains.withColumn("_closed", ended)
        # a user's chains are disjoint in time: the events from the first open chain's start on are open
        open_from = chains.where(~F.col("_closed")).groupBy("user_id").agg(F.min("root_start_ts").alias("_from"))
        with_from = events.join(open_from, "user_id", "left")
        still_open = with_from.where(F.col("ts") >= F.col("_from")).select(*OPEN_COLUMNS)
        closed = materialised(
            pieces.join(chains.where("_closed").select("user_id", "root_start_ts"), ["user_id", "root_start_ts"], "left_semi"), done
        )
        modelled = F.col("reason").isNull() & F.col("is_modelled")
        row = one_row(
            closed.agg(
                F.sum(modelled.cast("long")).alias("n"),
                F.sum(F.col("reason").isNotNull().cast("long")).alias("runaway"),
                F.count("*").alias("all"),
            )
        )
        fresh = closed.where(modelled)
        out.sessions = int(row["n"] or 0)
        tasks: dict[str, Callable[[], object]] = {}
        app = f"seqclust-live:{self.ctx.run_id}"
        store, rid, tables = self.ctx.store, self.ctx.run_id, self.ctx.tables
        if out.sessions:
            t = time.monotonic()
            art = self.model.artifact
            fresh_emb = materialised(
                embed.embed_sessions(self.spark, fresh, art, keep=("session_id", "user_id", "start_ts", "end_ts", "n_events")), done
            )
            t1 = time.monotonic()
            upd = materialised(updated_users(self.model, self.cfg.embed, self._read("live_user_state"), batch_id, fresh, fresh_emb), done)
            out.users = upd.count()
            log.info(
                "stream: batch %d: %d sessions closed (found in %.1fs), embedded in %.1fs, %d users' state and segment in %.1fs",
                batch_id, out.sessions, t - t0, t1 - t, out.users, time.monotonic() - t1,
            )  # fmt: skip
            state, labels = split_updated(batch_id, upd)
            tasks.update(self._user_writes(batch_id, fresh_emb, labels, state, app, step.seq))
        if row["runaway"]:
            bots = closed.where(F.col("reason").isNotNull()).select(
                "session_id", "user_id", "start_ts", "end_ts", F.col("n_events").cast("long").alias("n_events"), "reason"
            )
            tasks["session_quarantine"] = lambda: append_once(
                store, conform(bots, "session_quarantine"), tables.session_quarantine, rid, app, step.seq
            )
        if self.cfg.stream.keep_history and row["all"]:
            gone = with_from.where(F.col("_from").isNull() | (F.col("ts") < F.col("_from"))).select(*OPEN_COLUMNS)
            sess = closed.where(F.col("reason").isNull()).drop("reason")
            tasks["events"] = lambda: append_once(store, conform(gone, "events"), tables.events, rid, app, step.seq)
            tasks["sessions"] = lambda: append_once(store, conform(sess, "sessions"), tables.sessions, rid, app, step.seq)
        keep = materialised(still_open, done)
        out.open_events = keep.count()
        if n_open or out.open_events:  # (none before and none after: the generation it read is empty too)
            # this step's generation replaces every one but the generation it read
            others = f"batch_id <> {int(step.prev)}" if step.prev is not None else None
            gen = keep.withColumn("batch_id", F.lit(batch_id).cast("long"))
            tasks["live_open_events"] = lambda: store.write_run(
                conform(gen, "live_open_events"), tables.live_open_events, rid, extra_predicate=others, count=False
            )
        wrote = concurrently(tasks)
        for k in ("live_user_state", "live_segments"):
            if k in wrote:
                self.ctx.wrote(getattr(tables, k), int(wrote[k]))  # type: ignore[call-overload]
        return out

    def _user_writes(
        self, batch_id: int, fresh_emb: DataFrame, labels: DataFrame, state: DataFrame, app: str, version: int
    ) -> dict[str, Callable[[], object]]:
        """The writes of the users a step updated: their closed sessions (appended once), state
        and segment (MERGEd by user)."""
        store, rid, tables = self.ctx.store, self.ctx.run_id, self.ctx.tables
        now = dt.datetime.now(dt.timezone.utc)
        sess = fresh_emb.join(labels.select("user_id", "cluster_id"), "user_id").select(
            "session_id",
            "user_id",
            "start_ts",
            "end_ts",
            F.col("n_events").cast("int").alias("n_events"),
            "embedding",
            "cluster_id",
            F.lit(batch_id).cast("long").alias("batch_id"),
        )
        seg = labels.select(
            "user_id",
            *PLACEMENT,
            F.lit(self.model.run_id).alias("model_run_id"),
            F.lit(self.model.artifact.encoder_id).alias("encoder_id"),
            "sessions_counted",
            "last_session_id",
            F.lit(now).cast("timestamp").alias("updated_at"),
            F.lit(batch_id).cast("long").alias("batch_id"),
        )
        empty = self.spark.createDataFrame([], T.StructType([T.StructField("user_id", T.StringType())]))

        def by_user(key: str, df: DataFrame) -> Callable[[], int]:
            return lambda: merge_replace(store, conform(df, key), empty, getattr(tables, key), rid, "user_id")[0]

        return {
            "live_sessions": lambda: append_once(store, conform(sess, "live_sessions"), tables.live_sessions, rid, app, version),
            "live_user_state": by_user("live_user_state", state),
            "live_segments": by_user("live_segments", seg),
        }

    def _progress(self, r: BatchResult, max_ts: dt.datetime | None) -> None:
        row = (
            int(r.batch_id),
            int(r.input_rows),
            int(r.quarantined),
            int(r.late),
            int(r.new_events),
            int(r.closed_sessions),
            int(r.users_updated),
            max_ts,
            r.watermark,
            float(r.seconds),
            dt.datetime.now(dt.timezone.utc),
            self.ctx.input_path,
        )
        df = self.spark.createDataFrame([row], LIVE_PROGRESS)
        empty = self.spark.createDataFrame([], T.StructType([T.StructField("batch_id", T.LongType())]))
        merge_replace(self.ctx.store, conform(df, "live_progress"), empty, self.ctx.tables.live_progress, self.ctx.run_id, "batch_id")
