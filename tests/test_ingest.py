import datetime as dt

import pytest
from pyspark.sql import functions as F

from seqclust.core.config import ColumnsConfig, SourceConfig
from seqclust.core.errors import InputError, MissingColumnError
from seqclust.ingest import stage as ingest
from seqclust.runtime.context import RunContext
from seqclust.runtime.store import read_source, rows_written, table_version

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
COLS = ["event_id", "user_id", "ts", "event_type", "item_id", "category_id", "price"]


def _validate(spark, rows, cfg=None):
    df = spark.createDataFrame(rows, ",".join(f"{c} string" for c in COLS))
    out = ingest.validate(df, cfg or SourceConfig(), NOW).collect()
    return {r["event_id"]: r for r in out}


def test_each_reason_exactly(spark):
    rows = [
        ("ok", "u1", "2026-10-01T10:00:00Z", "view", "i1", "c1", "9.5"),
        ("nouser", None, "2026-10-01T10:00:00Z", "view", "i1", "c1", "1"),
        ("blank", "  ", "2026-10-01T10:00:00Z", "view", "i1", "c1", "1"),
        ("nots", "u1", None, "view", "i1", "c1", "1"),
        ("badts", "u1", "yesterday-ish", "view", "i1", "c1", "1"),
        ("old", "u1", "1999-12-31T23:59:59Z", "view", "i1", "c1", "1"),
        ("future", "u1", "2026-11-03T00:00:00Z", "view", "i1", "c1", "1"),
        ("unknown", "u1", "2026-10-01T10:00:00Z", "hover", "i1", "c1", "1"),
        ("badtype", "u1", "2026-10-01T10:00:00Z", "cart", "i1", "c1", "ten"),
        ("negprice", "u1", "2026-10-01T10:00:00Z", "cart", "i1", "c1", "-3"),
        ("hugeprice", "u1", "2026-10-01T10:00:00Z", "cart", "i1", "c1", "1e9"),
        ("noprice", "u1", "2026-10-01T10:00:00Z", "SEARCH", None, "c1", None),
    ]
    got = _validate(spark, rows)
    assert {k: r["reason"] for k, r in got.items()} == {
        "ok": None,
        "nouser": "null_user_id",
        "blank": "null_user_id",
        "nots": "null_ts",
        "badts": "bad_ts",
        "old": "ts_too_old",
        "future": "ts_in_future",
        "unknown": "unknown_event_type",
        "badtype": "bad_type",
        "negprice": "bad_price",
        "hugeprice": "bad_price",
        "noprice": None,
    }
    assert got["ok"]["ts"] == dt.datetime(2026, 10, 1, 10, 0)  # session time zone is UTC
    assert got["ok"]["price"] == 9.5
    assert got["noprice"]["event_type"] == "search"  # case-insensitive mapping
    assert '"user_id":"u1"' in got["badts"]["raw"] and "yesterday-ish" in got["badts"]["raw"]


def test_unknown_event_type_can_map_to_other(spark):
    got = _validate(spark, [("x", "u1", "2026-10-01T10:00:00Z", "hover", None, "c", None)], SourceConfig(unknown_event_type="other"))
    assert got["x"]["reason"] is None and got["x"]["event_type"] == "other"


@pytest.mark.parametrize(
    "raw, fmt, tz, expected",
    [
        ("1790000000", "auto", "UTC", dt.datetime(2026, 9, 21, 14, 13, 20)),
        ("1790000000000", "auto", "UTC", dt.datetime(2026, 9, 21, 14, 13, 20)),
        ("1790000000", "epoch_s", "UTC", dt.datetime(2026, 9, 21, 14, 13, 20)),
        ("1790000000123", "epoch_ms", "UTC", dt.datetime(2026, 9, 21, 14, 13, 20, 123000)),
        ("2026-10-01 12:00:00", "iso8601", "Europe/Berlin", dt.datetime(2026, 10, 1, 10, 0)),
        ("2026-10-01T12:00:00+02:00", "iso8601", "America/New_York", dt.datetime(2026, 10, 1, 10, 0)),
        ("01/10/2026 12:00", "dd/MM/yyyy HH:mm", "UTC", dt.datetime(2026, 10, 1, 12, 0)),
        ("01/10/2026 12:00", "dd/MM/yyyy HH:mm", "Asia/Tokyo", dt.datetime(2026, 10, 1, 3, 0)),
    ],
)
def test_timestamp_formats(spark, raw, fmt, tz, expected):
    got = _validate(spark, [("x", "u1", raw, "view", None, "c", None)], SourceConfig(ts_format=fmt, timezone=tz))
    assert got["x"]["reason"] is None
    assert got["x"]["ts"] == expected


def test_dedup_by_event_id_keeps_earliest_and_by_key_without_id(spark):
    rows = [
        ("e1", "u1", dt.datetime(2026, 10, 1, 10, 0, 5), "view", "i1", "c1", 1.0),
        ("e1", "u1", dt.datetime(2026, 10, 1, 10, 0, 0), "view", "i1", "c1", 1.0),
        (None, "u2", dt.datetime(2026, 10, 1, 9, 0), "cart", "i2", "c1", 2.0),
        (None, "u2", dt.datetime(2026, 10, 1, 9, 0), "cart", "i2", "c1", 2.0),
        (None, "u2", dt.datetime(2026, 10, 1, 9, 0), "view", "i2", "c1", 2.0),
    ]
    df = spark.createDataFrame(
        rows, "event_id string, user_id string, ts timestamp, event_type string, item_id string, category_id string, price double"
    )
    out = sorted(ingest.dedup(df).collect(), key=lambda r: (r["user_id"], r["event_type"]))
    assert len(out) == 3
    assert out[0]["event_id"] == "e1" and out[0]["ts"] == dt.datetime(2026, 10, 1, 10, 0, 0)
    assert [r["event_type"] for r in out[1:]] == ["cart", "view"]


def _ctx(store, path):
    from seqclust.core.config import TablesConfig

    return RunContext(run_id="ing", store=store, tables=TablesConfig(), started_at=NOW, input_path=str(path))


def test_csv_with_malformed_lines_is_reconciled(spark, store, tmp_path):
    p = tmp_path / "ev.csv"
    p.write_text(
        "uid;when;what;cat\n"
        "u1;2026-10-01T10:00:00Z;view;c1\n"
        "u1;2026-10-01T10:00:00Z;view;c1\n"  # duplicate without event id
        "u2;2026-10-01T10:05:00Z;cart\n"  # too few fields
        "u3;not a time;view;c2\n"
        "u4;2026-10-01T10:07:00Z;purchase;c3\n"
    )
    cfg = SourceConfig(
        format="csv",
        delimiter=";",
        columns=ColumnsConfig(user_id="uid", ts="when", event_type="what", category_id="cat", item_id=None, price=None, event_id=None),
    )
    r = ingest.run(spark, _ctx(store, p), cfg)
    assert (r.input_rows, r.clean_rows, r.quarantined_rows, r.duplicate_rows) == (5, 2, 2, 1)
    assert r.reasons == {"malformed": 1, "bad_ts": 1}
    q = {row["reason"]: row for row in store.read(spark, "quarantine", "ing").collect()}
    assert q["malformed"]["raw"] == "u2;2026-10-01T10:05:00Z;cart"
    assert q["malformed"]["source_file"].endswith("ev.csv")
    assert store.read(spark, "events", "ing").count() == 2


def test_json_lines_with_corrupt_line(spark, store, tmp_path):
    p = tmp_path / "ev.jsonl"
    p.write_text(
        '{"user_id": "u1", "ts": 1790000000, "event_type": "view", "price": 3}\n'
        '{"user_id": "u1", "ts": \n'
        '{"user_id": "u2", "ts": "2026-10-01T10:00:00Z", "event_type": "view", "price": "abc"}\n'
    )
    r = ingest.run(spark, _ctx(store, p), SourceConfig(format="json"))
    assert (r.input_rows, r.clean_rows, r.quarantined_rows, r.duplicate_rows) == (3, 1, 2, 0)
    assert r.reasons == {"malformed": 1, "bad_type": 1}


def test_missing_required_column_is_named(spark, tmp_path):
    p = tmp_path / "ev.csv"
    p.write_text("user,ts,event_type\nu1,2026-10-01T10:00:00Z,view\n")
    with pytest.raises(MissingColumnError, match="required column\\(s\\) user_id not found \\(columns: user, ts, event_type\\)"):
        read_source(spark, str(p), SourceConfig(format="csv"))


def test_missing_path_and_empty_input(spark, store, tmp_path):
    with pytest.raises(InputError, match="path does not exist"):
        read_source(spark, str(tmp_path / "nope"), SourceConfig())
    p = tmp_path / "empty.csv"
    p.write_text("user_id,ts,event_type\n")
    with pytest.raises(InputError, match="no rows to ingest"):
        ingest.run(spark, _ctx(store, p), SourceConfig(format="csv"))


def test_parquet_native_types(spark, store, tmp_path):
    df = spark.createDataFrame(
        [("e1", "u1", dt.datetime(2026, 10, 1, 10), "view", 5, 7, 1.5), ("e2", "u1", None, "view", 5, 7, 1.5)],
        "event_id string, user_id string, ts timestamp, event_type string, item_id int, category_id int, price double",
    )
    df.write.parquet(str(tmp_path / "pq"))
    r = ingest.run(spark, _ctx(store, tmp_path / "pq"), SourceConfig())
    assert (r.clean_rows, r.reasons) == (1, {"null_ts": 1})
    row = store.read(spark, "events", "ing").first()
    assert (row["item_id"], row["category_id"], row["price"]) == ("5", "7", 1.5)
    assert store.read(spark, "events", "ing").where(F.col("ts").isNull()).count() == 0


def test_write_run_counts_rows_and_empty_rewrites(spark, store):
    df = spark.range(5).withColumn("x", F.lit(1))
    assert store.write_run(df, "tbl", "a") == 5
    assert store.write_run(df.limit(2), "tbl", "b") == 2
    # an empty write into a new run: no rows, not the previous commit's count
    assert store.write_run(df.limit(0), "tbl", "c") == 0
    # an empty rewrite of an existing run removes its rows (idempotent replace)
    assert store.write_run(df.limit(0), "tbl", "a") == 0
    assert {r["run_id"]: r["count"] for r in store.read(spark, "tbl").groupBy("run_id").count().collect()} == {"b": 2}


def test_a_single_stage_command_prints_the_rows_it_wrote(spark, tmp_path, capsys):
    """A stage in a process of its own does not count every table again: its summary lists the
    rows it wrote (here ingest: events and quarantine) and says so; valid rows carry no
    source_file (only the quarantine keeps it)."""
    from pathlib import Path

    from seqclust.app.cli import main

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "ev.csv"
    src.write_text("user_id,ts,event_type\nu1,2026-10-01T10:00:00Z,view\nu2,2026-10-01T10:01:00Z,view\nu3,,view\n")
    out = tmp_path / "out"
    args = ["ingest", "--run-id", "one", "--conf", str(repo / "conf" / "local.yaml"), "--input", str(src), "--output", str(out)]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    assert "(rows this command wrote):" in printed and "rows of this run" not in printed
    rows = dict(line.split() for line in printed.splitlines() if line.startswith("    ") and len(line.split()) == 2)
    assert rows == {"quarantine": "1", "events": "2"}
    q = spark.read.format("delta").load(str(out / "quarantine")).first()
    assert q["reason"] == "null_ts" and q["source_file"].endswith("ev.csv")


@pytest.mark.parametrize("cache", ["auto", "none", "disk", "memory"])
def test_every_cache_level_accounts_for_the_same_rows(spark, store, tmp_path, cache):
    cached_before = _our_cached(spark)
    """``source.cache`` changes how ingest keeps its validated rows between its passes, never
    what it counts or writes (auto: none for Parquet, disk for CSV)."""
    p = tmp_path / "ev.csv"
    p.write_text(
        "user_id,ts,event_type\n"
        "u1,2026-10-01T10:00:00Z,view\n"
        "u1,2026-10-01T10:00:00Z,view\n"  # duplicate
        "u2,not a time,view\n"
        "u3,2026-10-01T10:07:00Z,purchase\n"
    )
    cols = ColumnsConfig(item_id=None, category_id=None, price=None, event_id=None)
    r = ingest.run(spark, _ctx(store, p), SourceConfig(format="csv", columns=cols, cache=cache))
    assert (r.input_rows, r.clean_rows, r.quarantined_rows, r.duplicate_rows, r.reasons) == (4, 2, 1, 1, {"bad_ts": 1})
    assert store.read(spark, "events", "ing").count() == 2
    assert _our_cached(spark) == cached_before  # nothing of it stays cached


def _our_cached(spark):
    """Persisted RDDs other than Delta's own cache of table states."""
    rdds = spark.sparkContext._jsc.getPersistentRDDs()
    names = [rdds.get(k).name() for k in rdds.keySet().toArray()]
    return sorted(n or "" for n in names if not (n or "").startswith("Delta Table State"))


def test_cache_level_by_format():
    from pyspark import StorageLevel

    assert ingest._cache_level("auto", "parquet") is None and ingest._cache_level("auto", "delta") is None
    assert ingest._cache_level("auto", "csv") == StorageLevel.DISK_ONLY == ingest._cache_level("auto", "json")
    assert ingest._cache_level("memory", "parquet") == StorageLevel.MEMORY_AND_DISK
    assert ingest._cache_level("none", "csv") is None


def test_a_delta_source_is_read_at_the_version_its_fingerprint_records(spark, store, tmp_path, monkeypatch):
    """Without a cache ingest reads its source once per pass: a Delta source is pinned to the
    version recorded in the run, so a commit between passes cannot change the counts."""
    src = str(tmp_path / "src")
    rows = [("u1", dt.datetime(2026, 10, 1, 10), "view"), ("u2", dt.datetime(2026, 10, 1, 11), "cart")]
    spark.createDataFrame(rows[:1], "user_id string, ts timestamp, event_type string").write.format("delta").save(src)
    spark.createDataFrame(rows[1:], "user_id string, ts timestamp, event_type string").write.format("delta").mode("append").save(src)
    cols = ColumnsConfig(item_id=None, category_id=None, price=None, event_id=None)
    real_read = ingest.read_source
    seen = []

    late = [("u3", dt.datetime(2026, 10, 1, 12), "purchase")]

    def spy(spark_, path, cfg):
        seen.append(cfg.delta_version)
        df = real_read(spark_, path, cfg)
        if cfg.delta_version is not None and seen.count(cfg.delta_version) == 1:
            # a producer commits to the source once ingest has pinned its version and read it
            spark_.createDataFrame(late, "user_id string, ts timestamp, event_type string").write.format("delta").mode("append").save(src)
        return df

    monkeypatch.setattr(ingest, "read_source", spy)
    r = ingest.run(spark, _ctx(store, src), SourceConfig(columns=cols))
    assert spark.read.format("delta").load(src).count() == 3  # the commit did land, as version 2
    assert r.input_version == 1 and (r.input_rows, r.clean_rows) == (2, 2)  # every pass read version 1
    assert seen[-1] == 1  # the DataFrame the passes read is pinned to version 1


def test_rows_written_are_found_behind_more_commits_than_the_history_window(spark, store):
    """Our commit's row count is read from the last commits of the log, the whole history only
    when more commits than the window came after it (a stream's tables gain one a batch)."""
    from seqclust.runtime.store import HISTORY_WINDOW

    df = spark.createDataFrame([(i,) for i in range(7)], "x long")
    store.write_run(df, "t", "a")
    before = table_version(store, "t")
    store.write_run(df.limit(5), "t", "b", count=False)
    for i in range(HISTORY_WINDOW + 2):  # more commits than the window after ours
        store.write_run(df.limit(1), "t", f"c{i}", count=False)
    assert rows_written(store, "t", before, "run_id = 'b'") == 5
    assert rows_written(store, "t", table_version(store, "t") - 3, "run_id = 'b'") == 0  # not among the commits after that
    assert rows_written(store, "t", before - 1, "run_id = 'a'") == 7
