"""MERGEs into a run's rows of a Delta table: insert the rows whose key is new
(de-duplication), or replace and delete rows by key (incremental recomputation), each one atomic
commit whose row counts come back from Delta; and appends made once per (writer, version)."""

from __future__ import annotations

import logging

from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException, PySparkException
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from seqclust.core.config import validate_run_id
from seqclust.core.errors import SeqclustError
from seqclust.runtime.store import MERGE_RETURNS_METRICS, TableStore, merge_metrics, spark_error_line, table_version

log = logging.getLogger(__name__)


def merge_insert(
    store: TableStore, df: DataFrame, name: str, run_id: str, target_key: str, source_key: str, target_filter: Column | None = None
) -> int:
    """MERGE ``df`` into ``run_id``'s rows of table ``name``, inserting only rows whose key
    is not there yet (keys are SQL expressions from code); return the rows inserted.
    ``target_filter``: a condition on the target rows (``t.``) a match must meet: Delta
    reads only the files whose statistics allow it."""
    validate_run_id(run_id)
    spark = df.sparkSession
    before = -1 if MERGE_RETURNS_METRICS else table_version(store, name)
    log.info("table %s: merging new rows into run %s", name, run_id)
    src = df.withColumn("run_id", F.lit(run_id))
    cond = f"t.run_id = '{run_id}' AND {target_key} = {source_key}"
    try:
        out = (
            store.delta_table(spark, name)
            .alias("t")
            .merge(src.alias("s"), cond if target_filter is None else F.expr(cond) & target_filter)
            .whenNotMatchedInsertAll()
            .execute()
        )
    except (AnalysisException, Py4JJavaError, PySparkException) as e:
        raise SeqclustError(f"table {name} at {store.path(name)}: merge failed ({spark_error_line(e)[:300]})") from None
    n = int(merge_metrics(store, name, before, out).get("numTargetRowsInserted", 0))
    log.info("table %s: merged %d new rows into run %s", name, n, run_id)
    return n


def merge_replace(
    store: TableStore, new: DataFrame, stale_keys: DataFrame, name: str, run_id: str, key: str, target_filter: Column | None = None
) -> tuple[int, int]:
    """One atomic MERGE into ``run_id``'s rows of ``name``: rows of ``new`` replace or join
    the rows with the same ``key``; rows keyed in ``stale_keys`` and absent from ``new`` are
    deleted. Returns (rows inserted or updated, rows deleted). Creates the table if needed.
    ``target_filter``: a condition every target row with one of those keys meets (``t.``):
    Delta reads only the files whose statistics allow it."""
    validate_run_id(run_id)
    if not store.exists(name):
        return store.write_run(new, name, run_id), 0
    spark = new.sparkSession
    before = -1 if MERGE_RETURNS_METRICS else table_version(store, name)
    cols = [c for c in new.columns if c != "run_id"]
    gone = stale_keys.select(key).distinct().join(new.select(key), key, "left_anti")
    src = new.withColumn("_op", F.lit("upsert")).withColumn("run_id", F.lit(run_id))
    empty = [F.lit(None).cast(new.schema[c].dataType).alias(c) for c in cols if c != key]
    src = src.unionByName(gone.select(key, *empty, F.lit("delete").alias("_op"), F.lit(run_id).alias("run_id")))
    values = {c: f"s.`{c}`" for c in [*cols, "run_id"]}
    cond = f"t.run_id = '{run_id}' AND t.`{key}` = s.`{key}`"
    log.info("table %s: merging recomputed rows into run %s", name, run_id)
    try:
        out = (
            store.delta_table(spark, name)
            .alias("t")
            .merge(src.alias("s"), cond if target_filter is None else F.expr(cond) & target_filter)
            .whenMatchedDelete(condition="s._op = 'delete'")
            .whenMatchedUpdate(set=values)
            .whenNotMatchedInsert(condition="s._op = 'upsert'", values=values)
            .execute()
        )
    except (AnalysisException, Py4JJavaError, PySparkException) as e:
        raise SeqclustError(f"table {name} at {store.path(name)}: merge failed ({spark_error_line(e)[:300]})") from None
    m = merge_metrics(store, name, before, out)
    ins = int(m.get("numTargetRowsInserted", 0)) + int(m.get("numTargetRowsUpdated", 0))
    deleted = int(m.get("numTargetRowsDeleted", 0))
    log.info("table %s: run %s: %d rows inserted or replaced, %d deleted", name, run_id, ins, deleted)
    return ins, deleted


def append_once(store: TableStore, df: DataFrame, name: str, run_id: str, app_id: str, version: int) -> None:
    """Append ``df`` to ``run_id``'s rows of table ``name`` unless writer ``app_id`` already
    committed version ``version`` (or a later one) to it: Delta's idempotent writes
    (``txnAppId``/``txnVersion``, recorded in the same commit), so a step re-run after a crash
    appends nothing twice. Versions of one writer must grow."""
    validate_run_id(run_id)
    if "run_id" not in df.columns:
        df = df.withColumn("run_id", F.lit(run_id))
    log.info("table %s: appending to run %s (writer %s, version %d)", name, run_id, app_id, version)
    writer = (
        df.write.format("delta")
        .mode("append")
        .option("mergeSchema", "true")
        .option("txnAppId", app_id)
        .option("txnVersion", int(version))
        .partitionBy("run_id")
    )
    store.save(writer, name, f"table {name}, run {run_id}")
