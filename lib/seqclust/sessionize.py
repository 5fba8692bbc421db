"""Sessionize: split each user's events into sessions on an inactivity gap.

``sessionize`` is a pure transform from clean events to one row per session with the
session's events as ordered arrays; ``run`` reads ``events`` and writes ``sessions``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from seqclust.config import SessionizeConfig
from seqclust.context import RunContext

log = logging.getLogger(__name__)

SESSION_COLUMNS = (
    "session_id",
    "user_id",
    "start_ts",
    "end_ts",
    "duration_s",
    "n_events",
    "event_counts",
    "event_types",
    "categories",
    "items",
    "prices",
    "gaps_s",
    "tokens",
    "is_modelled",
)


def session_id(user_id: F.Column, start_ts: F.Column, part: F.Column | None = None) -> F.Column:
    """Deterministic id: a hash of the user, the session's first timestamp (microseconds) and,
    for the pieces of a cut session, the piece's number."""
    parts = [user_id, F.unix_micros(start_ts).cast("string")] + ([part.cast("string")] if part is not None else [])
    return F.substring(F.sha2(F.concat_ws("|", *parts), 256), 1, 32)


ORDER = ("ts", "event_type", "category_id", "item_id", "event_id")


def assign_sessions(events: DataFrame, cfg: SessionizeConfig) -> DataFrame:
    """Tag each event with its session: ``_sess`` (inactivity gap, and midnight when asked),
    ``_bot`` (runaway reason of the whole session, or null) and ``_piece`` (the cut by
    ``max_duration_minutes`` windows from the start, then by ``max_events``).

    Ties on the timestamp are ordered by event type, category, item and event id, so the
    result does not depend on partitioning. One shuffle (by user); the rest are sorts.
    """
    w = Window.partitionBy("user_id").orderBy(*ORDER)
    prev = F.lag("ts").over(w)
    new = prev.isNull() | ((F.unix_micros("ts") - F.unix_micros(prev)) > cfg.gap_minutes * 60 * 1e6)
    if cfg.midnight_split:
        day = F.to_date(F.from_utc_timestamp("ts", cfg.timezone))
        new = new | (day != F.to_date(F.from_utc_timestamp(prev, cfg.timezone)))
    df = events.withColumn("_new", new.cast("int"))
    df = df.withColumn("_sess", F.sum("_new").over(w.rowsBetween(Window.unboundedPreceding, Window.currentRow)))
    ws = Window.partitionBy("user_id", "_sess")
    df = df.withColumn("_n", F.count("*").over(ws)).withColumn("_first", F.min("ts").over(ws)).withColumn("_last", F.max("ts").over(ws))
    minutes = F.greatest((F.unix_micros("_last") - F.unix_micros("_first")) / 6e7, F.lit(1.0))
    df = df.withColumn(
        "_bot",
        F.when((F.col("_n") >= cfg.bot_min_events) & (F.col("_n") / minutes > cfg.bot_events_per_minute), F.lit("too_fast")).when(
            F.col("_n") > cfg.bot_max_events, F.lit("too_many_events")
        ),
    )
    win = F.floor((F.unix_micros("ts") - F.unix_micros("_first")) / (cfg.max_duration_minutes * 60 * 1e6))
    df = df.withColumn("_win", win)
    wp = Window.partitionBy("user_id", "_sess", "_win").orderBy(*ORDER)
    chunk = F.floor((F.row_number().over(wp) - 1) / cfg.max_events)
    return df.withColumn("_piece", F.col("_win") * 1_000_000 + chunk)


def _event_struct() -> F.Column:
    return F.struct(
        F.col("ts"),
        F.col("event_type"),
        F.coalesce("category_id", F.lit("")).alias("category_id"),
        F.coalesce("item_id", F.lit("")).alias("item_id"),
        F.coalesce("event_id", F.lit("")).alias("event_id"),
        F.col("price"),
    )


def build_sessions(assigned: DataFrame, min_events: int = 1) -> DataFrame:
    """One row per (non-runaway) session piece with its events as ordered arrays."""
    grouped = (
        assigned.where(F.col("_bot").isNull())
        .groupBy("user_id", "_sess", "_piece")
        .agg(F.sort_array(F.collect_list(_event_struct())).alias("e"))
    )
    micros = F.transform("e", lambda x: F.unix_micros(x["ts"]))
    # a piece that is not its session's first keeps its number in the id
    piece = F.when(F.col("_piece") != 0, F.col("_piece"))
    return grouped.select(
        session_id(F.col("user_id"), F.col("e")[0]["ts"], piece).alias("session_id"),
        "user_id",
        F.col("e")[0]["ts"].alias("start_ts"),
        F.element_at("e", -1)["ts"].alias("end_ts"),
        ((F.unix_micros(F.element_at("e", -1)["ts"]) - F.unix_micros(F.col("e")[0]["ts"])) / 1e6).alias("duration_s"),
        F.size("e").alias("n_events"),
        F.map_from_entries(
            F.transform(
                F.array_distinct(F.transform("e", lambda x: x["event_type"])),
                lambda t: F.struct(t, F.size(F.filter("e", lambda x: x["event_type"] == t))),
            )
        ).alias("event_counts"),
        F.transform("e", lambda x: x["event_type"]).alias("event_types"),
        F.transform("e", lambda x: x["category_id"]).alias("categories"),
        F.transform("e", lambda x: x["item_id"]).alias("items"),
        F.transform("e", lambda x: x["price"]).alias("prices"),
        F.transform(micros, lambda m, i: F.when(i == 0, F.lit(0.0)).otherwise((m - micros[i - 1]) / 1e6)).alias("gaps_s"),
        F.transform("e", lambda x: F.concat_ws(":", x["event_type"], x["category_id"])).alias("tokens"),
        (F.size("e") >= min_events).alias("is_modelled"),
    )


def runaway_sessions(assigned: DataFrame) -> DataFrame:
    """One row per quarantined (runaway/bot) session, uncut, with its reason."""
    return (
        assigned.where(F.col("_bot").isNotNull())
        .groupBy("user_id", "_sess")
        .agg(F.min("ts").alias("start_ts"), F.max("ts").alias("end_ts"), F.count("*").alias("n_events"), F.first("_bot").alias("reason"))
        .select(session_id(F.col("user_id"), F.col("start_ts")).alias("session_id"), "user_id", "start_ts", "end_ts", "n_events", "reason")
    )


def sessionize(events: DataFrame, cfg: SessionizeConfig | None = None, **overrides: object) -> DataFrame:
    """Clean events -> sessions (SESSION_COLUMNS), runaway sessions left out.

    Args:
        cfg: the rules; keyword overrides (e.g. ``gap_minutes=10``) are applied on top.
    """
    cfg = dataclasses.replace(cfg or SessionizeConfig(), **overrides)
    return build_sessions(assign_sessions(events, cfg), cfg.min_events)


@dataclass(frozen=True)
class SessionizeResult:
    sessions: int
    modelled_sessions: int
    users: int
    quarantined_sessions: int = 0


def run(spark: SparkSession, ctx: RunContext, cfg: SessionizeConfig) -> SessionizeResult:
    """Read this run's ``events``; write its ``sessions`` and ``session_quarantine``."""
    events = ctx.store.read(spark, ctx.tables.events, ctx.run_id).drop("run_id")
    assigned = assign_sessions(events, cfg).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        n_bot = ctx.store.write_run(runaway_sessions(assigned), ctx.tables.session_quarantine, ctx.run_id)
        n = ctx.store.write_run(build_sessions(assigned, cfg.min_events), ctx.tables.sessions, ctx.run_id)
    finally:
        assigned.unpersist()
    stats = (
        ctx.store.read(spark, ctx.tables.sessions, ctx.run_id)
        .agg(F.sum(F.col("is_modelled").cast("int")).alias("m"), F.countDistinct("user_id").alias("u"))
        .first()
    )
    log.info("sessionize: %d sessions (%d modelled) for %d users; %d runaway sessions quarantined", n, stats["m"] or 0, stats["u"], n_bot)
    return SessionizeResult(n, int(stats["m"] or 0), int(stats["u"]), n_bot)
