"""File-level bad input: what real exports look like on a bad day. Each case is read
through ingest into Delta; every row is accounted for, and nothing is silently wrong."""

from __future__ import annotations

import datetime as dt
import gzip

import pytest

from seqclust.core.config import SourceConfig, TablesConfig
from seqclust.core.errors import InputError
from seqclust.ingest import stage as ingest
from seqclust.runtime.context import RunContext

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
HEAD = "user_id,ts,event_type,category_id,price"


def _ingest(spark, store, path, cfg=None):
    ctx = RunContext(run_id="bad", store=store, tables=TablesConfig(), started_at=NOW, input_path=str(path))
    r = ingest.run(spark, ctx, cfg or SourceConfig(format="csv"))
    assert r.input_rows == r.clean_rows + r.quarantined_rows + r.duplicate_rows
    events = {x["user_id"]: x for x in store.read(spark, "events", "bad").collect()}
    return r, events


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column_name(spark, store, tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(("\ufeff" + HEAD + "\nu1,2026-10-01T10:00:00Z,view,c1,2.5\n").encode("utf-8"))
    r, events = _ingest(spark, store, p)
    assert r.clean_rows == 1 and events["u1"]["price"] == 2.5


def test_crlf_line_ends_leave_no_carriage_return_in_the_last_column(spark, store, tmp_path):
    p = tmp_path / "crlf.csv"
    p.write_bytes((HEAD + "\r\nu1,2026-10-01T10:00:00Z,view,c1,2.5\r\nu2,2026-10-01T10:01:00Z,cart,c2,3\r\n").encode())
    r, events = _ingest(spark, store, p)
    assert r.clean_rows == 2 and r.quarantined_rows == 0 and events["u2"]["price"] == 3.0


def test_quoted_delimiters_stay_inside_their_field(spark, store, tmp_path):
    p = tmp_path / "quoted.csv"
    p.write_text(HEAD + '\nu1,2026-10-01T10:00:00Z,view,"shoes, red",2.5\n')
    r, events = _ingest(spark, store, p)
    assert r.clean_rows == 1 and events["u1"]["category_id"] == "shoes, red" and events["u1"]["price"] == 2.5


def test_embedded_newlines_in_quoted_fields(spark, store, tmp_path):
    p = tmp_path / "multiline.csv"
    p.write_text(HEAD + '\nu1,2026-10-01T10:00:00Z,view,"two\nlines",2.5\nu2,2026-10-01T10:01:00Z,view,c2,1\n')
    r, events = _ingest(spark, store, p, SourceConfig(format="csv", multiline=True))
    assert r.clean_rows == 2 and events["u1"]["category_id"] == "two\nlines"
    # without source.multiline the record is split: quarantined as malformed, counted, never merged into a neighbour
    r, events = _ingest(spark, store, p)
    assert events["u2"]["category_id"] == "c2" and "u1" not in events and r.reasons.get("malformed", 0) >= 1


def test_timestamps_with_mixed_zones_in_one_column(spark, store, tmp_path):
    p = tmp_path / "zones.csv"
    p.write_text(
        HEAD + "\nu1,2026-10-01T10:00:00Z,view,c,1\nu2,2026-10-01T12:00:00+02:00,view,c,1\nu3,2026-10-01 10:00:00,view,c,1\n"
        "u4,2026-10-01T06:00:00-0400,view,c,1\n"
    )
    r, events = _ingest(spark, store, p)
    want = dt.datetime(2026, 10, 1, 10)
    assert r.clean_rows == 4
    assert {u: e["ts"].replace(tzinfo=None) for u, e in events.items()} == {u: want for u in ("u1", "u2", "u3", "u4")}


def test_an_event_type_column_that_is_all_null_stops_with_one_line(spark, store, tmp_path):
    p = tmp_path / "notype.csv"
    p.write_text(HEAD + "\nu1,2026-10-01T10:00:00Z,,c,1\nu2,2026-10-01T10:00:00Z,,c,1\n")
    with pytest.raises(InputError, match=r"all 2 rows were quarantined \(\{'unknown_event_type': 2\}\)"):
        _ingest(spark, store, p)


def test_a_truncated_gzip_file_is_named(spark, store, tmp_path):
    body = (HEAD + "\n" + "".join(f"u{i},2026-10-01T10:00:00Z,view,c,1\n" for i in range(5000))).encode()
    p = tmp_path / "cut.csv.gz"
    p.write_bytes(gzip.compress(body)[:-200])
    with pytest.raises(InputError, match=r"truncated or corrupt .*cut\.csv\.gz"):
        _ingest(spark, store, p)


def test_latin1_bytes_in_a_utf8_file_are_quarantined_not_mangled(spark, store, tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes(
        (HEAD + "\nu1,2026-10-01T10:00:00Z,view,").encode() + "café".encode("latin-1") + b",1\nu2,2026-10-01T10:00:00Z,view,tea,1\n"
    )
    r, events = _ingest(spark, store, p)
    assert r.reasons == {"bad_encoding": 1} and set(events) == {"u2"}
    # read with the file's real encoding, the value is right
    r, events = _ingest(spark, store, p, SourceConfig(format="csv", encoding="ISO-8859-1"))
    assert r.clean_rows == 2 and events["u1"]["category_id"] == "café"


def test_a_delta_input_at_a_vacuumed_version_is_refused_with_one_line(spark, store, tmp_path):
    """Time travel (source.delta_version): a kept version is read as it was; a version whose
    files VACUUM removed, or one the table never had, stops before any job with one line."""
    import pandas as pd

    src = str(tmp_path / "src")
    for day, users in ((1, ["u1", "u2"]), (2, ["u3"])):
        rows = pd.DataFrame({"user_id": users, "ts": [f"2026-10-0{day}T10:00:00Z"] * len(users), "event_type": ["view"] * len(users)})
        spark.createDataFrame(rows).write.format("delta").mode("overwrite").save(src)
    r, events = _ingest(spark, store, src, SourceConfig(format="delta", delta_version=0))
    assert set(events) == {"u1", "u2"} and r.input_version == 0
    with pytest.raises(InputError, match="Delta version 7 cannot be read"):
        _ingest(spark, store, src, SourceConfig(format="delta", delta_version=7))
    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    try:
        spark.sql(f"VACUUM delta.`{src}` RETAIN 0 HOURS")
    finally:
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
    with pytest.raises(InputError, match=r"Delta version 0 refers to (\d+) of its \1 data files that no longer exist \(removed by VACUUM"):
        _ingest(spark, store, src, SourceConfig(format="delta", delta_version=0))
    from delta.tables import DeltaTable

    r, events = _ingest(spark, store, src, SourceConfig(format="delta"))  # the latest is whole
    latest = DeltaTable.forPath(spark, src).history(1).first()["version"]  # VACUUM commits too
    assert set(events) == {"u3"} and r.input_version == latest >= 1
