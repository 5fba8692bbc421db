import json

import numpy as np
import pyarrow.parquet as pq

from seqclust.datasets.generated import BAD_KINDS, PERSONAS, generate_events, write_dataset


def test_same_seed_same_data_and_personas_differ():
    a, pa_, _ = generate_events(300, seed=5)
    b, pb, _ = generate_events(300, seed=5)
    c, _, _ = generate_events(300, seed=6)
    assert a.equals(b) and pa_.equals(pb)
    assert not a.equals(c)
    assert len(PERSONAS) >= 6
    df = a.to_pandas().merge(pa_.to_pandas(), on="user_id")
    assert df["persona"].nunique() == len(PERSONAS)
    # personas differ in behaviour, pace and price (not only in categories)
    buy = df.assign(p=df.event_type == "purchase").groupby("persona")["p"].mean()
    assert buy["decisive_buyer"] > 3 * buy["browser"]
    price = df.groupby("persona")["price"].median()
    assert price["premium"] > 1.5 * price["bargain_hunter"]


def test_sessions_are_planted_with_gaps_over_30_minutes():
    t, _, _ = generate_events(200, seed=1)
    df = t.to_pandas().sort_values(["user_id", "ts"])
    gaps = df.groupby("user_id")["ts"].diff().dt.total_seconds().dropna()
    assert (gaps <= 25 * 60).sum() > 0 and (gaps > 31 * 60 - 1).sum() > 0
    assert ((gaps > 25 * 60 + 1) & (gaps < 31 * 60 - 1)).sum() == 0  # no ambiguous gaps


def test_bad_rate_injects_each_kind_and_duplicates():
    t, _, counts = generate_events(500, seed=2, bad_rate=0.01)
    df = t.to_pandas()
    assert all(counts[k] > 0 for k in BAD_KINDS)
    assert df["user_id"].isna().sum() == counts["null_user_id"]
    assert (df["event_type"] == "hover").sum() == counts["unknown_event_type"]
    assert df["event_id"].duplicated().sum() == counts["duplicates"] > 0


def test_write_formats_with_malformed_lines(tmp_path):
    r = write_dataset(tmp_path / "j", 50, seed=3, bad_rate=0.02, fmt="json", files=2)
    lines = [line for f in sorted((tmp_path / "j" / "events").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(lines) == r.events and r.malformed > 0
    bad = [line for line in lines if not line.endswith("}")]
    assert len(bad) == r.malformed
    json.loads(lines[0])
    r = write_dataset(tmp_path / "c", 50, seed=3, fmt="csv")
    text = (tmp_path / "c" / "events" / "part-00000.csv").read_text().splitlines()
    assert text[0] == "event_id,user_id,ts,event_type,item_id,category_id,price"
    r = write_dataset(tmp_path / "p", 50, seed=3)
    personas = pq.read_table(tmp_path / "p" / "personas")
    assert personas.column_names == ["user_id", "persona"] and personas.num_rows == 50
    assert np.isclose(sum(pq.read_table(f).num_rows for f in (tmp_path / "p" / "events").glob("*.parquet")), r.events)
