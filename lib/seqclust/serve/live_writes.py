"""What one step of a stream (a micro-batch or a flush) reads and writes, each write idempotent
on its own so that the step run again after a crash writes the same rows once (the rules are in
``seqclust.serve.live``'s module doc)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.tables import LIVE_PROGRESS, conform
from seqclust.ingest.stage import EVENT_COLUMNS
from seqclust.runtime.context import RunContext
from seqclust.runtime.merge import append_once, merge_replace
from seqclust.runtime.store import one_row
from seqclust.serve.live_state import PLACEMENT
from seqclust.serve.placement import Model

OPEN_COLUMNS = (*EVENT_COLUMNS, "window_start")
Write = Callable[[], object]


@dataclass(frozen=True)
class Step:
    """Where a step starts, from the progress rows of the *other* steps (so a step run again
    after its own progress row was written starts where it did)."""

    batch_id: int
    prev: int | None  # the latest step that finished: its open events are this step's
    seq: int  # how many steps finished: the version of this step's idempotent appends
    seen: dt.datetime | None  # the latest event time of the micro-batches before this one


def _read(spark: SparkSession, ctx: RunContext, key: str) -> DataFrame | None:
    name = getattr(ctx.tables, key)
    return ctx.store.read(spark, name, ctx.run_id) if ctx.store.exists(name) else None


def read_step(spark: SparkSession, ctx: RunContext, batch_id: int) -> Step:
    prog = _read(spark, ctx, "live_progress")
    if prog is None:
        return Step(batch_id, None, 0, None)
    b = F.col("batch_id")
    row = one_row(
        prog.where(~b.eqNullSafe(batch_id)).agg(
            F.count("*").alias("n"),
            F.max_by("batch_id", "finished_at").alias("prev"),
            F.max(F.when((b < batch_id) & (b >= 0), F.col("max_ts"))).alias("seen"),
        )
    )
    return Step(batch_id, None if row["prev"] is None else int(row["prev"]), int(row["n"]), row["seen"])


def read_open_events(spark: SparkSession, ctx: RunContext, step: Step) -> tuple[DataFrame | None, int]:
    """The events of the sessions step ``step.prev`` left open, and how many."""
    table = _read(spark, ctx, "live_open_events") if step.prev is not None else None
    if table is None:
        return None, 0
    rows = table.where(F.col("batch_id") == F.lit(step.prev)).select(*OPEN_COLUMNS)
    return rows, rows.count()


def read_user_state(spark: SparkSession, ctx: RunContext) -> DataFrame | None:
    return _read(spark, ctx, "live_user_state")


@dataclass(frozen=True)
class StepWrites:
    """The writes of one step, as functions to run at once (``runtime.spark.concurrently``)."""

    spark: SparkSession
    ctx: RunContext
    step: Step

    @property
    def _app(self) -> str:  # the idempotent appends' writer id
        return f"seqclust-live:{self.ctx.run_id}"

    def _append(self, df: DataFrame, key: str) -> Write:
        name = getattr(self.ctx.tables, key)
        return lambda: append_once(self.ctx.store, conform(df, key), name, self.ctx.run_id, self._app, self.step.seq)

    def users(self, model: Model, fresh_emb: DataFrame, labels: DataFrame, state: DataFrame) -> dict[str, Write]:
        """The users the step updated: their closed sessions (appended once), state and segment
        (MERGEd by user)."""
        b = F.lit(self.step.batch_id).cast("long").alias("batch_id")
        sess = fresh_emb.join(labels.select("user_id", "cluster_id"), "user_id").select(
            "session_id", "user_id", "start_ts", "end_ts", F.col("n_events").cast("int").alias("n_events"), "embedding", "cluster_id", b
        )
        seg = labels.select(
            "user_id",
            *PLACEMENT,
            F.lit(model.run_id).alias("model_run_id"),
            F.lit(model.artifact.encoder_id).alias("encoder_id"),
            "sessions_counted",
            "last_session_id",
            F.lit(dt.datetime.now(dt.timezone.utc)).cast("timestamp").alias("updated_at"),
            b,
        )
        empty = self.spark.createDataFrame([], T.StructType([T.StructField("user_id", T.StringType())]))

        def by_user(key: str, df: DataFrame) -> Write:
            name = getattr(self.ctx.tables, key)
            return lambda: merge_replace(self.ctx.store, conform(df, key), empty, name, self.ctx.run_id, "user_id")[0]

        return {
            "live_sessions": self._append(sess, "live_sessions"),
            "live_user_state": by_user("live_user_state", state),
            "live_segments": by_user("live_segments", seg),
        }

    def runaways(self, closed: DataFrame) -> dict[str, Write]:
        """The closed runaway sessions, to ``session_quarantine`` (once)."""
        bots = closed.where(F.col("reason").isNotNull()).select(
            "session_id", "user_id", "start_ts", "end_ts", F.col("n_events").cast("long").alias("n_events"), "reason"
        )
        return {"session_quarantine": self._append(bots, "session_quarantine")}

    def history(self, closed: DataFrame, closed_events: DataFrame) -> dict[str, Write]:
        """``stream.keep_history``: the closed sessions and their events (once)."""
        sess = closed.where(F.col("reason").isNull()).drop("reason")
        return {"events": self._append(closed_events, "events"), "sessions": self._append(sess, "sessions")}

    def open_events(self, still_open: DataFrame) -> dict[str, Write]:
        """This step's generation of open events, replacing every one but the one it read."""
        others = f"batch_id <> {int(self.step.prev)}" if self.step.prev is not None else None
        gen = conform(still_open.withColumn("batch_id", F.lit(self.step.batch_id).cast("long")), "live_open_events")
        name, rid = self.ctx.tables.live_open_events, self.ctx.run_id
        return {"live_open_events": lambda: self.ctx.store.write_run(gen, name, rid, extra_predicate=others, count=False)}

    def progress(self, row: tuple[object, ...]) -> None:
        """The step's ``live_progress`` row (``LIVE_PROGRESS`` but ``finished_at`` and
        ``source``), written last: it marks the step finished (appended once: a step run again
        after it was written does not write it twice)."""
        full = (*row, dt.datetime.now(dt.timezone.utc), self.ctx.input_path)
        self._append(self.spark.createDataFrame([full], LIVE_PROGRESS), "live_progress")()
