"""Sessionize: split each user's events into sessions on an inactivity gap.

``sessionize`` is a pure transform from clean events to one row per session with the
session's events as ordered arrays; ``run`` reads ``events`` and writes ``sessions``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from seqclust.core.config import SessionizeConfig
from seqclust.core.errors import InputError
from seqclust.core.tables import conform
from seqclust.runtime.context import RunContext
from seqclust.runtime.merge import merge_replace
from seqclust.runtime.spark import ROWS_CACHE, concurrently, materialised, release
from seqclust.runtime.store import one_row

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
    "root_start_ts",  # start of the uncut session a piece belongs to (= start_ts unless cut)
)


def _runaway_columns() -> list[F.Column]:
    # n_events is a bigint in session_quarantine (as the window engine's count gives it), so
    # both engines write the same table schema
    return [F.col(c) for c in ("session_id", "user_id", "start_ts", "end_ts")] + [F.col("n_events").cast("long"), F.col("reason")]


def session_id(user_id: F.Column, start_ts: F.Column, part: F.Column | None = None) -> F.Column:
    """Deterministic id: a hash of the user, the session's first timestamp (microseconds) and,
    for the pieces of a cut session, the piece's number."""
    parts = [user_id, F.unix_micros(start_ts).cast("string")] + ([part.cast("string")] if part is not None else [])
    return F.substring(F.sha2(F.concat_ws("|", *parts), 256), 1, 32)


def _order() -> list[F.Column]:
    """Event order inside a user: ties on the timestamp broken by type, category, item, event id."""
    return [
        F.col("ts"),
        F.col("event_type"),
        F.coalesce("category_id", F.lit("")),
        F.coalesce("item_id", F.lit("")),
        F.coalesce("event_id", F.lit("")),
        F.col("price"),
    ]


def assign_sessions(events: DataFrame, cfg: SessionizeConfig) -> DataFrame:
    """Tag each event with its session: ``_sess`` (inactivity gap, and midnight when asked),
    ``_bot`` (runaway reason of the whole session, or null) and ``_piece`` (the cut by
    ``max_duration_minutes`` windows from the start, then by ``max_events``).

    Ties on the timestamp are ordered by event type, category, item and event id, so the
    result does not depend on partitioning. One shuffle (by user); the rest are sorts.
    """
    w = Window.partitionBy("user_id").orderBy(*_order())
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
    wp = Window.partitionBy("user_id", "_sess", "_win").orderBy(*_order())
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
        .agg(F.sort_array(F.collect_list(_event_struct())).alias("e"), F.min("_first").alias("root_start_ts"))
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
        "root_start_ts",
    )


def runaway_sessions(assigned: DataFrame) -> DataFrame:
    """One row per quarantined (runaway/bot) session, uncut, with its reason."""
    return (
        assigned.where(F.col("_bot").isNotNull())
        .groupBy("user_id", "_sess")
        .agg(F.min("ts").alias("start_ts"), F.max("ts").alias("end_ts"), F.count("*").alias("n_events"), F.first("_bot").alias("reason"))
        .select(session_id(F.col("user_id"), F.col("start_ts")).alias("session_id"), "user_id", "start_ts", "end_ts", "n_events", "reason")
    )


def _engine_base(events: DataFrame, cfg: SessionizeConfig) -> DataFrame:
    """The engine's intermediate result both outputs derive from: session rows with a
    ``reason`` (arrow) or events tagged with their session (sql)."""
    if cfg.engine == "arrow":
        from seqclust.sessionize.arrow_engine import sessionize_arrow

        return sessionize_arrow(events, cfg)
    return assign_sessions(events, cfg)


def _split(base: DataFrame, cfg: SessionizeConfig) -> tuple[DataFrame, DataFrame]:
    if cfg.engine == "arrow":
        runaway = base.where(F.col("reason").isNotNull()).select(*_runaway_columns())
        return base.where(F.col("reason").isNull()).select(*SESSION_COLUMNS), runaway
    return build_sessions(base, cfg.min_events), runaway_sessions(base)


def sessions_and_runaways(events: DataFrame, cfg: SessionizeConfig) -> tuple[DataFrame, DataFrame]:
    """Clean events -> (sessions as SESSION_COLUMNS, runaway sessions), by ``cfg.engine``."""
    return _split(_engine_base(events, cfg), cfg)


def sessionize(events: DataFrame, cfg: SessionizeConfig | None = None, **overrides: Any) -> DataFrame:
    """Clean events -> sessions (SESSION_COLUMNS), runaway sessions left out.

    Args:
        cfg: the rules; keyword overrides (e.g. ``gap_minutes=10``) are applied on top.
    """
    cfg = dataclasses.replace(cfg or SessionizeConfig(), **overrides)
    return sessions_and_runaways(events, cfg)[0]


def recompute_points(new_events: DataFrame, state: DataFrame, gap_minutes: float) -> DataFrame:
    """Where each user touched by ``new_events`` must be sessionized again: ``(user_id,
    recompute_from)``.

    ``state`` holds the existing sessions and runaway sessions as ``(user_id, root_start_ts,
    end_ts)``. A session can absorb a new event only if it ends less than one gap before the
    user's earliest new event (or later); the recompute starts at the earliest uncut start of
    such a session, else at the earliest new event. The boundary before that point is a gap
    (or midnight) no new event can close, so everything before it stays as it is.
    """
    first_new = new_events.groupBy("user_id").agg(F.min("ts").alias("t_new"))
    gap_us = int(gap_minutes * 60 * 1_000_000)
    touched = (
        state.join(first_new, "user_id")
        .where(F.unix_micros("end_ts") >= F.unix_micros("t_new") - gap_us)
        .groupBy("user_id")
        .agg(F.min("root_start_ts").alias("r"))
    )
    return first_new.join(touched, "user_id", "left").select("user_id", F.least("t_new", F.coalesce("r", "t_new")).alias("recompute_from"))


def incremental_sessions(
    events: DataFrame, new_events: DataFrame, state: DataFrame, cfg: SessionizeConfig
) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Sessions to merge after ``new_events`` joined ``events`` (which already holds them).

    Returns (recomputed sessions, recomputed runaway sessions, recompute points); the rows of
    ``state`` of the same users with ``root_start_ts >= recompute_from`` are the stale ones.
    """
    points = recompute_points(new_events, state, cfg.gap_minutes)
    sessions, runaway = sessions_and_runaways(_redo(events, points), cfg)
    return sessions, runaway, points


def _redo(events: DataFrame, points: DataFrame, since: Any = None) -> DataFrame:
    """The events to sessionize again: each touched user's from their recompute point on.
    ``since``: the earliest recompute point (a bound Delta's file statistics skip files by)."""
    if since is not None:
        events = events.where(F.col("ts") >= F.lit(since))
    return events.join(points, "user_id").where(F.col("ts") >= F.col("recompute_from")).drop("recompute_from")


@dataclass(frozen=True)
class SessionizeResult:
    sessions: int
    modelled_sessions: int
    users: int
    quarantined_sessions: int = 0


def run_incremental(
    spark: SparkSession,
    ctx: RunContext,
    cfg: SessionizeConfig,
    events: DataFrame,
    stats: bool = True,
    first_new: Any = None,
) -> SessionizeResult | None:
    """Sessionize the window's users again and MERGE; ``stats``: count the run's sessions after
    (a stream's micro-batch does not: a scan of every session per batch for a log line);
    ``first_new``: the window's earliest event time when the caller has it (else read here)."""
    new = events.where(F.col("window_start") == F.lit(ctx.window_start))
    parts = []
    if ctx.store.exists(ctx.tables.sessions):
        parts.append(ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).select("user_id", "session_id", "root_start_ts", "end_ts"))
    if ctx.store.exists(ctx.tables.session_quarantine):
        q = ctx.store.read(spark, ctx.tables.session_quarantine, ctx.run_id)
        parts.append(q.select("user_id", "session_id", F.col("start_ts").alias("root_start_ts"), "end_ts"))
    schema = "user_id string, session_id string, root_start_ts timestamp, end_ts timestamp"
    state = parts[0] if parts else spark.createDataFrame([], schema)
    for p in parts[1:]:
        state = state.unionByName(p)
    # only sessions ending less than a gap before the window's first event can absorb one, and
    # only those from the earliest recompute point on are replaced: two bounded reads (Delta
    # skips files by their time statistics), not the run's whole history in every window
    if first_new is None:
        first_new = one_row(new.agg(F.min("ts")))[0]
    near = state
    if first_new is not None:
        near = state.where(F.unix_micros("end_ts") >= F.unix_micros(F.lit(first_new)) - int(cfg.gap_minutes * 60 * 1_000_000))
    # materialised, not cached: the MERGEs below do not resolve the tables behind them again
    done: list[DataFrame] = []
    try:
        points = materialised(recompute_points(new, near, cfg.gap_minutes), done)
        touched = one_row(points.agg(F.count("*").alias("n"), F.min("recompute_from").alias("since")))
        since = touched["since"]
        log.info("sessionize (incremental): %d users touched by the window's events; their sessions are recomputed", touched["n"])
        stale = state.where(F.col("root_start_ts") >= F.lit(since)) if since is not None else state.limit(0)
        stale = stale.join(points, "user_id").where(F.col("root_start_ts") >= F.col("recompute_from")).select("session_id")
        stale = materialised(stale, done)  # read before the MERGEs below change the tables it comes from
        # computed once for both outputs (each read it again before: the sessionization twice)
        base = materialised(_engine_base(_redo(events, points, since), cfg), done)
        out, bots = _split(base, cfg)

        # every row these MERGEs can touch starts at or after the earliest recompute point: a
        # stale one's chain does, and a recomputed one's id is made from its own start
        after = F.col("t.start_ts") >= F.lit(since) if since is not None else None

        def runaways() -> tuple[int, int]:
            if (
                bots.count() == 0
                and ctx.store.exists(ctx.tables.session_quarantine)
                and _none_of_run(spark, ctx, ctx.tables.session_quarantine)
            ):
                return 0, 0  # nothing to insert and nothing of the run's to replace: no MERGE (a commit and a scan)
            return merge_replace(
                ctx.store, conform(bots, "session_quarantine"), stale, ctx.tables.session_quarantine, ctx.run_id, "session_id", after
            )

        def sessions() -> tuple[int, int]:
            return merge_replace(ctx.store, conform(out, "sessions"), stale, ctx.tables.sessions, ctx.run_id, "session_id", after)

        # at once: a crash between the two commits is re-run whole (the same keys replaced)
        merged = concurrently({"session_quarantine": runaways, "sessions": sessions})
        n_bot, _ = merged["session_quarantine"]
        n, n_del = merged["sessions"]
        ctx.wrote(ctx.tables.session_quarantine, n_bot)
        ctx.wrote(ctx.tables.sessions, n)
        log.info("sessionize (incremental): %d sessions written, %d stale sessions removed", n, n_del)
    finally:
        release(done)
    if not stats:
        return None
    row = one_row(
        ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).agg(
            F.count("*").alias("n"), F.sum(F.col("is_modelled").cast("int")).alias("m"), F.countDistinct("user_id").alias("u")
        )
    )
    return SessionizeResult(int(row["n"]), int(row["m"] or 0), int(row["u"]), n_bot)


def _none_of_run(spark: SparkSession, ctx: RunContext, name: str) -> bool:
    """True when table ``name`` holds no row of this run."""
    return ctx.store.read(spark, name, ctx.run_id).isEmpty()


def run(spark: SparkSession, ctx: RunContext, cfg: SessionizeConfig) -> SessionizeResult:
    """Read this run's ``events``; write its ``sessions`` and ``session_quarantine``.

    In incremental mode only the users with events in the window are sessionized again, from
    their recompute point on, and the result is MERGEd (see ``recompute_points``).
    """
    events = ctx.store.read(spark, ctx.tables.events, ctx.run_id).drop("run_id")
    if ctx.incremental:
        if "window_start" not in events.columns:
            raise InputError(f"run {ctx.run_id}: its events were not ingested in incremental mode; ingest with --since/--until first")
        res = run_incremental(spark, ctx, cfg, events)
        assert res is not None
        return res
    # computed once for the two writes (arrow: sessions, ~10x fewer rows than events)
    out = _engine_base(events, cfg).persist(ROWS_CACHE)
    sessions, runaway = _split(out, cfg)
    try:
        log.info("sessionize: %s engine, gap %.0f min", cfg.engine, cfg.gap_minutes)
        n_bot = ctx.write(runaway, "session_quarantine")
        n = ctx.write(sessions, "sessions")
    finally:
        out.unpersist()
    stats = one_row(
        ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).agg(
            F.sum(F.col("is_modelled").cast("int")).alias("m"), F.countDistinct("user_id").alias("u")
        )
    )
    log.info("sessionize: %d sessions (%d modelled) for %d users; %d runaway sessions quarantined", n, stats["m"] or 0, stats["u"], n_bot)
    return SessionizeResult(n, int(stats["m"] or 0), int(stats["u"]), n_bot)
