"""Sessionize: split each user's events into sessions on an inactivity gap.

``sessionize`` is a pure transform from clean events to one row per session with the
session's events as ordered arrays; ``run`` reads ``events`` and writes ``sessions``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


def session_id(user_id: F.Column, start_ts: F.Column) -> F.Column:
    """Deterministic id: a hash of the user and the session's first timestamp (microseconds)."""
    return F.substring(F.sha2(F.concat_ws("|", user_id, F.unix_micros(start_ts).cast("string")), 256), 1, 32)


def sessionize(events: DataFrame, gap_minutes: float = 30.0, min_events: int = 1) -> DataFrame:
    """Group events into sessions: a new session starts after more than ``gap_minutes``.

    Ties on the timestamp are ordered by event type, category, item and event id so the
    result does not depend on partitioning.

    Returns:
        One row per session with SESSION_COLUMNS; ``tokens`` are ``event_type:category``.
    """
    order = ["ts", "event_type", "category_id", "item_id", "event_id"]
    w = Window.partitionBy("user_id").orderBy(*order)
    gap_s = F.unix_micros("ts") - F.unix_micros(F.lag("ts").over(w))
    starts = events.withColumn("_new", F.when(gap_s.isNull() | (gap_s > gap_minutes * 60 * 1e6), 1).otherwise(0))
    numbered = starts.withColumn("_sess", F.sum("_new").over(w.rowsBetween(Window.unboundedPreceding, Window.currentRow)))
    ev = F.struct(
        F.col("ts"),
        F.col("event_type"),
        F.coalesce("category_id", F.lit("")).alias("category_id"),
        F.coalesce("item_id", F.lit("")).alias("item_id"),
        F.coalesce("event_id", F.lit("")).alias("event_id"),
        F.col("price"),
    )
    grouped = numbered.groupBy("user_id", "_sess").agg(F.sort_array(F.collect_list(ev)).alias("e"))
    micros = F.transform("e", lambda x: F.unix_micros(x["ts"]))
    return grouped.select(
        session_id(F.col("user_id"), F.col("e")[0]["ts"]).alias("session_id"),
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


@dataclass(frozen=True)
class SessionizeResult:
    sessions: int
    modelled_sessions: int
    users: int


def run(spark: SparkSession, ctx: RunContext, cfg: SessionizeConfig) -> SessionizeResult:
    """Read this run's ``events``, write its ``sessions``."""
    events = ctx.store.read(spark, ctx.tables.events, ctx.run_id).drop("run_id")
    sessions = sessionize(events, cfg.gap_minutes, cfg.min_events)
    n = ctx.store.write_run(sessions, ctx.tables.sessions, ctx.run_id)
    stats = (
        ctx.store.read(spark, ctx.tables.sessions, ctx.run_id)
        .agg(F.sum(F.col("is_modelled").cast("int")).alias("m"), F.countDistinct("user_id").alias("u"))
        .first()
    )
    log.info("sessionize: %d sessions (%d modelled) for %d users", n, stats["m"] or 0, stats["u"])
    return SessionizeResult(n, int(stats["m"] or 0), int(stats["u"]))
