"""Live segments: Spark Structured Streaming assigns users to a model run's segments as their
sessions close (``seqclust stream``): the source as a stream (files, a Delta table's appends, a
Kafka topic), each micro-batch processed by ``live.LiveScorer`` in ``foreachBatch`` (see
``seqclust.serve.live`` for what a micro-batch does and why it counts once), and ``--flush``
closing every open session at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.config import PipelineConfig
from seqclust.core.errors import InputError
from seqclust.runtime.context import RunContext
from seqclust.runtime.store import CORRUPT_COL, FILE_COL, mapped_columns, source_format
from seqclust.serve.live import BatchResult, LiveScorer
from seqclust.serve.placement import load_model

log = logging.getLogger(__name__)


def read_stream(spark: SparkSession, path: str, cfg: PipelineConfig) -> DataFrame:
    """The source as a stream, with the columns ``ingest.validate`` expects (``read_source``'s):
    file formats with the schema of the files there now (Parquet) or every mapped column as
    text (CSV, JSON: bad values are quarantined, not fatal), Delta as its change feed of appends."""
    from seqclust.runtime.store import read_source

    src = cfg.source
    if src.format == "kafka":
        return read_kafka(spark, cfg)
    fmt = source_format(path, src)
    opts: dict[str, Any] = {}
    if cfg.stream.max_files_per_trigger:
        opts["maxFilesPerTrigger"] = cfg.stream.max_files_per_trigger
    if src.file_glob:
        opts["pathGlobFilter"] = src.file_glob
    if fmt == "delta":
        read_source(spark, path, src)  # the mapping's columns are there (a clear error if not)
        return spark.readStream.format("delta").options(**opts).load(path).withColumn(FILE_COL, F.lit(path))
    batch = read_source(spark, path, src)  # checks the mapping against the files there now
    if fmt == "parquet":
        schema = T.StructType([f for f in batch.schema.fields if f.name not in (FILE_COL, CORRUPT_COL)])
        reader = spark.readStream.schema(schema).options(**opts).format("parquet")
    else:
        names = [c for c in batch.columns if c not in (FILE_COL, CORRUPT_COL)] if fmt == "csv" else mapped_columns(src)
        schema = T.StructType([T.StructField(n, T.StringType()) for n in names] + [T.StructField(CORRUPT_COL, T.StringType())])
        opts.update(mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT_COL, encoding=src.encoding)
        if fmt == "csv":
            opts.update(header=src.header, sep=src.delimiter)
        reader = spark.readStream.schema(schema).options(**opts).format(fmt)
    return reader.load(path).withColumn(FILE_COL, F.col("_metadata.file_path"))


def kafka_input(cfg: PipelineConfig) -> str:
    """How a Kafka source is named where a path would be (run records, progress rows)."""
    k = cfg.source.kafka
    return f"kafka://{k.bootstrap_servers}/{k.topic}"


def read_kafka(spark: SparkSession, cfg: PipelineConfig) -> DataFrame:
    """``source.kafka``'s topic as a stream: each message's value parsed as one JSON event with
    the mapping's columns as text (the JSON-lines path: a value that is not a JSON object is
    kept whole in the corrupt-record column and quarantined as malformed); the message's
    topic, partition and offset stand where a file's path does (``kafka:topic/partition@offset``)."""
    k, src = cfg.source.kafka, cfg.source
    opts: dict[str, Any] = {
        "kafka.bootstrap.servers": k.bootstrap_servers,
        "subscribe": k.topic,
        "startingOffsets": k.starting_offsets,
        **k.options,
    }
    if k.max_offsets_per_trigger:
        opts["maxOffsetsPerTrigger"] = k.max_offsets_per_trigger
    fields = [T.StructField(n, T.StringType()) for n in mapped_columns(src)]
    schema = T.StructType([*fields, T.StructField(CORRUPT_COL, T.StringType())])
    try:
        raw = spark.readStream.format("kafka").options(**opts).load()
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "DATA_SOURCE_NOT_FOUND" not in str(e) and "Failed to find data source" not in str(e):
            raise InputError(f"source.format kafka: the Kafka source refused its options ({first})") from None
        from seqclust.runtime.spark import kafka_package

        raise InputError(
            f"source.format kafka: Spark has no Kafka source ({first}); under spark-submit add --packages {kafka_package()}"
        ) from None
    value = F.from_json(F.col("value").cast("string"), schema, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT_COL})
    where = F.concat(
        F.lit("kafka:"), F.col("topic"), F.lit("/"), F.col("partition").cast("string"), F.lit("@"), F.col("offset").cast("string")
    )
    parsed = raw.select(value.alias("_v"), where.alias(FILE_COL))
    # a null value (a tombstone) parses to null: kept as a corrupt record, not silently dropped
    return parsed.select(
        *[F.col(f"_v.{f.name}").alias(f.name) for f in fields],
        F.when(F.col("_v").isNull(), F.lit("")).otherwise(F.col(f"_v.{CORRUPT_COL}")).alias(CORRUPT_COL),
        FILE_COL,
    )


@dataclass(frozen=True)
class StreamResult:
    batches: int
    input_rows: int
    closed_sessions: int
    users_updated: int
    flushed: int


def run(
    spark: SparkSession,
    cfg: PipelineConfig,
    ctx: RunContext,
    checkpoint: str,
    trigger_seconds: float | None = None,
    available_now: bool = False,
    flush: bool = False,
    timeout_s: float | None = None,
) -> StreamResult:
    """Run the stream (``foreachBatch``) until the input is drained (``available_now``), the
    timeout passes or the process is stopped; with ``flush``, close every open session after."""
    if not ctx.input_path:
        raise InputError("stream: pass --input PATH (a folder the producer drops files into, or a Delta table)")
    _check_checkpoint(checkpoint)
    model = load_model(spark, ctx, cfg)
    scorer = LiveScorer(spark, cfg, ctx, model)
    results: list[BatchResult] = []

    def each(batch_df: DataFrame, batch_id: int) -> None:
        results.append(scorer.process(batch_df, int(batch_id)))

    src = read_stream(spark, ctx.input_path, cfg)
    writer = src.writeStream.foreachBatch(each).option("checkpointLocation", checkpoint).queryName(f"seqclust_live_{ctx.run_id}")
    if available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{trigger_seconds or cfg.stream.trigger_seconds} seconds")
    log.info(
        "stream: run %s scores %s against the segments of run %s (encoder %s); checkpoint %s",
        ctx.run_id,
        ctx.input_path,
        model.run_id,
        model.artifact.encoder_id,
        checkpoint,
    )
    # every MERGE source of a micro-batch is a local checkpoint already: Delta need not copy it
    # again to guard against a source that changes between the MERGE's two passes (1-2 s per
    # MERGE on 2 cores, measured); the session's own setting is restored after the stream
    conf = "spark.databricks.delta.merge.materializeSource"
    before = spark.conf.get(conf, None)
    spark.conf.set(conf, "none")
    try:
        query = writer.start()
        try:
            query.awaitTermination(int(timeout_s)) if timeout_s else query.awaitTermination()
        finally:
            if query.isActive:
                query.stop()
        if query.exception() is not None:  # pragma: no cover - re-raised by awaitTermination
            raise InputError(f"stream: the query failed: {str(query.exception())[:300]}")
        flushed = scorer.flush().closed_sessions if flush else 0
    finally:
        spark.conf.unset(conf) if before is None else spark.conf.set(conf, before)
    return StreamResult(
        len(results),
        sum(r.input_rows for r in results),
        sum(r.closed_sessions for r in results) + flushed,
        sum(r.users_updated for r in results),
        flushed,
    )


def _check_checkpoint(checkpoint: str) -> None:
    """A local checkpoint folder must be creatable and writable (a clear error, not a failed query)."""
    import os
    from pathlib import Path

    if "://" in checkpoint and not checkpoint.startswith("file:"):
        return
    p = Path(checkpoint.removeprefix("file:"))
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".seqclust-write-check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise InputError(f"--checkpoint {checkpoint}: not writable ({e.strerror or e})") from None
    if not os.access(p, os.W_OK):
        raise InputError(f"--checkpoint {checkpoint}: not writable")
