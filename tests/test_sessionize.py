import dataclasses
import datetime as dt

import pytest

from seqclust.sessionize.stage import SESSION_COLUMNS, sessionize

# every rule is checked on both engines: they must agree exactly
pytestmark = pytest.mark.parametrize("engine", ["arrow", "sql"])

T0 = dt.datetime(2026, 10, 1, 10, 0, 0)


def _events(spark, rows):
    return spark.createDataFrame(
        rows, "event_id string, user_id string, ts timestamp, event_type string, item_id string, category_id string, price double"
    )


def test_gap_rule_boundaries_and_arrays(spark, engine):
    m = dt.timedelta(minutes=1)
    rows = [
        # u1: 30 min exactly is the same session; 30 min + 1 s starts a new one
        ("a", "u1", T0, "view", "i1", "c1", 10.0),
        ("b", "u1", T0 + 30 * m, "cart", "i1", "c1", 10.0),
        ("c", "u1", T0 + 60 * m + dt.timedelta(seconds=1), "view", "i2", "c2", None),
        # u2: given out of order
        ("e", "u2", T0 + 2 * m, "purchase", "i9", "c9", 5.0),
        ("d", "u2", T0, "search", None, "c9", None),
    ]
    out = sessionize(_events(spark, rows), engine=engine, gap_minutes=30, min_events=2).collect()
    assert set(out[0].asDict()) == set(SESSION_COLUMNS)
    by = sorted(((r["user_id"], r["start_ts"]), r) for r in out)
    assert [k for k, _ in by] == [("u1", T0), ("u1", T0 + 60 * m + dt.timedelta(seconds=1)), ("u2", T0)]
    s1, s2, s3 = (r for _, r in by)
    assert s1["n_events"] == 2 and s1["end_ts"] == T0 + 30 * m and s1["duration_s"] == 1800.0
    assert s1["tokens"] == ["view:c1", "cart:c1"] and s1["gaps_s"] == [0.0, 1800.0]
    assert s1["event_counts"] == {"view": 1, "cart": 1} and s1["is_modelled"]
    assert s2["n_events"] == 1 and not s2["is_modelled"] and s2["prices"] == [None]
    assert s3["event_types"] == ["search", "purchase"] and s3["items"] == ["", "i9"] and s3["gaps_s"] == [0.0, 120.0]


def test_session_ids_are_deterministic_and_distinct(spark, engine):
    rows = [(f"e{i}", f"u{i % 3}", T0 + dt.timedelta(hours=i), "view", None, "c", None) for i in range(12)]
    a = {(r["user_id"], r["start_ts"]): r["session_id"] for r in sessionize(_events(spark, rows), engine=engine).collect()}
    b = {
        (r["user_id"], r["start_ts"]): r["session_id"]
        for r in sessionize(_events(spark, rows[::-1]).repartition(3), engine=engine).collect()
    }
    assert a == b
    assert len(set(a.values())) == 12 and all(len(v) == 32 for v in a.values())


def _ts_rows(user, minutes, etype="view"):
    return [(f"{user}-{i}", user, T0 + dt.timedelta(minutes=m), etype, f"i{i}", "c", None) for i, m in enumerate(minutes)]


def _starts(df):
    return sorted((r["user_id"], r["start_ts"], r["n_events"]) for r in df.collect())


def test_max_events_and_max_duration_cut_sessions(spark, engine):
    m = dt.timedelta(minutes=1)
    got = _starts(sessionize(_events(spark, _ts_rows("a", [0, 1, 2, 3, 4])), engine=engine, max_events=2))
    assert got == [("a", T0, 2), ("a", T0 + 2 * m, 2), ("a", T0 + 4 * m, 1)]
    got = _starts(sessionize(_events(spark, _ts_rows("b", [0, 5, 9, 12, 25])), engine=engine, max_duration_minutes=10))
    assert got == [("b", T0, 3), ("b", T0 + 12 * m, 1), ("b", T0 + 25 * m, 1)]
    ids = [r["session_id"] for r in sessionize(_events(spark, _ts_rows("a", [0, 1, 2, 3, 4])), engine=engine, max_events=2).collect()]
    assert len(set(ids)) == 3


def test_midnight_split_is_optional_and_uses_the_time_zone(spark, engine):
    rows = [
        ("x1", "u", dt.datetime(2026, 10, 1, 23, 50), "view", None, "c", None),
        ("x2", "u", dt.datetime(2026, 10, 2, 0, 10), "view", None, "c", None),
    ]
    assert len(sessionize(_events(spark, rows), engine=engine).collect()) == 1  # off by default, as in GA4
    assert len(sessionize(_events(spark, rows), engine=engine, midnight_split=True).collect()) == 2
    # 23:50 and 00:10 UTC are 08:50 and 09:10 in Tokyo: same day there
    assert len(sessionize(_events(spark, rows), engine=engine, midnight_split=True, timezone="Asia/Tokyo").collect()) == 1


def test_runaway_sessions_are_quarantined_with_a_reason(spark, engine):
    from seqclust.core.config import SessionizeConfig
    from seqclust.sessionize.stage import sessions_and_runaways

    fast = [(f"f{i}", "bot", T0 + dt.timedelta(seconds=i), "view", None, "c", None) for i in range(120)]  # 60/min for 2 min
    many = _ts_rows("heavy", [i * 0.9 for i in range(40)])  # slow but long
    normal = _ts_rows("human", [0, 3, 7])
    cfg = SessionizeConfig(bot_events_per_minute=50, bot_min_events=100, bot_max_events=30)
    sessions, runaway = sessions_and_runaways(_events(spark, fast + many + normal), dataclasses.replace(cfg, engine=engine))
    bad = {r["user_id"]: (r["reason"], r["n_events"]) for r in runaway.collect()}
    assert bad == {"bot": ("too_fast", 120), "heavy": ("too_many_events", 40)}
    assert [r["user_id"] for r in sessions.collect()] == ["human"]


def test_one_user_with_a_million_events_is_one_runaway_session(spark, engine):
    """A scraper: 1M events, one every 50 ms, never idle. It must neither sink the job nor
    reach modelling: one runaway session with every event counted, next to a normal user."""
    from pyspark.sql import functions as F

    from seqclust.core.config import SessionizeConfig
    from seqclust.sessionize.stage import sessions_and_runaways

    n = 1_000_000 if engine == "arrow" else 200_000  # the reference engine: the rule, at less cost
    bot = spark.range(n).select(
        F.concat(F.lit("b"), F.col("id").cast("string")).alias("event_id"),
        F.lit("scraper").alias("user_id"),
        F.timestamp_micros(F.lit(int(T0.replace(tzinfo=dt.timezone.utc).timestamp() * 1e6)) + F.col("id") * 50_000).alias("ts"),
        F.lit("view").alias("event_type"),
        (F.col("id") % 5000).cast("string").alias("item_id"),
        F.lit("c").alias("category_id"),
        F.lit(None).cast("double").alias("price"),
    )
    events = bot.unionByName(_events(spark, _ts_rows("human", [0, 3, 7])))
    sessions, runaway = sessions_and_runaways(events, SessionizeConfig(engine=engine))
    assert [(r["user_id"], r["reason"], r["n_events"]) for r in runaway.collect()] == [("scraper", "too_fast", n)]
    assert [(r["user_id"], r["n_events"]) for r in sessions.collect()] == [("human", 3)]
