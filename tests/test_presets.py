"""Each source preset ingests its public sample from ../shared/data (figures from each
PROVENANCE.md); skipped with a reason where that folder is absent (a user's fresh clone)."""

import datetime as dt
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from seqclust.core.config import TablesConfig, load_config, presets
from seqclust.core.errors import ConfigError
from seqclust.ingest import stage as ingest
from seqclust.runtime.context import RunContext
from seqclust.sessionize import stage as sessionize

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"public samples not found at {SHARED_DATA} (CI has them)")

CASES = [
    # preset, input under shared/data, input rows, users (PROVENANCE.md)
    ("taobao_userbehavior", "taobao_userbehavior", 14_321, 157),
    ("rees46", "rees46_multicat", 1_000, 330),
    ("yoochoose_clicks", "yoochoose_rsc15_100k", 83_846, 21_210),  # sessions stand for users
    ("retailrocket", "retailrocket_subset", 97_381, 2_174),
]


def test_presets_are_listed_and_unknown_is_refused():
    assert {"taobao_userbehavior", "yoochoose_clicks", "rees46", "generated", "retailrocket"} <= set(presets())
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="nosuch")


@needs_data
@pytest.mark.parametrize("preset, folder, rows, users", CASES)
def test_preset_ingests_public_sample(spark, store, preset, folder, rows, users):
    cfg = load_config(preset=preset, overrides=["source.max_clock_skew_hours=0"])
    ctx = RunContext(
        run_id=preset,
        store=store,
        tables=TablesConfig(),
        started_at=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
        input_path=str(SHARED_DATA / folder),
    )
    r = ingest.run(spark, ctx, cfg.source)
    assert r.input_rows == rows
    assert r.input_rows == r.clean_rows + r.quarantined_rows + r.duplicate_rows
    events = store.read(spark, "events", preset)
    assert events.select("user_id").distinct().count() == users
    # all timestamps parsed into the dataset's years, event types mapped
    years = {r["y"] for r in events.select(F.year("ts").alias("y")).distinct().collect()}
    assert years <= {2014, 2015, 2017, 2019}
    assert {r["event_type"] for r in events.select("event_type").distinct().collect()} <= {
        "view",
        "search",
        "cart",
        "fav",
        "purchase",
        "other",
    }
    s = sessionize.run(spark, ctx, cfg.sessionize)
    assert s.users == users and s.sessions >= users
