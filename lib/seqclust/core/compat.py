"""One home for the APIs that differ between the Spark lines we support (3.5 and 4.x).

``DataFrame.toArrow`` and ``Column.try_cast`` are Spark 4.0 APIs in open source (Databricks
backported them from DBR 15.3); open-source 3.5 clusters (EMR, Dataproc, on-prem YARN) do not
have them. Everything in ``lib/`` calls these two functions instead, which use the native
API where it exists and an equivalent that 3.5 has otherwise, with no behaviour difference
(tests/test_compat.py checks both paths give the same result).
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F


def to_arrow(df: DataFrame) -> pa.Table:
    """``df`` collected to the driver as one Arrow table (callers bound its size)."""
    if callable(getattr(type(df), "toArrow", None)):
        return df.toArrow()
    return _to_arrow_35(df)


def _to_arrow_35(df: DataFrame) -> pa.Table:
    # Spark 3.5 classic: the Arrow batches toPandas itself is built on; an empty result still
    # gets its columns and types from the schema Spark derives for those batches
    batches = df._collect_as_arrow()  # type: ignore[operator]  # private API the stubs read as a column
    if batches:
        return pa.Table.from_batches(batches)
    from pyspark.sql.pandas.types import to_arrow_schema

    try:
        schema = to_arrow_schema(df.schema, timezone="UTC")  # Spark 4 asks for the zone
    except TypeError:
        schema = to_arrow_schema(df.schema)  # Spark 3.5: timestamps are UTC
    return schema.empty_table()


def native_try_cast() -> bool:
    """Whether this Spark's Column has ``try_cast`` (4.0+, Databricks 15.3+)."""
    return callable(getattr(Column, "try_cast", None))


def try_cast(col: Column, to: str) -> Column:
    """``col`` cast to the SQL type ``to``, null where the value does not convert (never an
    error, whatever ``spark.sql.ansi.enabled`` says)."""
    if native_try_cast():  # asked of the class: a 3.5 Column instance answers any attribute
        return col.try_cast(to)
    return _try_cast_35(col, to)


def _try_cast_35(col: Column, to: str) -> Column:
    # Spark 3.5's SQL has TRY_CAST (since 3.2); the column's own SQL text goes inside it
    return F.expr(f"try_cast({col._jc.expr().sql()} AS {to})")  # type: ignore[operator]  # the JVM column, untyped
