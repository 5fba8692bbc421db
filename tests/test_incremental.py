"""Incremental sessionization: a run over day 1 then a run over day 2 gives exactly the sessions
of one run over both days, including sessions that span the split."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from seqclust.core.config import SessionizeConfig
from seqclust.sessionize.stage import incremental_sessions, sessions_and_runaways

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis (the dev extra) drives the property test")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc)
SCHEMA = "event_id string, user_id string, ts timestamp, event_type string, item_id string, category_id string, price double"
# small limits so that cuts and runaway sessions happen in small random streams
RULES = SessionizeConfig(
    gap_minutes=30, max_duration_minutes=90, max_events=6, bot_events_per_minute=4, bot_min_events=8, bot_max_events=14
)
KEY = ["session_id", "user_id", "start_ts", "end_ts", "n_events", "tokens", "root_start_ts"]
BOT_KEY = ["session_id", "user_id", "start_ts", "end_ts", "n_events", "reason"]

# a user's stream: bursts (sessions) of events a few minutes apart, separated by pauses that
# are sometimes shorter and sometimes longer than the 30-minute gap
burst = st.lists(st.integers(0, 6), min_size=1, max_size=18)  # minutes between events
stream = st.lists(st.tuples(st.integers(5, 400), burst), min_size=1, max_size=5)  # (pause minutes, burst)


def _events(spark, users):
    rows = []
    for u, bursts in enumerate(users):
        t = T0 + dt.timedelta(minutes=13 * u)
        for pause, gaps in bursts:
            t += dt.timedelta(minutes=pause)
            for j, g in enumerate(gaps):
                t += dt.timedelta(minutes=g)
                rows.append((f"e{len(rows)}", f"u{u}", t, ("view", "cart", "purchase")[j % 3], f"i{j % 4}", f"c{u % 2}", None))
    return spark.createDataFrame(rows, SCHEMA), rows


def _apply(state_s, state_b, events, new, cfg):
    """state after ``new`` (already in ``events``) is merged, as the Delta MERGE does it."""
    state = state_s.select("user_id", "session_id", "root_start_ts", "end_ts").unionByName(
        state_b.select("user_id", "session_id", F.col("start_ts").alias("root_start_ts"), "end_ts")
    )
    s, b, points = incremental_sessions(events, new, state, cfg)
    stale = state.join(points, "user_id").where(F.col("root_start_ts") >= F.col("recompute_from")).select("session_id")
    keep_s = state_s.join(stale, "session_id", "left_anti").join(s.select("session_id"), "session_id", "left_anti")
    keep_b = state_b.join(stale, "session_id", "left_anti").join(b.select("session_id"), "session_id", "left_anti")
    return keep_s.select(*KEY).unionByName(s.select(*KEY)), keep_b.select(*BOT_KEY).unionByName(b.select(*BOT_KEY))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(users=st.lists(stream, min_size=1, max_size=4), split_at=st.floats(0.0, 1.0), engine=st.sampled_from(["arrow", "sql"]))
def test_incremental_equals_full_recompute(spark, users, split_at, engine):
    import dataclasses

    cfg = dataclasses.replace(RULES, engine=engine)
    events, rows = _events(spark, users)
    times = sorted(r[2] for r in rows)
    split = times[min(int(split_at * len(times)), len(times) - 1)]  # often inside a session
    full_s, full_b = sessions_and_runaways(events, cfg)
    day1 = events.where(F.col("ts") < split)
    day2 = events.where(F.col("ts") >= split)
    s1, b1 = sessions_and_runaways(day1, cfg)
    got_s, got_b = _apply(s1, b1, events, day2, cfg)
    want_s, want_b = full_s.select(*KEY), full_b.select(*BOT_KEY)
    assert sorted(got_s.collect()) == sorted(want_s.collect())
    assert sorted(got_b.collect()) == sorted(want_b.collect())


def test_incremental_runs_through_delta_merge_equal_a_full_run(spark, tmp_path, capsys):
    """The CLI path: ingest + sessionize with --until then --since on one run id (events and
    sessions MERGEd), against one full run; a rerun of a window changes nothing."""
    from seqclust.app.cli import main
    from seqclust.datasets.generated import write_dataset

    data = tmp_path / "gen"
    write_dataset(data, users=70, seed=4, bad_rate=0.01)
    ts = spark.read.parquet(str(data / "events")).where("ts IS NOT NULL").agg(F.percentile_approx("ts", 0.5).alias("m")).first()["m"]
    split = ts.replace(tzinfo=dt.timezone.utc).isoformat()
    out = tmp_path / "out"
    base = ["--conf", str(REPO / "conf" / "local.yaml"), "--input", str(data / "events"), "--output", str(out)]

    def stages(run_id, *window):
        for stage in ("ingest", "sessionize"):
            assert main([stage, "--run-id", run_id, *window, *base]) == 0, capsys.readouterr().err[-2000:]

    stages("full")
    stages("inc", "--until", split)
    first = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'inc'").first()
    stages("inc", "--since", split)
    second = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'inc'").first()
    full = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'full'").first()

    def table(name, run_id, cols):
        return spark.read.format("delta").load(str(out / name)).where(F.col("run_id") == run_id).select(*cols)

    def same(run_a, run_b):
        for name, cols in (("sessions", KEY), ("session_quarantine", BOT_KEY)):
            a, b = table(name, run_a, cols), table(name, run_b, cols)
            assert a.count() == b.count() and a.exceptAll(b).count() == 0 and b.exceptAll(a).count() == 0, name

    same("inc", "full")
    # each window's accounting adds up; together they hold every clean event exactly once
    for rec in (first, second):
        assert rec["rows_input"] == rec["rows_clean"] + rec["rows_quarantined"] + rec["rows_duplicates"] + rec["rows_out_of_window"]
    assert first["rows_clean"] + second["rows_clean"] == full["rows_clean"]
    assert table("events", "inc", ["event_id"]).count() == full["rows_clean"]
    assert second["window_since"] is not None and first["window_until"] is not None

    # rerunning the second window: nothing new, sessions unchanged
    stages("inc", "--since", split)
    again = spark.read.format("delta").load(str(out / "runs")).where("run_id = 'inc'").first()
    assert again["rows_clean"] == 0 and again["rows_duplicates"] == second["rows_clean"] + second["rows_duplicates"]
    same("inc", "full")

    capsys.readouterr()
    assert main(["ingest", "--run-id", "inc", "--since", "tomorrow", *base]) == 2
    assert "--since: 'tomorrow' is not an ISO-8601" in capsys.readouterr().err
