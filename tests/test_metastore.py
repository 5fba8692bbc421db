"""Tables in the metastore (tables.catalog/schema, as on Unity Catalog) instead of folders."""

import pytest
from pyspark.sql import functions as F

from seqclust.core.config import ConfigError, TablesConfig
from seqclust.runtime.merge import merge_insert, merge_replace
from seqclust.runtime.store import TableStore


@pytest.fixture()
def schema(spark, tmp_path):
    name = f"seqclust_t{abs(hash(str(tmp_path))) % 10**8}"
    spark.sql(f"CREATE SCHEMA spark_catalog.{name} LOCATION '{tmp_path / 'wh'}'")
    yield name
    spark.sql(f"DROP SCHEMA spark_catalog.{name} CASCADE")


def test_store_by_table_name_replaces_runs_and_merges(spark, schema, tmp_path):
    store = TableStore(str(tmp_path / "artifacts"), "spark_catalog", schema)
    store.check_schema(spark)
    assert store.path("events") == f"spark_catalog.{schema}.events" and not store.exists("events")
    df = spark.range(5).withColumn("x", F.lit(1))
    assert store.write_run(df, "events", "a") == 5
    assert store.write_run(df.limit(2), "events", "b") == 2
    assert store.write_run(df.limit(3), "events", "a") == 3  # idempotent replace of run a
    assert store.exists("events")
    assert spark.table(f"spark_catalog.{schema}.events").count() == 5  # a real metastore table
    assert {r["run_id"]: r["count"] for r in store.read(spark, "events").groupBy("run_id").count().collect()} == {"a": 3, "b": 2}
    assert merge_insert(store, spark.range(2, 6).withColumn("x", F.lit(2)), "events", "a", "t.id", "s.id") == 3
    ins, deleted = merge_replace(store, spark.range(1).withColumn("x", F.lit(9)), spark.range(3).select("id"), "events", "a", "id")
    assert (ins, deleted) == (1, 2)
    assert sorted((r["id"], r["x"]) for r in store.read(spark, "events", "a").collect()) == [(0, 9), (3, 2), (4, 2), (5, 2)]
    assert not (tmp_path / "artifacts" / "events").exists()  # nothing written as a folder


def test_missing_schema_and_bad_names_are_config_errors(spark, tmp_path):
    with pytest.raises(ConfigError, match="schema spark_catalog.no_such_schema does not exist"):
        TableStore(str(tmp_path), "spark_catalog", "no_such_schema").check_schema(spark)
    with pytest.raises(ConfigError, match="tables.schema"):
        TablesConfig(schema="bad-name; DROP")
    with pytest.raises(ConfigError, match="needs tables.schema"):
        TablesConfig(catalog="main")


def test_merge_row_counts_from_the_result_and_from_the_log_agree(spark, tmp_path, monkeypatch):
    """Delta 4 returns a MERGE's counts (no job); older Delta leaves them in the log only."""
    from seqclust.runtime import store as io

    got = {}
    for flag in (True, False):
        monkeypatch.setattr(io, "MERGE_RETURNS_METRICS", flag and io._merge_returns_metrics())
        store = TableStore(str(tmp_path / f"art-{flag}"))
        df = spark.range(5).withColumn("x", F.lit(1))
        store.write_run(df, "events", "a")
        store.write_run(df, "events", "b")  # another run's rows: not counted
        ins = merge_insert(store, spark.range(3, 8).withColumn("x", F.lit(2)), "events", "a", "t.id", "s.id")
        rep = merge_replace(store, spark.range(2).withColumn("x", F.lit(9)), spark.range(4).select("id"), "events", "a", "id")
        got[flag] = (ins, rep)
    assert got[True] == got[False] == (3, (2, 2))
