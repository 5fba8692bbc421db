"""Live segments: Spark Structured Streaming assigns users to a model run's segments as their
sessions close (``seqclust stream``).

Each micro-batch (``foreachBatch``) runs the batch pipeline's own code on what arrived:

1. **ingest** (``ingest.ingest_rows``): validation and quarantine as in a batch run (the rows go
   to ``quarantine`` tagged with the micro-batch's window key); valid rows older than the
   watermark are quarantined as ``late``; clean events are MERGEd into the stream run's
   ``events`` (a duplicate of an event already there is dropped).
2. **sessionize** (``sessionize.run_incremental``): the sessions the new events touch are
   recomputed whole and MERGEd into the stream run's ``sessions``.
3. **close**: a session is closed when its chain (the pieces of one cut session) ended more
   than ``sessionize.gap_minutes`` before the watermark (the latest event time seen so far minus
   ``stream.allowed_lateness_minutes``). An event that could still change a closed session
   would be older than the watermark, so it is quarantined as ``late``: closed sessions are
   final. ``--flush`` closes every session at the end (the end of the log, as a batch run sees it).
4. **embed and assign**: the newly closed modelled sessions are embedded with the model run's
   encoder (the batch Arrow path) and added to their user's pooling state
   (``live_user_state``: the sum and count of the session vectors, the behaviour-token counts,
   the latest session: ``embed``'s mean pooling and token vector are functions of these
   sums); the user's vector made from it is placed as ``cluster`` places users of
   ``seqclust assign --model`` (nearest centre, then the model run's token segments).

Exactly once: every write of a micro-batch is keyed so that running the batch again (a crash
after some of its writes, before Spark's commit) rewrites the same rows: quarantine by the
batch's window key, events by event key (MERGE insert), sessions by recomputation, closed
sessions by session id (MERGE insert; the set "newly closed in batch b" excludes sessions
emitted by earlier batches only), user state and segments by user (MERGE upsert; a state row
keeps the state before the batch that wrote it, ``prev_*``, and a re-run of that batch starts
from it), progress by batch id. The watermark a batch uses is read from the progress rows of
the batches before it; each ``--flush`` has its own negative batch id.

State: per user one ``live_user_state`` row (bounded by the vector size and the vocabulary, not
by the user's history: exact, equal to a batch run's pooling). The stream run's ``events`` and
``sessions`` grow with the log, but a micro-batch reads only their recent part, bounded by
event time (Delta skips files by their min/max statistics): duplicates are looked for among
the events from the watermark on (an older copy is quarantined as ``late``; a copy that reuses
an ``event_id`` with a different, newer time than a stored event older than the watermark is
therefore kept, where a batch run would drop it), sessions near the batch's first event, open
chains after the previous batch's cut. The users' state and segments are MERGEd by user: their
cost grows with the number of users, not with the log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.config import EmbedConfig, PipelineConfig
from seqclust.core.errors import InputError
from seqclust.core.tables import conform
from seqclust.ingest import stage as ingest
from seqclust.represent import behaviour, embed
from seqclust.represent.features import list_parts
from seqclust.runtime.context import RunContext
from seqclust.runtime.merge import merge_insert, merge_replace
from seqclust.runtime.spark import concurrently, materialised, release
from seqclust.runtime.store import CORRUPT_COL, FILE_COL, mapped_columns, one_row, source_format
from seqclust.segment.hierarchy import Tree
from seqclust.serve.placement import Model, load_model, placer
from seqclust.sessionize import stage as sessionize

log = logging.getLogger(__name__)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
FLUSH_BATCH = -1  # the progress row of a --flush (closes every open session)


def window_key(batch_id: int) -> dt.datetime:
    """The window key (``window_start`` in ``events``/``quarantine``) of micro-batch ``batch_id``:
    the epoch plus that many seconds (a key, not a time)."""
    return EPOCH + dt.timedelta(seconds=int(batch_id) + 1)


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
class BatchResult:
    batch_id: int
    input_rows: int
    quarantined: int
    late: int
    new_events: int
    closed_sessions: int
    users_updated: int
    watermark: dt.datetime | None
    seconds: float


class LiveScorer:
    """Processes micro-batches for one stream run id (``ctx.run_id``) against one model."""

    def __init__(self, spark: SparkSession, cfg: PipelineConfig, ctx: RunContext, model: Model):
        self.spark, self.cfg, self.ctx, self.model = spark, cfg, ctx, model
        self.lateness = dt.timedelta(minutes=cfg.stream.allowed_lateness_minutes)
        self.gap_us = int(cfg.sessionize.gap_minutes * 60 * 1_000_000)

    # -- state --------------------------------------------------------------------------

    def _table(self, key: str) -> str:
        return getattr(self.ctx.tables, key)

    def _read(self, key: str) -> DataFrame | None:
        name = self._table(key)
        return self.ctx.store.read(self.spark, name, self.ctx.run_id) if self.ctx.store.exists(name) else None

    def max_ts_before(self, batch_id: int) -> dt.datetime | None:
        """The latest event time of the batches before ``batch_id`` (their progress rows)."""
        prog = self._read("live_progress")
        if prog is None:
            return None
        row = prog.where((F.col("batch_id") < batch_id) & (F.col("batch_id") >= 0)).agg(F.max("max_ts").alias("m")).first()
        return row["m"] if row else None

    # -- one micro-batch -----------------------------------------------------------------

    def process(self, raw: DataFrame, batch_id: int) -> BatchResult:
        """Ingest, sessionize, close, embed and assign one micro-batch (see the module doc)."""
        t0 = time.monotonic()
        seen = self.max_ts_before(batch_id)
        late_before = seen - self.lateness if seen is not None else None
        ctx = dataclasses.replace(self.ctx, since=window_key(batch_id), written={})
        raw = raw.persist(StorageLevel.MEMORY_AND_DISK)
        try:
            n_input = raw.count()
            res = None
            if n_input:
                res = ingest.ingest_rows(
                    self.spark, ctx, raw, self.cfg.source, n_input, None, self.cfg.privacy.salt(), late_before, skip_empty=True
                )
        finally:
            raw.unpersist()
        new_events = res.clean_rows if res else 0
        batch_max = None
        if res is not None and ctx.store.exists(ctx.tables.events):
            events = ctx.store.read(self.spark, ctx.tables.events, ctx.run_id).drop("run_id")
            span = one_row(events.where(F.col("window_start") == F.lit(ctx.window_start)).agg(F.min("ts"), F.max("ts")))
            batch_max = span[1]
            if batch_max is not None:
                sessionize.run_incremental(self.spark, ctx, self.cfg.sessionize, events, stats=False, first_new=span[0])
        seen_now = max([t for t in (seen, batch_max) if t is not None], default=None)
        watermark = seen_now - self.lateness if seen_now is not None else None
        closed_before = seen - self.lateness - dt.timedelta(microseconds=self.gap_us) if seen is not None else None
        closed, users = self.close_and_assign(batch_id, watermark, closed_before=closed_before)
        r = BatchResult(
            batch_id,
            n_input,
            res.quarantined_rows if res else 0,
            res.reasons.get(ingest.LATE, 0) if res else 0,
            new_events,
            closed,
            users,
            watermark,
            time.monotonic() - t0,
        )
        self._progress(r, batch_max if batch_max is not None else seen)
        log.info(
            "stream: batch %d: %d input rows, %d quarantined (%d late), %d new events, %d sessions closed, %d users updated, "
            "watermark %s, %.1fs",
            batch_id,
            r.input_rows,
            r.quarantined,
            r.late,
            r.new_events,
            r.closed_sessions,
            r.users_updated,
            r.watermark.isoformat() if r.watermark else "-",
            r.seconds,
        )
        return r

    def flush(self, batch_id: int | None = None) -> BatchResult:
        """Close every open session (the end of the log) and assign their users. Each flush has
        its own negative batch id (-1, -2, ...: one more than the flushes that completed), so a
        flush re-run after a crash is the same batch and a later flush is not."""
        t0 = time.monotonic()
        if batch_id is None:
            prog = self._read("live_progress")
            done = prog.where(F.col("batch_id") < 0).select("batch_id").distinct().count() if prog is not None else 0
            batch_id = FLUSH_BATCH - done
        closed, users = self.close_and_assign(batch_id, None, everything=True)
        r = BatchResult(batch_id, 0, 0, 0, 0, closed, users, None, time.monotonic() - t0)
        self._progress(r, None)
        log.info("stream: flush: %d sessions closed, %d users updated, %.1fs", closed, users, r.seconds)
        return r

    def close_and_assign(
        self, batch_id: int, watermark: dt.datetime | None, everything: bool = False, closed_before: dt.datetime | None = None
    ) -> tuple[int, int]:
        """(sessions closed, users updated) by micro-batch ``batch_id`` under ``watermark``.
        ``closed_before``: the cut of the batch before (its watermark minus a gap): every chain
        an earlier batch closed ended before it, so only chains with a piece ending after it are
        looked at (bounded reads: Delta skips files by their time statistics)."""
        sessions = self._read("sessions")
        if sessions is None or (watermark is None and not everything):
            return 0, 0
        sessions = sessions.drop("run_id")
        live = self._read("live_sessions")
        if closed_before is not None:
            chains = sessions.where(F.col("end_ts") >= F.lit(closed_before)).select("user_id", "root_start_ts")
            first = one_row(chains.agg(F.min("root_start_ts")))[0]
            if first is None:
                return 0, 0
            sessions = sessions.where(F.col("root_start_ts") >= F.lit(first)).join(chains, ["user_id", "root_start_ts"], "left_semi")
            # a piece ends after its chain's start: the stored pieces of these chains end after ``first``
            live = live.where(F.col("end_ts") >= F.lit(first)) if live is not None else None
        earlier = live.where(F.col("batch_id") != batch_id).select("session_id") if live is not None else None
        # the open sessions: a chain closes whole (below), so no piece of an open chain was
        # closed by an earlier batch and the chains' ends are taken over the open ones only
        open_ = sessions.join(earlier, "session_id", "left_anti") if earlier is not None else sessions
        # the pieces of one cut session close together: the chain's last piece decides
        chain_end = open_.groupBy("user_id", "root_start_ts").agg(F.max("end_ts").alias("_chain_end"))
        fresh = open_.where("is_modelled").join(chain_end, ["user_id", "root_start_ts"])
        if not everything:
            cut = F.unix_micros(F.lit(watermark)) - self.gap_us
            fresh = fresh.where(F.unix_micros("_chain_end") < cut)
        t0 = time.monotonic()
        # materialised with their lineage cut (local checkpoints), not cached: the closed
        # sessions (a cached plan over sessions and live_sessions made every later plan over
        # it resolve those tables again, a job each time), and the state, which reads
        # live_user_state — once the batch's MERGE committed a new version of it the later
        # MERGEs no longer matched the cached plan and recomputed the state, the vectors and
        # the assignment from the session vectors (26-33 s of a 2-core micro-batch, measured)
        done: list[DataFrame] = []
        try:
            fresh = materialised(fresh.drop("_chain_end"), done)
            row = one_row(fresh.agg(F.count("*").alias("n"), F.min("start_ts").alias("first")))
            n_closed = int(row["n"])
            if n_closed == 0:
                return 0, 0
            art = self.model.artifact
            t = time.monotonic()
            fresh_emb = embed.embed_sessions(self.spark, fresh, art, keep=("session_id", "user_id", "start_ts", "end_ts", "n_events"))
            fresh_emb = materialised(fresh_emb, done)
            t1 = time.monotonic()
            out = materialised(self._update(batch_id, fresh, fresh_emb), done)
            n_users = out.count()
            t2 = time.monotonic()
            log.info(
                "stream: batch %d: %d sessions closed (found in %.1fs), embedded in %.1fs, %d users' state and segment in %.1fs",
                batch_id, n_closed, t - t0, t1 - t, n_users, t2 - t1,
            )  # fmt: skip
            state, labels = self._split(batch_id, out)
            self._write(batch_id, fresh_emb, labels, state, row["first"])
            return n_closed, n_users
        finally:
            release(done)

    def _update(self, batch_id: int, fresh: DataFrame, fresh_emb: DataFrame) -> DataFrame:
        """The new pooling state of the users with sessions closed by this batch and their
        segment (``UPDATED``): their state before it (``prev_*`` when the row is this batch's
        own: a re-run) plus the new sessions' sums — the session vectors' sum and count (mean
        pooling, up to the L2 normalisation), the behaviour-token counts, the latest session.

        A few rows per user (the stored state, the new sessions' vector sums, their token counts
        per Arrow batch) are brought together by user in one shuffle and combined and placed in
        one Arrow pass (``live_updater``). The DataFrame form (three joins, a map merge per user
        in interpreted SQL, five Python stages to place users) took 12-30 s of a 2-core
        micro-batch for 14-18k users, measured."""
        art = self.model.artifact
        dim = int(art.model_cfg["embedding_dim"])
        no_tokens = [F.array().cast("array<string>").alias("tokens"), F.array().cast("array<bigint>").alias("n")]
        no_last = [F.lit(None).cast("timestamp").alias("last_end_ts"), F.lit(None).cast("string").alias("last_session_id")]
        d = fresh_emb.groupBy("user_id").agg(
            F.array(*[F.sum(F.col("embedding")[i].cast("double")) for i in range(dim)]).alias("vec"),
            F.count("*").alias("sessions"),
            F.max(F.struct("end_ts", "session_id")).alias("last"),
        )
        parts = [
            d.select(
                "user_id",
                F.lit(1).alias("kind"),
                "sessions",
                "vec",
                *no_tokens,
                F.col("last.end_ts").alias("last_end_ts"),
                F.col("last.session_id").alias("last_session_id"),
            )
        ]
        if art.token_model is not None:
            tok = behaviour.token_count_parts(fresh, art.vocab, art.token_model.interest)
            none = [F.lit(0).cast("long").alias("sessions"), F.lit(None).cast("array<double>").alias("vec")]
            parts.append(tok.select("user_id", F.lit(2).alias("kind"), *none, "tokens", "n", *no_last))
        old = self._read("live_user_state")
        if old is not None:
            mine = F.col("batch_id") == F.lit(batch_id)

            def base(c: str) -> Any:
                return F.when(mine, F.col(f"prev_{c}")).otherwise(F.col(c))

            before = old.join(d.select("user_id"), "user_id", "left_semi").select(
                "user_id",
                F.lit(0).alias("kind"),
                base("sessions").alias("sessions"),
                base("vector_sum").alias("vec"),
                F.map_keys(base("token_counts")).alias("tokens"),
                F.map_values(base("token_counts")).alias("n"),
                base("last_end_ts").alias("last_end_ts"),
                base("last_session_id").alias("last_session_id"),
            )
            parts.insert(0, before.where(F.col("sessions").isNotNull()))  # a re-run of a user's first batch: no state before
        rows = parts[0]
        for p in parts[1:]:
            rows = rows.unionByName(p)
        n = int(self.spark.conf.get("spark.sql.shuffle.partitions") or 4)
        rows = rows.repartition(n, "user_id").sortWithinPartitions("user_id", "kind")
        return rows.mapInArrow(live_updater(self.model, self.cfg.embed), UPDATED)

    def _split(self, batch_id: int, out: DataFrame) -> tuple[DataFrame, DataFrame]:
        """(``live_user_state`` rows, labels) of ``_update``'s rows."""
        tok = F.map_from_arrays("tokens", "n")
        prev_tok = F.when(F.col("prev_tokens").isNotNull(), F.map_from_arrays("prev_tokens", "prev_n"))
        state = out.select(
            "user_id",
            F.lit(batch_id).cast("long").alias("batch_id"),
            "sessions",
            "vector_sum",
            tok.alias("token_counts"),
            "last_end_ts",
            "last_session_id",
            "prev_sessions",
            "prev_vector_sum",
            prev_tok.alias("prev_token_counts"),
            "prev_last_end_ts",
            "prev_last_session_id",
        )
        labels = out.select(
            "user_id",
            *PLACEMENT,
            F.col("sessions").alias("sessions_counted"),
            "last_session_id",
        )
        return state, labels

    def _write(self, batch_id: int, fresh_emb: DataFrame, labels: DataFrame, state: DataFrame, first_start: dt.datetime) -> None:
        store, rid = self.ctx.store, self.ctx.run_id
        now = dt.datetime.now(dt.timezone.utc)
        sess = fresh_emb.join(labels.select("user_id", "cluster_id"), "user_id").select(
            "session_id",
            "user_id",
            "start_ts",
            "end_ts",
            F.col("n_events").cast("int").alias("n_events"),
            "embedding",
            "cluster_id",
            F.lit(batch_id).cast("long").alias("batch_id"),
        )
        seg = labels.select(
            "user_id",
            *PLACEMENT,
            F.lit(self.model.run_id).alias("model_run_id"),
            F.lit(self.model.artifact.encoder_id).alias("encoder_id"),
            "sessions_counted",
            "last_session_id",
            F.lit(now).cast("timestamp").alias("updated_at"),
            F.lit(batch_id).cast("long").alias("batch_id"),
        )
        empty = self.spark.createDataFrame([], T.StructType([T.StructField("user_id", T.StringType())]))

        def closed_sessions() -> int:
            name = self._table("live_sessions")
            if not store.exists(name):
                return store.write_run(conform(sess, "live_sessions"), name, rid)
            # a stored copy of one of these sessions (this batch's, written before a crash)
            # starts when it does: Delta reads only the files that can hold one
            copies = F.col("t.start_ts") >= F.lit(first_start)
            return merge_insert(store, conform(sess, "live_sessions"), name, rid, "t.session_id", "s.session_id", copies)

        def by_user(key: str, df: DataFrame) -> Callable[[], int]:
            return lambda: merge_replace(store, conform(df, key), empty, self._table(key), rid, "user_id")[0]

        # three tables at once (their inputs are materialised): each write is idempotent on its
        # own, so a crash after any subset of them leaves what the batch's re-run rewrites the
        # same — the closed sessions (it excludes only earlier batches' rows), the users' state
        # (from ``prev_*``), their segments (from that state)
        wrote = concurrently(
            {
                "live_sessions": closed_sessions,
                "live_user_state": by_user("live_user_state", state),
                "live_segments": by_user("live_segments", seg),
            }
        )
        for key, n in wrote.items():
            self.ctx.wrote(self._table(key), n)

    def _progress(self, r: BatchResult, max_ts: dt.datetime | None) -> None:
        row = (
            int(r.batch_id),
            int(r.input_rows),
            int(r.quarantined),
            int(r.late),
            int(r.new_events),
            int(r.closed_sessions),
            int(r.users_updated),
            max_ts,
            r.watermark,
            float(r.seconds),
            dt.datetime.now(dt.timezone.utc),
            self.ctx.input_path,
        )
        from seqclust.core.tables import LIVE_PROGRESS

        df = self.spark.createDataFrame([row], LIVE_PROGRESS)
        empty = self.spark.createDataFrame([], T.StructType([T.StructField("batch_id", T.LongType())]))
        merge_replace(self.ctx.store, conform(df, "live_progress"), empty, self._table("live_progress"), self.ctx.run_id, "batch_id")


_STR, _LONG, _TS = T.StringType(), T.LongType(), T.TimestampType()
_VEC, _TOKS, _NS = T.ArrayType(T.DoubleType()), T.ArrayType(T.StringType()), T.ArrayType(T.LongType())
_STATE_COLS = (
    ("sessions", _LONG),
    ("vector_sum", _VEC),
    ("tokens", _TOKS),
    ("n", _NS),
    ("last_end_ts", _TS),
    ("last_session_id", _STR),
)
# a user's placement, as the updater computes it and live_segments stores it
PLACEMENT = ("cluster_id", "distance_to_centroid", "confidence", "leaf_id", "segment_path", "leaf_confidence")
UPDATED = T.StructType(
    [
        T.StructField("user_id", _STR),
        *[T.StructField(c, t) for c, t in _STATE_COLS],
        *[T.StructField(f"prev_{c}", t) for c, t in _STATE_COLS],
        T.StructField("cluster_id", T.IntegerType()),
        T.StructField("distance_to_centroid", T.DoubleType()),
        T.StructField("confidence", T.DoubleType()),
        T.StructField("leaf_id", T.IntegerType()),
        T.StructField("segment_path", T.StringType()),
        T.StructField("leaf_confidence", T.DoubleType()),
    ]
)


def live_updater(model: Model, cfg: EmbedConfig) -> Any:
    """A ``mapInArrow`` function over rows sorted by user (within a partition holding all of a
    user's rows) to ``UPDATED``: per user, the stored state (``kind`` 0) plus the new sessions'
    vector sum, count and latest session (1) and token counts (2, several rows when counted
    in several batches) — ``_combine`` — then the user's segment as ``seqclust assign`` places
    users (``_place``). A user whose rows straddle two Arrow batches is held back to the next.
    The model's arrays travel as npz bytes and JSON, nothing pickled."""
    from seqclust.represent.behaviour import TokenModel
    from seqclust.segment.refine import TokenSegments

    art = model.artifact
    tm = art.token_model if (cfg.representation != "encoder" or model.token_segments is not None) else None
    meta, npz = (tm.to_json(), tm.arrays_npz()) if tm is not None else (None, None)
    segs_npz = model.token_segments.to_npz() if model.token_segments is not None else None
    centers = np.asarray(model.centers, dtype=np.float64)
    tree = model.tree if model.tree is not None else Tree.flat(centers)
    paths, parent, nodes = tree.paths, tree.parent.copy(), tree.centers.copy()

    def run(batches: Any) -> Any:
        tmodel = TokenModel.load(meta, npz) if meta is not None and npz is not None else None
        segs = TokenSegments.from_npz(segs_npz) if segs_npz is not None else None
        place = _placer(cfg, tmodel, segs, centers, Tree(paths, parent, nodes))
        carry: pa.Table | None = None
        for b in batches:
            if b.num_rows == 0:
                continue
            t = pa.Table.from_batches([b])
            t = pa.concat_tables([carry, t]) if carry is not None else t
            users = t.column("user_id").to_numpy(zero_copy_only=False)
            other = np.flatnonzero(users != users[-1])
            cut = int(other[-1]) + 1 if len(other) else 0  # the last user's rows may go on in the next batch
            if cut:
                yield place(_combine(t.slice(0, cut)))
            carry = t.slice(cut)
        if carry is not None and carry.num_rows:
            yield place(_combine(carry))

    return run


def _combine(t: pa.Table) -> dict[str, Any]:
    """Each user's new state from rows sorted by (user, kind): sums of sessions, vectors (the
    stored sum first, then the new sessions': the order of the SQL form) and token counts, the
    latest (end time, session id); ``prev_*``: the stored row."""
    t = t.combine_chunks()
    users = t.column("user_id").to_numpy(zero_copy_only=False)
    start = np.r_[True, users[1:] != users[:-1]]
    g = np.cumsum(start) - 1
    n_users = int(g[-1]) + 1
    kind = t.column("kind").to_numpy(zero_copy_only=False)
    sessions = np.zeros(n_users, np.int64)
    np.add.at(sessions, g, t.column("sessions").to_numpy(zero_copy_only=False).astype(np.int64))
    vec = t.column("vec").chunk(0)
    has_vec = pc.is_valid(vec).to_numpy(zero_copy_only=False)
    flat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    dim = len(flat) // max(int(has_vec.sum()), 1)
    sums = np.zeros((n_users, dim))
    np.add.at(sums, g[has_vec], flat.reshape(-1, dim))
    # token counts: (user, token) summed, then one list per user (empty when none)
    offs, toks = list_parts(t.column("tokens"))
    _, ns = list_parts(t.column("n"))
    owner = g[np.repeat(np.arange(t.num_rows), np.diff(offs))]
    agg = pa.table({"g": owner, "t": toks, "n": ns}).group_by(["g", "t"], use_threads=False).aggregate([("n", "sum")])
    gg = agg.column("g").to_numpy()
    order = np.argsort(gg, kind="stable")
    tok_offs = np.r_[0, np.cumsum(np.bincount(gg, minlength=n_users))].astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(tok_offs), agg.column("t").combine_chunks().take(pa.array(order)))
    counts = pa.ListArray.from_arrays(pa.array(tok_offs), agg.column("n_sum").combine_chunks().take(pa.array(order)).cast(pa.int64()))
    # the latest session: the largest (end time, session id) of a user's rows
    last = pa.table({"g": g, "e": t.column("last_end_ts"), "s": t.column("last_session_id"), "i": np.arange(t.num_rows)})
    last = last.filter(pc.is_valid(last.column("e"))).sort_by([("g", "ascending"), ("e", "ascending"), ("s", "ascending")])
    lg = last.column("g").to_numpy()
    final = np.r_[lg[1:] != lg[:-1], True] if len(lg) else np.zeros(0, bool)
    pick = np.full(n_users, -1, np.int64)
    pick[lg[final]] = last.column("i").to_numpy()[final]
    stored = np.full(n_users, -1, np.int64)
    old = np.flatnonzero(kind == 0)
    stored[g[old]] = old

    def at(col: str, idx: np.ndarray) -> pa.Array:
        return t.column(col).chunk(0).take(pa.array(idx, mask=idx < 0))

    first = np.flatnonzero(start)
    out = {
        "user_id": t.column("user_id").chunk(0).take(pa.array(first)),
        "sessions": sessions,
        "vector_sum": sums,
        "tokens": tokens,
        "n": counts,
        "last_end_ts": at("last_end_ts", pick),
        "last_session_id": at("last_session_id", pick),
    }
    for col in ("sessions", "vec", "tokens", "n", "last_end_ts", "last_session_id"):
        out[f"prev_{'vector_sum' if col == 'vec' else col}"] = at(col, stored)
    return out


def _placer(cfg: EmbedConfig, tmodel: Any, segs: Any, centers: np.ndarray, tree: Tree) -> Any:
    """``_combine``'s users -> an ``UPDATED`` batch: the state's columns and the user's
    placement (``placement.placer``: segment, distance, leaf, path, confidences)."""
    placed = placer(cfg, tmodel, segs, centers, tree)

    def place(u: dict[str, Any]) -> pa.RecordBatch:
        vs = u["vector_sum"]
        n, dim = vs.shape
        vec = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vs.reshape(-1)))
        cols = {**u, "sessions": pa.array(u["sessions"]), "vector_sum": vec, **placed(vs, u["tokens"], u["n"])}
        return pa.RecordBatch.from_arrays([cols[f.name] for f in UPDATED.fields], names=UPDATED.fieldNames())

    return place


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
    query = writer.start()
    try:
        query.awaitTermination(int(timeout_s)) if timeout_s else query.awaitTermination()
    finally:
        if query.isActive:
            query.stop()
    if query.exception() is not None:  # pragma: no cover - re-raised by awaitTermination
        raise InputError(f"stream: the query failed: {str(query.exception())[:300]}")
    flushed = scorer.flush().closed_sessions if flush else 0
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
