"""A source whose schema changes between two incremental windows: a column gained, an
optional column lost, a column retyped, CSV headers reordered. Through the CLI, window by
window: nothing lands under the wrong name, nothing is lost silently, every row is accounted
for, and values that no longer convert are quarantined as bad_type."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from seqclust.app.cli import main

REPO = Path(__file__).resolve().parents[1]
DAY1 = dt.datetime(2026, 11, 1, 10, tzinfo=dt.timezone.utc)
DAY2 = dt.datetime(2026, 11, 2, 10, tzinfo=dt.timezone.utc)
SPLIT = "2026-11-02T00:00:00+00:00"
N = 12  # events per day


def _day(start: dt.datetime, prefix: str) -> dict[str, list]:
    return {
        "user_id": [f"u{i % 3}" for i in range(N)],
        "ts": [start + dt.timedelta(minutes=i) for i in range(N)],
        "event_type": ["view"] * (N - 2) + ["cart", "purchase"],
        "item_id": [f"{prefix}{i}" for i in range(N)],
        "category_id": [f"c{i % 2}" for i in range(N)],
        "price": [10.0 + i for i in range(N)],
    }


def _run(tmp_path: Path, src: Path, run_id: str, capsys, *window: str):
    out = tmp_path / "out"
    args = ["ingest", "--run-id", run_id, *window, "--conf", str(REPO / "conf" / "local.yaml"), "--input", str(src), "--output", str(out)]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    return out


def _windows(spark, tmp_path, src, write_day2, capsys, run_id):
    """Window 1 with day 1's file alone; day 2's file arrives; window 2."""
    _run(tmp_path, src, run_id, capsys, "--until", SPLIT)
    write_day2()
    out = _run(tmp_path, src, run_id, capsys, "--since", SPLIT)
    rec = spark.read.format("delta").load(str(out / "runs")).where(f"run_id = '{run_id}'").first()
    assert rec["rows_input"] == rec["rows_clean"] + rec["rows_quarantined"] + rec["rows_duplicates"] + rec["rows_out_of_window"]
    events = {r["item_id"]: r for r in spark.read.format("delta").load(str(out / "events")).where(f"run_id = '{run_id}'").collect()}
    return rec, events, out


def _parquet(path: Path, cols: dict[str, list], types: dict[str, pa.DataType] | None = None) -> None:
    types = types or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, types.get(k)) for k, v in cols.items()}), path)


TS = pa.timestamp("us", tz="UTC")


def test_parquet_gains_a_column(spark, tmp_path, capsys):
    src = tmp_path / "src"
    _parquet(src / "day1.parquet", _day(DAY1, "a"), {"ts": TS})
    gained = {**_day(DAY2, "b"), "campaign": ["x"] * N}
    rec, events, _ = _windows(spark, tmp_path, src, lambda: _parquet(src / "day2.parquet", gained, {"ts": TS}), capsys, "gain")
    assert rec["rows_clean"] == N and rec["rows_quarantined"] == 0
    assert len(events) == 2 * N and events["b3"]["price"] == 13.0 and events["b3"]["category_id"] == "c1"


def test_parquet_loses_an_optional_column(spark, tmp_path, capsys):
    src = tmp_path / "src"
    _parquet(src / "day1.parquet", _day(DAY1, "a"), {"ts": TS})
    lost = {k: v for k, v in _day(DAY2, "b").items() if k != "category_id"}
    rec, events, _ = _windows(spark, tmp_path, src, lambda: _parquet(src / "day2.parquet", lost, {"ts": TS}), capsys, "lose")
    assert rec["rows_clean"] == N and rec["rows_quarantined"] == 0
    assert events["b3"]["category_id"] is None and events["a3"]["category_id"] == "c1"  # day 1 keeps its values
    assert rec["rows_empty_optional"] == {"category_id": N}  # counted, not silent


def test_parquet_retypes_a_column(spark, tmp_path, capsys):
    src = tmp_path / "src"
    _parquet(src / "day1.parquet", _day(DAY1, "a"), {"ts": TS})
    retyped = _day(DAY2, "b")
    retyped["price"] = [f"{p:.2f}" if i % 4 else "n/a" for i, p in enumerate(retyped["price"])]  # 3 of 12 do not convert
    rec, events, out = _windows(spark, tmp_path, src, lambda: _parquet(src / "day2.parquet", retyped, {"ts": TS}), capsys, "retype")
    assert rec["rows_clean"] == N - 3 and rec["quarantine_reasons"] == {"bad_type": 3}
    assert events["b5"]["price"] == 15.0 and events["a5"]["price"] == 15.0  # the text value cast, day 1's untouched
    q = spark.read.format("delta").load(str(out / "quarantine")).where("run_id = 'retype'").collect()
    assert len(q) == 3 and all(r["reason"] == "bad_type" and '"price":"n/a"' in r["raw"] for r in q)


def test_csv_header_reordered_with_a_column_gained_and_one_lost(spark, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    d1, d2 = _day(DAY1, "a"), _day(DAY2, "b")
    head1 = ["user_id", "ts", "event_type", "item_id", "category_id", "price"]
    lines = [",".join(head1)] + [",".join(str(d1[c][i].isoformat() if c == "ts" else d1[c][i]) for c in head1) for i in range(N)]
    (src / "day1.csv").write_text("\n".join(lines) + "\n")
    head2 = ["price", "item_id", "extra", "ts", "event_type", "user_id"]  # reordered, +extra, -category_id

    def day2():
        rows = [",".join(str(d2[c][i].isoformat() if c == "ts" else d2.get(c, ["zz"] * N)[i]) for c in head2) for i in range(N)]
        (src / "day2.csv").write_text("\n".join([",".join(head2), *rows]) + "\n")

    rec, events, _ = _windows(spark, tmp_path, src, day2, capsys, "csv")
    assert rec["rows_clean"] == N and rec["rows_quarantined"] == 0
    # by name, not by position: day 2's item, price and user are where they belong
    b7 = events["b7"]
    assert b7["price"] == 17.0 and b7["user_id"] == "u1" and b7["category_id"] is None and b7["event_type"] == "view"
    assert events["a7"]["category_id"] == "c1" and rec["rows_empty_optional"] == {"category_id": N}


def test_a_single_csv_file_source_is_read_whole(spark, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    d = _day(DAY1, "a")
    head = list(d)
    (src / "one.csv").write_text("\n".join([",".join(head)] + [",".join(str(d[c][i]) for c in head) for i in range(N)]) + "\n")
    out = _run(tmp_path, src, "one", capsys)
    assert spark.read.format("delta").load(str(out / "events")).where("run_id = 'one'").count() == N
