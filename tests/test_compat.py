"""The Spark 3.5 fallbacks give what the Spark 4 APIs give (both paths, whichever Spark runs)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from seqclust.core import compat


def test_to_arrow_fallback_equals_the_native_table(spark):
    df = spark.createDataFrame(
        [("a", 1, [1.0, 2.0], dt.datetime(2026, 1, 2, 3, 4, 5)), ("b", None, [], None)],
        "id string, n long, v array<double>, ts timestamp",
    )
    got = compat._to_arrow_35(df)
    assert got.column_names == ["id", "n", "v", "ts"] and got.num_rows == 2
    assert got.column("v").to_pylist() == [[1.0, 2.0], []] and got.column("n").to_pylist() == [1, None]
    if callable(getattr(type(df), "toArrow", None)):
        native = df.toArrow()
        assert got.schema.equals(native.schema) and got.equals(native)
    empty = compat._to_arrow_35(df.where("false"))
    assert empty.num_rows == 0 and empty.column_names == ["id", "n", "v", "ts"] and empty.schema.field("v").type == pa.list_(pa.float64())
    assert compat.to_arrow(df).num_rows == 2


def test_try_cast_fallback_is_null_where_the_native_cast_is_null(spark):
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(" 12.5 ",), ("x",), ("1e3",), (None,), ("2026-01-02 03:04:05",)], "s string")
    s = F.trim(F.col("s"))
    try:
        fb = df.select(compat._try_cast_35(s, "double").alias("d"), compat._try_cast_35(s, "timestamp").alias("t")).collect()
    except Exception as e:  # noqa: BLE001 - the JVM Column has no .expr() on this Spark line
        if compat.native_try_cast():
            pytest.skip(f"the Spark 3.5 fallback cannot run on this Spark line ({type(e).__name__}); the compat env tests it")
        raise
    assert [r["d"] for r in fb] == [12.5, None, 1000.0, None, None]
    assert fb[4]["t"] == dt.datetime(2026, 1, 2, 3, 4, 5) and fb[1]["t"] is None
    if compat.native_try_cast():
        native = df.select(s.try_cast("double").alias("d"), s.try_cast("timestamp").alias("t")).collect()
        assert native == fb
    assert [r["d"] for r in df.select(compat.try_cast(s, "double").alias("d")).collect()] == [12.5, None, 1000.0, None, None]
