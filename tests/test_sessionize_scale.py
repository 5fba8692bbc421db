"""The default (arrow) sessionizer against an independent DuckDB implementation of the same
rules, on a generated dataset of over a million events: every session boundary and id
identical. (The window-function engine is held to the arrow engine rule by rule in
test_sessionize.py and on random streams in test_incremental.py.)"""

from __future__ import annotations

import dataclasses

import pytest
from pyspark.sql import functions as F

from seqclust.core.config import SessionizeConfig
from seqclust.datasets.generated import write_dataset
from seqclust.sessionize.stage import sessions_and_runaways

duckdb = pytest.importorskip("duckdb", reason="duckdb (the dev extra) is the independent implementation")

# tight limits so every rule fires many times on generated data: cuts by duration and by
# size, runaway sessions by rate and by size
RULES = SessionizeConfig(
    gap_minutes=30, max_duration_minutes=20, max_events=12, bot_events_per_minute=3, bot_min_events=20, bot_max_events=35
)
KEY = ["session_id", "user_id", "start_ts", "end_ts", "n_events", "tokens", "items", "gaps_s", "reason"]


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    root = tmp_path_factory.mktemp("million")
    res = write_dataset(root, users=22_000, seed=5, bad_rate=0.0, files=4)
    assert res.events >= 1_000_000
    ref = root / "duck.parquet"
    from sessionize_duckdb import sessionize_parquet  # tests/: the oracle is not part of the package

    sessionize_parquet(str(root / "events" / "*.parquet"), str(ref), RULES)
    return root, ref, res.events


def test_the_arrow_engine_matches_duckdb_on_a_million_events(spark, million):
    root, ref, n_events = million
    events = spark.read.parquet(str(root / "events"))
    sessions, runaway = sessions_and_runaways(events, dataclasses.replace(RULES, engine="arrow"))
    ours = sessions.select(*KEY[:-1], F.lit(None).cast("string").alias("reason")).unionByName(
        runaway.select(
            *KEY[:5],
            F.array().cast("array<string>").alias("tokens"),
            F.array().cast("array<string>").alias("items"),
            F.array().cast("array<double>").alias("gaps_s"),
            "reason",
        )
    )
    theirs = spark.read.parquet(str(ref)).select(*KEY)
    stats = theirs.agg(
        F.count("*").alias("rows"),
        F.sum(F.when(F.col("reason").isNull(), F.col("n_events"))).alias("modelled_events"),
        F.sum(F.when(F.col("reason").isNull(), F.col("n_events"))).alias("events_in_sessions"),
        F.sum(F.when(F.col("reason").isNotNull(), F.col("n_events"))).alias("runaway_events"),
        F.count(F.when(F.col("reason") == "too_fast", 1)).alias("too_fast"),
        F.count(F.when(F.col("reason") == "too_many_events", 1)).alias("too_many"),
        F.count(F.when(F.col("n_events") == RULES.max_events, 1)).alias("full_chunks"),
    ).first()
    # every event is in exactly one session or runaway session, and every rule fired
    assert stats["events_in_sessions"] + stats["runaway_events"] == n_events
    assert stats["too_fast"] > 0 and stats["too_many"] > 0 and stats["full_chunks"] > 100
    assert ours.count() == stats["rows"]
    assert ours.exceptAll(theirs).limit(5).collect() == []
    assert theirs.exceptAll(ours).limit(5).collect() == []


def test_both_engines_write_the_same_table_schemas(spark):
    """Switching sessionize.engine on existing tables must not break Delta's schema check
    (session_quarantine.n_events is a bigint whichever engine wrote it)."""
    import datetime as dt

    t0 = dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc)
    rows = [(f"e{i}", "bot" if i < 150 else "u", t0 + dt.timedelta(seconds=i), "view", None, "c", 1.0) for i in range(160)]
    events = spark.createDataFrame(
        rows, "event_id string, user_id string, ts timestamp, event_type string, item_id string, category_id string, price double"
    )

    def types(df):
        return [(f.name, f.dataType.simpleString()) for f in df.schema.fields]

    cfg = SessionizeConfig(bot_events_per_minute=50, bot_min_events=100)
    a_s, a_b = sessions_and_runaways(events, dataclasses.replace(cfg, engine="arrow"))
    s_s, s_b = sessions_and_runaways(events, dataclasses.replace(cfg, engine="sql"))
    assert types(a_s) == types(s_s)
    assert types(a_b) == types(s_b) and dict(types(a_b))["n_events"] == "bigint"
    assert a_b.count() == s_b.count() == 1
