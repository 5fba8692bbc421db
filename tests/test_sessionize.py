import datetime as dt

from seqclust.sessionize import SESSION_COLUMNS, sessionize

T0 = dt.datetime(2026, 10, 1, 10, 0, 0)


def _events(spark, rows):
    return spark.createDataFrame(
        rows, "event_id string, user_id string, ts timestamp, event_type string, item_id string, category_id string, price double"
    )


def test_gap_rule_boundaries_and_arrays(spark):
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
    out = sessionize(_events(spark, rows), gap_minutes=30, min_events=2).collect()
    assert set(out[0].asDict()) == set(SESSION_COLUMNS)
    by = sorted(((r["user_id"], r["start_ts"]), r) for r in out)
    assert [k for k, _ in by] == [("u1", T0), ("u1", T0 + 60 * m + dt.timedelta(seconds=1)), ("u2", T0)]
    s1, s2, s3 = (r for _, r in by)
    assert s1["n_events"] == 2 and s1["end_ts"] == T0 + 30 * m and s1["duration_s"] == 1800.0
    assert s1["tokens"] == ["view:c1", "cart:c1"] and s1["gaps_s"] == [0.0, 1800.0]
    assert s1["event_counts"] == {"view": 1, "cart": 1} and s1["is_modelled"]
    assert s2["n_events"] == 1 and not s2["is_modelled"] and s2["prices"] == [None]
    assert s3["event_types"] == ["search", "purchase"] and s3["items"] == ["", "i9"] and s3["gaps_s"] == [0.0, 120.0]


def test_session_ids_are_deterministic_and_distinct(spark):
    rows = [(f"e{i}", f"u{i % 3}", T0 + dt.timedelta(hours=i), "view", None, "c", None) for i in range(12)]
    a = {(r["user_id"], r["start_ts"]): r["session_id"] for r in sessionize(_events(spark, rows)).collect()}
    b = {(r["user_id"], r["start_ts"]): r["session_id"] for r in sessionize(_events(spark, rows[::-1]).repartition(3)).collect()}
    assert a == b
    assert len(set(a.values())) == 12 and all(len(v) == 32 for v in a.values())
