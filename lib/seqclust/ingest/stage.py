"""Ingest: map source columns, parse types, validate, quarantine, dedup.

``validate`` and ``dedup`` are pure DataFrame transforms; ``run`` reads the source, writes
``quarantine`` and ``events``, and reconciles the row counts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

from py4j.protocol import Py4JJavaError
from pyspark import StorageLevel
from pyspark.errors import PySparkException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.compat import try_cast
from seqclust.core.config import SourceConfig
from seqclust.core.errors import ConfigError, InputError, ReconciliationError
from seqclust.core.privacy import pseudonym, redacted
from seqclust.core.tables import conform
from seqclust.runtime.context import RunContext
from seqclust.runtime.merge import merge_insert
from seqclust.runtime.spark import scale_shuffle
from seqclust.runtime.store import CORRUPT_COL, FILE_COL, mapped_columns, read_failure, read_source, source_fingerprint, source_format

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("event_id", "user_id", "ts", "event_type", "item_id", "category_id", "price")
REASONS = (
    "malformed",
    "bad_encoding",
    "null_user_id",
    "null_ts",
    "bad_ts",
    "ts_too_old",
    "ts_in_future",
    "unknown_event_type",
    "bad_type",
    "bad_price",
)
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)
_ZONE_LETTERS = re.compile(r"[XxZzOV]")


def _epoch(num: Column, ts_format: str) -> Column:
    x = num.cast("double")
    if ts_format == "epoch_ms":
        return F.timestamp_micros((x * 1000).cast("long"))
    if ts_format == "epoch_s":
        return F.timestamp_micros((x * 1_000_000).cast("long"))
    # auto: seconds, milliseconds or microseconds by magnitude
    micros = F.when(F.abs(x) >= 1e14, x).when(F.abs(x) >= 1e11, x * 1000).otherwise(x * 1_000_000)
    return F.timestamp_micros(micros.cast("long"))


def parse_ts(col: Column, dtype: T.DataType, ts_format: str, timezone: str) -> Column:
    """Parse a source timestamp column to a UTC timestamp (null when unparseable).

    Args:
        dtype: the source column's Spark type.
        ts_format: ``auto``, ``epoch_s``, ``epoch_ms``, ``iso8601`` or a Spark datetime pattern.
        timezone: zone of values that carry none (native timestamps are taken as UTC).
    """
    local_to_utc = timezone not in ("UTC", "Z", "Etc/UTC", "+00:00")
    if isinstance(dtype, (T.TimestampType,)):
        return col
    if isinstance(dtype, T.TimestampNTZType):
        return F.to_utc_timestamp(col.cast("timestamp"), timezone) if local_to_utc else col.cast("timestamp")
    if isinstance(dtype, T.DateType):
        return col.cast("timestamp")
    if isinstance(dtype, _NUMERIC):
        return _epoch(col, ts_format)
    s = F.trim(col.cast("string"))
    if ts_format in ("epoch_s", "epoch_ms"):
        return _epoch(try_cast(s, "double"), ts_format)
    if ts_format in ("auto", "iso8601"):
        parsed = try_cast(s, "timestamp")
        has_zone = s.rlike(r"(Z|[+-]\d{2}:?\d{2}|UTC)$")
        if local_to_utc:
            parsed = F.when(has_zone, parsed).otherwise(F.to_utc_timestamp(parsed, timezone))
        if ts_format == "auto":
            return F.when(s.rlike(r"^-?\d+(\.\d+)?$"), _epoch(try_cast(s, "double"), "auto")).otherwise(parsed)
        return parsed
    parsed = F.try_to_timestamp(s, F.lit(ts_format))
    if local_to_utc and not _ZONE_LETTERS.search(re.sub(r"'[^']*'", "", ts_format)):
        parsed = F.to_utc_timestamp(parsed, timezone)
    return parsed


def validate(df: DataFrame, cfg: SourceConfig, now: dt.datetime, source: str = "", salt: str | None = None) -> DataFrame:
    """Map source columns to the canonical event schema and tag each row with a reason.

    Returns the canonical columns plus ``reason`` (null for a valid row), ``raw`` (the
    original record as text) and ``source_file``, both for quarantined rows only. The first failing check wins, in the
    order of ``REASONS``. With a ``salt``, user ids are pseudonymised (also inside ``raw``)
    and malformed lines keep only their length and digest.
    """
    c = cfg.columns
    src_cols = [x for x in df.columns if x not in (CORRUPT_COL, FILE_COL)]
    has_corrupt = CORRUPT_COL in df.columns
    schema_types = {f.name: f.dataType for f in df.schema.fields}

    def opt(name: str | None) -> Column:
        return F.col(f"`{name}`") if name is not None and name in df.columns else F.lit(None)

    user = F.trim(opt(c.user_id).cast("string"))
    if salt is not None:
        user = F.when(user != "", pseudonym(user, salt)).otherwise(user)
    raw_fields = [(user if salt is not None and x == c.user_id else F.col(f"`{x}`")).alias(x) for x in src_cols]
    raw_json = F.to_json(F.struct(*raw_fields))
    corrupt_raw = redacted(F.col(CORRUPT_COL)) if salt is not None else F.col(CORRUPT_COL)
    raw = F.coalesce(corrupt_raw, raw_json) if has_corrupt else raw_json
    corrupt = F.col(CORRUPT_COL).isNotNull() if has_corrupt else F.lit(False)
    file_col = F.col(FILE_COL) if FILE_COL in df.columns else F.lit(source)

    ts_src = opt(c.ts)
    ts = parse_ts(ts_src, schema_types[c.ts], cfg.ts_format, cfg.timezone)
    mapping = {str(k).strip().lower(): v for k, v in cfg.event_types.items()}
    etype_map = F.create_map(*[F.lit(x) for x in chain.from_iterable(mapping.items())])
    etype_raw = F.lower(F.trim(opt(c.event_type).cast("string")))
    etype_known = etype_map[etype_raw]
    etype = etype_known if cfg.unknown_event_type == "quarantine" else F.coalesce(etype_known, F.lit("other"))
    if c.event_type is None:
        etype = F.lit(cfg.default_event_type)
    price_src = opt(c.price)
    price = (
        price_src.cast("double")
        if c.price and isinstance(schema_types.get(c.price), _NUMERIC)
        else try_cast(F.trim(price_src.cast("string")), "double")
    )
    try:
        min_ts = dt.datetime.fromisoformat(cfg.min_ts.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"source.min_ts: {cfg.min_ts!r} is not an ISO-8601 timestamp") from None
    if min_ts.tzinfo is None:
        min_ts = min_ts.replace(tzinfo=dt.timezone.utc)
    max_ts = now + dt.timedelta(hours=cfg.max_clock_skew_hours)

    # text that did not decode (latin-1 bytes read as UTF-8, say) arrives as U+FFFD: a value
    # that is no longer the source's, quarantined instead of kept mangled
    undecoded = F.concat_ws("", *[opt(x).cast("string") for x in mapped_columns(cfg)]).contains("\ufffd")
    reason = (
        F.when(corrupt, "malformed")
        .when(undecoded, "bad_encoding")
        .when(user.isNull() | (user == ""), "null_user_id")
        .when(ts_src.isNull() | (F.trim(ts_src.cast("string")) == ""), "null_ts")
        .when(ts.isNull(), "bad_ts")
        .when(ts < F.lit(min_ts), "ts_too_old")
        .when(ts > F.lit(max_ts), "ts_in_future")
        .when(etype.isNull(), "unknown_event_type")
        .when(price_src.isNotNull() & (F.trim(price_src.cast("string")) != "") & price.isNull(), "bad_type")
        .when(price.isNotNull() & ((price < 0) | (price > cfg.max_price) | F.isnan(price)), "bad_price")
    )
    return df.select(
        opt(c.event_id).cast("string").alias("event_id"),
        user.alias("user_id"),
        ts.alias("ts"),
        etype.alias("event_type"),
        F.trim(opt(c.item_id).cast("string")).alias("item_id"),
        F.trim(opt(c.category_id).cast("string")).alias("category_id"),
        price.alias("price"),
        reason.alias("reason"),
        # the record as text only where it is quarantined: valid rows (nearly all) never pay
        # for serialising every field to JSON, nor for caching that text
        F.when(reason.isNotNull(), raw).alias("raw"),
        # the file's path likewise (only the quarantine keeps it): at 100M events a path string
        # on every cached valid row is gigabytes of heap (the 100M bench's ingest ran out of it)
        F.when(reason.isNotNull(), file_col).alias("source_file"),
    )


def dedup(events: DataFrame, extra: tuple[str, ...] = ()) -> DataFrame:
    """Drop duplicate events, deterministically keeping the earliest copy.

    The key is ``event_id`` where present, else (user, ts, event type, item). ``extra``: more
    columns kept with each event (the last tie-breakers of "earliest").
    """
    key = F.expr(event_key())  # the same key incremental runs MERGE on
    ordered = F.struct("ts", "user_id", "event_type", "item_id", "category_id", "price", "event_id", *extra)
    return events.groupBy(key.alias("_k")).agg(F.min(ordered).alias("_e")).select("_e.*").select(*EVENT_COLUMNS, *extra)


def event_key(prefix: str = "") -> str:
    """The dedup key as SQL over a table alias (``prefix``: ``"t."``/``"s."``), for MERGE."""
    p = prefix
    return (
        f"coalesce(concat('id:', {p}event_id), concat_ws('|', 'k', {p}user_id, cast({p}ts as string), {p}event_type, "
        f"coalesce({p}item_id, '')))"
    )


@dataclass(frozen=True)
class IngestResult:
    input_rows: int
    clean_rows: int
    quarantined_rows: int
    duplicate_rows: int
    reasons: dict[str, int]
    input_fingerprint: str | None = None
    input_version: int | None = None
    input_files: int = 0
    out_of_window_rows: int = 0
    # valid rows whose mapped optional column is empty (a source file that lacks the column,
    # e.g. one written before the producer added it, or leaves it blank)
    empty_optional: dict[str, int] = field(default_factory=dict)


def run(spark: SparkSession, ctx: RunContext, cfg: SourceConfig, salt: str | None = None) -> IngestResult:
    """Read the source, write ``quarantine`` and ``events`` for this run, reconcile counts.

    With a ``salt`` (``privacy.pseudonymize``), user ids are pseudonymised before any write.
    In incremental mode (``ctx.since``/``ctx.until``) only rows whose timestamp falls in the
    window count (the rest are counted as outside it); clean events are MERGEd into the run
    id's ``events`` (an event already there is a duplicate), tagged with ``window_start``.

    Long on purpose: read, validate, write and reconcile are one accounting; keeping them in
    one function keeps every count that ``input = clean + quarantined + duplicates`` checks
    in sight of the code that produces it.
    """
    if not ctx.input_path:
        raise InputError("no input: pass --input PATH (or run without it for the generated demo data)")
    raw_df = read_source(spark, ctx.input_path, cfg)  # checks the path first
    fmt = source_format(ctx.input_path, cfg)
    fingerprint, version, n_files = source_fingerprint(spark, raw_df, ctx.input_path, fmt, cfg.delta_version)
    if version is not None and cfg.delta_version is None:
        # every pass of this ingest reads the version the fingerprint recorded, even when a
        # writer commits to the source meanwhile (without a cache the source is read per pass)
        raw_df = read_source(spark, ctx.input_path, dataclasses.replace(cfg, delta_version=version))
    try:
        n_input = raw_df.count()
    except (Py4JJavaError, PySparkException) as e:
        err = read_failure(ctx.input_path, e)
        if err is None:
            raise
        raise err from None
    if n_input == 0:
        raise InputError(f"--input {ctx.input_path}: no rows to ingest")
    log.info("ingest: %d input rows from %s%s", n_input, ctx.input_path, _window_text(ctx))
    scale_shuffle(spark, n_input)
    r = ingest_rows(spark, ctx, raw_df, cfg, n_input, _cache_level(cfg.cache, fmt), salt=salt)
    return dataclasses.replace(r, input_fingerprint=fingerprint, input_version=version, input_files=n_files)


def ingest_rows(
    spark: SparkSession,
    ctx: RunContext,
    raw_df: DataFrame,
    cfg: SourceConfig,
    n_input: int,
    level: StorageLevel | None = None,
    salt: str | None = None,
    late_before: dt.datetime | None = None,
    skip_empty: bool = False,
    clean_sink: Callable[[DataFrame], int] | None = None,
) -> IngestResult:
    """Validate ``raw_df`` (``n_input`` rows, as ``read_source`` gives them), write its bad rows
    to ``quarantine`` and its clean ones to ``events``, and reconcile the counts.

    Args:
        level: how the validated rows are kept between the passes (None: read again).
        late_before: a stream's watermark: valid rows with an earlier timestamp are quarantined
            as ``late`` (their sessions are closed and counted already).
        clean_sink: where the valid rows (``EVENT_COLUMNS``, duplicates included) go instead of
            ``events``; returns how many new distinct events it kept (a stream's micro-batch
            de-duplicates them with the events of its open sessions).

    Long on purpose: validate, write and reconcile are one accounting; keeping them in one
    function keeps every count that ``input = clean + quarantined + duplicates`` checks in
    sight of the code that produces it.
    """
    validated = validate(raw_df, cfg, ctx.started_at, source=ctx.input_path or "", salt=salt)
    if ctx.incremental:
        # a row without a readable timestamp belongs to no window: it is quarantined by every
        # windowed run that reads it (its reason says why)
        in_window = F.col("ts").isNull()
        lo = F.lit(ctx.since) if ctx.since else None
        hi = F.lit(ctx.until) if ctx.until else None
        cond = (F.col("ts") >= lo if lo is not None else F.lit(True)) & (F.col("ts") < hi if hi is not None else F.lit(True))
        validated = validated.withColumn("reason", F.when(in_window | cond, F.col("reason")).otherwise(F.lit(OUT_OF_WINDOW)))
    window_start = F.lit(ctx.window_start if ctx.incremental else None).cast("timestamp")
    if late_before is not None:
        late = F.col("reason").isNull() & (F.col("ts") < F.lit(late_before))
        validated = validated.withColumn("reason", F.when(late, F.lit(LATE)).otherwise(F.col("reason")))
    if level is not None:
        validated = validated.persist(level)
    try:
        optional = [x for x in ("item_id", "category_id", "price") if getattr(cfg.columns, x) is not None]
        counted = validated.groupBy("reason").agg(
            F.count("*").alias("count"), *[F.sum(F.col(x).isNull().cast("long")).alias(f"_empty_{x}") for x in optional]
        )
        counts = counted.collect()
        by_reason = {r["reason"]: r["count"] for r in counts}
        empty = {x: int(r[f"_empty_{x}"] or 0) for r in counts if r["reason"] is None for x in optional}
        n_valid = by_reason.pop(None, 0)
        n_out = by_reason.pop(OUT_OF_WINDOW, 0)
        n_quar = sum(by_reason.values())
        quarantine = validated.where(F.col("reason").isNotNull() & (F.col("reason") != OUT_OF_WINDOW)).select(
            F.lit(ctx.input_path).alias("source"),
            "source_file",
            "raw",
            "reason",
            F.lit(ctx.started_at).cast("timestamp").alias("ingested_at"),
            window_start.alias("window_start"),
        )
        window_pred = f"window_start = TIMESTAMP '{ctx.window_start.isoformat()}'" if ctx.incremental else None
        # a stream's micro-batch (skip_empty) owns its window key and re-runs with the same rows:
        # nothing quarantined needs no commit (a batch window is replaced, stale rows and all)
        n_q_written = 0 if skip_empty and n_quar == 0 else ctx.write(quarantine, "quarantine", extra_predicate=window_pred)
        valid = validated.where(F.col("reason").isNull())
        clean = dedup(valid).withColumn("window_start", window_start)
        if clean_sink is not None:
            n_clean = clean_sink(valid.select(*EVENT_COLUMNS))
        elif ctx.incremental and ctx.store.exists(ctx.tables.events):
            # a stream's copy of an event older than its watermark is quarantined as late above:
            # the stored events a new one can duplicate are the ones from the watermark on
            recent = F.col("t.ts") >= F.lit(late_before) if late_before is not None else None
            n_clean = ctx.wrote(
                ctx.tables.events,
                merge_insert(ctx.store, conform(clean, "events"), ctx.tables.events, ctx.run_id, event_key("t."), event_key("s."), recent),
            )
        else:
            n_clean = ctx.write(clean, "events")
    finally:
        if level is not None:
            validated.unpersist()
    n_dup = n_valid - n_clean
    log.info("ingest: %d clean, %d quarantined %s, %d duplicates, %d outside the window", n_clean, n_quar, by_reason, n_dup, n_out)
    # input is counted on the source, the rest on what was tagged and written: rows lost
    # between them (a filter, a join, a failed write) break one of these
    if n_input != n_valid + n_quar + n_out or n_q_written != n_quar or n_dup < 0:
        raise ReconciliationError(
            f"row accounting failed: input {n_input} != clean {n_clean} + quarantined {n_q_written} (tagged {n_quar}) + duplicates {n_dup}"
            f" + outside the window {n_out}"
        )
    if n_clean == 0 and not ctx.incremental:
        raise InputError(
            f"--input {ctx.input_path}: all {n_input} rows were quarantined ({by_reason}); check source.columns and source.ts_format"
        )
    if n_valid == 0 and ctx.incremental:
        log.warning("ingest: no valid events in the window%s", _window_text(ctx))
    empty = {x: n for x, n in empty.items() if n}
    if empty and n_valid:
        log.info(
            "ingest: of %d valid rows, %s empty (a source file without the column, or blank values)",
            n_valid,
            ", ".join(f"{x} {n} ({100 * n / n_valid:.1f}%)" for x, n in empty.items()),
        )
    return IngestResult(
        n_input, n_clean, n_quar, n_dup, {str(k): int(v) for k, v in by_reason.items()}, out_of_window_rows=n_out, empty_optional=empty
    )


OUT_OF_WINDOW = "_out_of_window"
LATE = "late"  # a stream: older than the watermark when it arrived


def _cache_level(cache: str, fmt: str) -> StorageLevel | None:
    """The storage level of ingest's validated rows (``source.cache``), None for no cache."""
    if cache == "auto":
        cache = "none" if fmt in ("parquet", "delta") else "disk"
    return {"none": None, "disk": StorageLevel.DISK_ONLY, "memory": StorageLevel.MEMORY_AND_DISK}[cache]


def _window_text(ctx: RunContext) -> str:
    if not ctx.incremental:
        return ""
    return f" (window {ctx.since.isoformat() if ctx.since else '-inf'} .. {ctx.until.isoformat() if ctx.until else '+inf'})"
