"""Storage edges: reading sources, reading and writing Delta tables per run.

Everything that touches storage lives here; the stages in between are DataFrame transforms.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException, PySparkException
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.config import PipelineConfig, SourceConfig, validate_identifier, validate_run_id
from seqclust.core.errors import ConfigError, InputError, SeqclustError

log = logging.getLogger(__name__)

CORRUPT_COL = "_corrupt_record"
FILE_COL = "_source_file"
HISTORY_WINDOW = 16  # commits read back to find our own (the whole log only when more were made since)


# ---------------------------------------------------------------------------------------
# Sources


def _merge_returns_metrics() -> bool:
    """Whether Delta's ``DeltaMergeBuilder.execute`` returns the MERGE's row counts (Delta 4:
    a one-row DataFrame); older versions return nothing and the counts come from the log."""
    try:
        from delta.tables import DeltaMergeBuilder
    except ImportError:  # pragma: no cover - delta-spark is a dependency
        return False
    return "DataFrame" in str(DeltaMergeBuilder.execute.__annotations__.get("return", ""))


MERGE_RETURNS_METRICS = _merge_returns_metrics()


def spark_error_line(e: BaseException) -> str:
    """The first meaningful line of a Spark/Py4J error (the Java message, not the Py4J frame)."""
    if isinstance(e, Py4JJavaError):
        try:
            text = str(e.java_exception.getMessage() or "")
        except Exception:  # pragma: no cover - gateway gone
            text = str(e)
    else:
        text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# Delta's optimistic-concurrency conflicts: another writer committed first. Our writes replace
# one run's rows (replaceWhere / MERGE on run_id), so writing again is safe and idempotent.
CONFLICTS = (
    "ProtocolChangedException",
    "MetadataChangedException",
    "ConcurrentAppendException",
    "ConcurrentWriteException",
    "ConcurrentDeleteReadException",
    "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException",
    "DELTA_PROTOCOL_CHANGED",
    "DELTA_METADATA_CHANGED",
    "DELTA_CONCURRENT",
)


def retry_conflicts(fn, what: str, attempts: int = 6, base_s: float = 0.5, expected: bool = False):
    """``fn()``, again after a seeded-jitter backoff when Delta reports a concurrent-writer
    conflict (two runs creating the same table at once, a backfill beside a daily run);
    other errors, and the last conflict, propagate. ``expected``: conflicts are part of the
    design (a run's lease heartbeat beside its own commits to ``runs``): logged at INFO, not
    as a warning."""
    import random
    import time

    rng = random.Random(hash(what) & 0xFFFF)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (AnalysisException, Py4JJavaError, PySparkException) as e:
            text = f"{spark_error_line(e)} {e}"
            if attempt == attempts or not any(c in text for c in CONFLICTS):
                raise
            wait = base_s * (2 ** (attempt - 1)) * (1 + rng.random())
            log.log(
                logging.INFO if expected else logging.WARNING,
                "%s: a concurrent writer committed first (%s); retrying in %.1fs",
                what,
                spark_error_line(e)[:120],
                wait,
            )
            time.sleep(wait)
    return None  # pragma: no cover - the loop returns or raises


def one_row(df: DataFrame) -> Row:
    """The first row of ``df``: an aggregate's one row; a SeqclustError when there is none."""
    row = df.first()
    if row is None:
        raise SeqclustError("expected a row, the query returned none")
    return row


def detect_format(path: str) -> str:
    """Guess a source format from a local path: Delta log, then file extensions."""
    p = Path(path)
    if (p / "_delta_log").is_dir():
        return "delta"
    names: list[str] = []
    if p.is_file():
        names = [p.name]
    elif p.is_dir():
        for _root, dirs, files in os.walk(p):
            dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
            names.extend(f for f in files if not f.startswith(("_", ".")))
            if len(names) > 50:
                break
    exts = {n.lower().rsplit(".", 2)[-1] if not n.lower().endswith(".gz") else n.lower().rsplit(".", 2)[-2] for n in names if "." in n}
    for fmt, keys in (("parquet", {"parquet"}), ("json", {"json", "jsonl", "ndjson"}), ("csv", {"csv", "tsv", "txt"})):
        if exts & keys:
            return fmt
    raise InputError(f"--input {path}: cannot tell the format from the files; pass --format parquet|csv|json|delta")


def source_format(path: str, cfg: SourceConfig) -> str:
    """``source.format``, or the detected one where it is ``auto``."""
    return detect_format(path) if cfg.format == "auto" else cfg.format


def _check_path(path: str) -> None:
    if "://" in path and not path.startswith("file:"):
        return  # remote storage: let Spark report
    local = path[5:] if path.startswith("file:") else path
    if not Path(local).exists():
        raise InputError(f"--input {path}: path does not exist")


def read_source(spark: SparkSession, path: str, cfg: SourceConfig) -> DataFrame:
    """Read raw events as they are, plus ``_source_file`` and, for CSV/JSON, ``_corrupt_record``.

    CSV and JSON are read with every mapped column as a string (types are checked by
    validation, so a bad value quarantines one row instead of failing the job) and in
    PERMISSIVE mode so that malformed lines are kept, not dropped.
    """
    if cfg.format == "kafka":
        raise InputError("source.format kafka: only `seqclust stream` reads Kafka; a batch stage reads files or a Delta table")
    _check_path(path)
    fmt = source_format(path, cfg)
    glob = {"pathGlobFilter": cfg.file_glob} if cfg.file_glob else {}
    try:
        if fmt == "delta":
            df = _read_delta(spark, path, cfg.delta_version)
        elif fmt == "parquet":
            df = _read_parquet(spark, path, glob)
        elif fmt == "csv":
            df = _read_csv(spark, path, cfg, glob)
        elif fmt == "json":
            wanted = [c for c in mapped_columns(cfg)]
            schema = T.StructType([T.StructField(n, T.StringType()) for n in wanted] + [T.StructField(CORRUPT_COL, T.StringType())])
            df = (
                spark.read.options(mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT_COL, encoding=cfg.encoding, **glob)
                .schema(schema)
                .json(path)
                .withColumn(FILE_COL, F.col("_metadata.file_path"))
            )
        else:
            raise InputError(f"source.format: unknown format {fmt!r}")
    except (AnalysisException, Py4JJavaError, PySparkException) as e:
        line = spark_error_line(e)
        if fmt == "delta" and cfg.delta_version is not None and ("VERSION" in line.upper() or "time travel" in line):
            raise InputError(
                f"--input {path}: Delta version {cfg.delta_version} cannot be read ({line[:250]}); set source.delta_version "
                "to a version the table still has (DESCRIBE HISTORY lists them), or null for the latest"
            ) from None
        raise InputError(f"--input {path}: cannot read as {fmt} ({line[:300]})") from None
    if fmt != "delta" and cfg.delta_version is not None:
        raise InputError(f"source.delta_version is set but --input {path} is {fmt}, not a Delta table")
    missing = [c for c in _required_columns(cfg) if c not in df.columns]
    if missing:
        from seqclust.core.errors import MissingColumnError

        shown = [c for c in df.columns if c not in (CORRUPT_COL, FILE_COL)]
        hint = "map them with source.columns.*"
        if fmt == "csv" and len(shown) == 1 and any(d in shown[0] for d in (";", "\t", "|", ",")):
            hint = f"one column only: is source.delimiter ({cfg.delimiter!r}) right?"
        raise MissingColumnError(
            f"--input {path}: required column(s) {', '.join(missing)} not found (columns: {', '.join(shown[:20])}); {hint}"
        )
    return df


def _read_delta(spark: SparkSession, path: str, version: int | None) -> DataFrame:
    """A Delta table, at ``version`` when given. An old version whose data files VACUUM has
    removed is refused here with one line (local files are checked before any job runs), not
    half-way through ingest with a missing-file error."""
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    df = reader.load(path)
    if version is not None:
        files = df.inputFiles()
        gone = [f for f in files if f.startswith("file:") and not os.path.exists(f[5:])]
        if gone:
            raise InputError(
                f"--input {path}: Delta version {version} refers to {len(gone)} of its {len(files)} data files that no longer exist "
                f"(removed by VACUUM, e.g. {gone[0].rsplit('/', 1)[-1]}); read a newer version (source.delta_version) or the latest (null)"
            )
    return df.withColumn(FILE_COL, F.lit(path))


# Files written on different days by different versions of a producer disagree: a column
# appears, disappears or changes type. Read so that no value lands in the wrong column and none
# is silently dropped: Parquet by column name with the union of the files' columns (null where
# a file lacks one; validation then counts them), and where two files give one column different
# types, that column as text in every file, so validation casts each value and quarantines the
# ones that do not convert (bad_type, bad_ts) instead of the read failing or guessing. CSV by
# header name: files whose header differs from the first file's are read group by group.
MAX_SCHEMA_FILES = 5000  # files whose footers or headers are read one by one when they disagree


def _union(parts: list[DataFrame]) -> DataFrame:
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p, allowMissingColumns=True)
    return out


def _as_text(col: str, dtype: T.DataType):  # -> Column
    c = F.col(f"`{col}`")
    if isinstance(dtype, T.TimestampType):  # with its zone, so no reader takes it for local time
        return F.date_format(c, "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX").alias(col)
    return c.cast("string").alias(col)


def _read_parquet(spark: SparkSession, path: str, glob: dict[str, str]) -> DataFrame:
    def reader():  # a DataFrameReader keeps the options set on it: a fresh one each time
        return spark.read.format("parquet").options(**glob)

    try:
        return reader().option("mergeSchema", "true").load(path).withColumn(FILE_COL, F.col("_metadata.file_path"))
    except (AnalysisException, Py4JJavaError, PySparkException) as e:
        text = f"{spark_error_line(e)} {e}"
        if not any(t in text for t in ("CANNOT_MERGE", "Failed to merge", "incompatible")):
            raise
    files = sorted(reader().load(path).inputFiles())
    if len(files) > MAX_SCHEMA_FILES:
        raise InputError(
            f"--input {path}: its Parquet files disagree on column types, and {len(files)} files are too many to reconcile one by one"
        )
    groups: dict[str, tuple[T.StructType, list[str]]] = {}
    for f in files:
        sch = spark.read.parquet(f).schema
        groups.setdefault(sch.json(), (sch, []))[1].append(f)
    types: dict[str, set[str]] = {}
    for sch, _ in groups.values():
        for fld in sch.fields:
            types.setdefault(fld.name, set()).add(fld.dataType.simpleString())
    mixed = sorted(c for c, t in types.items() if len(t) > 1)
    log.warning(
        "source: its %d Parquet files come in %d schemas and disagree on the type of %s (%s); those columns are read as text "
        "and each value is checked by validation (values that do not convert are quarantined)",
        len(files),
        len(groups),
        ", ".join(mixed),
        "; ".join(f"{c}: {' / '.join(sorted(types[c]))}" for c in mixed),
    )
    parts = []
    for sch, fs in groups.values():
        df = spark.read.schema(sch).parquet(*fs)
        cols = [_as_text(f.name, f.dataType) if f.name in mixed else F.col(f"`{f.name}`") for f in sch.fields]
        parts.append(df.select(*cols, F.col("_metadata.file_path").alias(FILE_COL)))
    return _union(parts)


def _read_csv(spark: SparkSession, path: str, cfg: SourceConfig, glob: dict[str, str]) -> DataFrame:
    opts: dict[str, Any] = dict(header=cfg.header, sep=cfg.delimiter, encoding=cfg.encoding, multiLine=cfg.multiline, **glob)
    probe = spark.read.options(inferSchema=False, **opts).csv(path)

    def read(names: list[str], where: str | list[str]) -> DataFrame:
        schema = T.StructType([T.StructField(n, T.StringType()) for n in names] + [T.StructField(CORRUPT_COL, T.StringType())])
        r = spark.read.options(mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT_COL, **opts).schema(schema)
        return r.csv(where).withColumn(FILE_COL, F.col("_metadata.file_path"))

    files = sorted(probe.inputFiles())
    if not cfg.header or len(files) < 2:
        return read(probe.columns, path)
    if len(files) > MAX_SCHEMA_FILES:
        log.warning(
            "source: %d CSV files: their headers are not compared (more than %d); the first file's is used", len(files), MAX_SCHEMA_FILES
        )
        return read(probe.columns, path)
    # Spark reads every file with the first file's header, by position: a file whose columns
    # are in another order, or one more or one fewer, would put values under the wrong names
    groups: dict[tuple[str, ...], list[str]] = {}
    for f in files:
        groups.setdefault(tuple(spark.read.options(inferSchema=False, **opts).csv(f).columns), []).append(f)
    if len(groups) == 1:
        return read(list(next(iter(groups))), path)
    log.warning(
        "source: its %d CSV files have %d different headers (%s); each group is read by its own header and matched by column name",
        len(files),
        len(groups),
        " | ".join(",".join(h) for h in groups),
    )
    return _union([read(list(h), fs) for h, fs in groups.items()])


_CORRUPT_FILE = (
    "Unexpected end of input stream",
    "Not in GZIP format",
    "incorrect header check",
    "invalid block type",
    "ZipException",
    "EOFException",
    "Premature EOF",
)


def read_failure(path: str, e: BaseException) -> InputError | None:
    """The one line for a source file Spark could not read to the end (a truncated or corrupt
    compressed file), naming the file when Spark says which; None for other errors."""
    import re

    text = f"{spark_error_line(e)} {e}"
    if not any(t in text for t in _CORRUPT_FILE):
        return None
    m = re.search(r"(?:file|path)[:= ]+['\"]?((?:file:)?/[^\s'\",)]+)", text)
    where = f" ({m.group(1)})" if m else ""
    return InputError(f"--input {path}: a source file is truncated or corrupt{where}; re-export it or move it aside")


def source_fingerprint(
    spark: SparkSession, df: DataFrame, path: str, fmt: str, delta_version: int | None = None
) -> tuple[str, int | None, int]:
    """What exactly was read, for lineage: (sha256 of the sorted file listing with sizes and
    modification times where the files are local, Delta version or None, number of files)."""
    import hashlib

    version = None
    if fmt == "delta" or (fmt == "auto" and detect_format(path) == "delta"):
        from delta.tables import DeltaTable

        version = (
            delta_version if delta_version is not None else int(one_row(DeltaTable.forPath(spark, path).history(1).select("version"))[0])
        )
    files = sorted(df.inputFiles())
    h = hashlib.sha256()
    for f in files:
        local = f[5:] if f.startswith("file:") else f
        try:
            st = os.stat(local)
            h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        except OSError:
            h.update(f"{f}\n".encode())
    return h.hexdigest()[:32], version, len(files)


def mapped_columns(cfg: SourceConfig) -> list[str]:
    """The source columns the mapping reads, each once, in canonical field order."""
    cols = cfg.columns
    out = []
    for name in ("event_id", "user_id", "ts", "event_type", "item_id", "category_id", "price"):
        v = getattr(cols, name)
        if v is not None and v not in out:
            out.append(v)
    return out


def _required_columns(cfg: SourceConfig) -> list[str]:
    c = cfg.columns
    return [x for x in (c.user_id, c.ts, c.event_type) if x is not None]


# ---------------------------------------------------------------------------------------
# Tables


def _write_error(name: str, path: str, e: BaseException) -> SeqclustError:
    """One line for a failed write: not writable, volume full, or Spark's own first line."""
    line = spark_error_line(e)
    full = f"{line} {e}"
    if any(
        t in full
        for t in ("Permission denied", "AccessDenied", "Mkdirs failed", "Not a directory", "ParentNotDirectory", "Read-only file system")
    ):
        return SeqclustError(f"table {name} at {path}: output path is not writable ({line[:200]})")
    if "No space left on device" in full or "Disk quota exceeded" in full:
        return SeqclustError(
            f"table {name} at {path}: the output volume is full (No space left on device); nothing was committed, "
            "free space and run the same command again"
        )
    return SeqclustError(f"table {name} at {path}: write failed ({line[:300]})")


def active_spark() -> SparkSession:
    """The process's Spark session, from any thread."""
    # the active session is thread-local in PySpark; a store used from a worker thread (a
    # scheduler running two writes at once) finds the process's session through the builder
    spark = SparkSession.getActiveSession()
    if spark is None:
        from pyspark import SparkContext

        if SparkContext._active_spark_context is None:
            raise SeqclustError("no Spark session: start one (seqclust.runtime.spark.get_spark) before using the table store")
        spark = SparkSession.builder.getOrCreate()
    return spark


@dataclass(frozen=True)
class TableStore:
    """Delta tables, partitioned by ``run_id``: folders under a path root, or (``schema`` set)
    tables in the metastore named ``[catalog.]schema.name`` (Unity Catalog on Databricks).

    Partitioning by run id makes a rerun's ``replaceWhere`` touch only that run's files and
    keeps runs from colliding; it is never by user id (high cardinality, tiny files).
    """

    root: str
    catalog: str | None = None
    schema: str | None = None

    @property
    def in_metastore(self) -> bool:
        return self.schema is not None

    def path(self, name: str) -> str:
        """Where table ``name`` lives: its folder, or its metastore name."""
        validate_identifier(name, "table name")
        if self.in_metastore:
            return ".".join(p for p in (self.catalog, self.schema, name) if p)
        return str(Path(self.root) / name) if "://" not in self.root else f"{self.root.rstrip('/')}/{name}"

    def delta_table(self, spark: SparkSession, name: str):  # -> delta.tables.DeltaTable
        from delta.tables import DeltaTable

        if self.in_metastore:
            return DeltaTable.forName(spark, self.path(name))
        return DeltaTable.forPath(spark, self.path(name))

    def check_schema(self, spark: SparkSession) -> None:
        """Metastore mode: fail early, with the name, when the schema does not exist."""
        if not self.in_metastore:
            return
        db = ".".join(p for p in (self.catalog, self.schema) if p)
        if not spark.catalog.databaseExists(db):
            raise ConfigError(f"tables.schema: schema {db} does not exist; create it (CREATE SCHEMA {db}) or fix tables.catalog/schema")

    def exists(self, name: str) -> bool:
        p = self.path(name)
        if self.in_metastore:
            return active_spark().catalog.tableExists(p)
        if "://" in p and not p.startswith("file:"):
            return True
        log_dir = Path(p.removeprefix("file:")) / "_delta_log"
        # a first write killed before its commit leaves a _delta_log without any commit:
        # that is no table yet (Delta refuses to read it), not a table to read or append to
        return log_dir.is_dir() and any(log_dir.glob("*.json")) or any(log_dir.glob("*.checkpoint*.parquet"))

    def write_run(
        self,
        df: DataFrame,
        name: str,
        run_id: str,
        partition_by: Iterable[str] = ("run_id",),
        extra_predicate: str | None = None,
        count: bool = True,
    ) -> int:
        """Atomically replace ``run_id``'s rows of table ``name`` with ``df``; return rows written.

        Args:
            extra_predicate: narrows what is replaced (a fixed SQL predicate from code, never
                from user input), e.g. ``entity_type = 'user'``.
            count: read the row count of our commit back from the Delta log (two small jobs);
                False returns -1 (bookkeeping tables written many times per run).
        """
        validate_run_id(run_id)
        predicate = f"run_id = '{run_id}'" + (f" AND ({extra_predicate})" if extra_predicate else "")
        if "run_id" not in df.columns:
            df = df.withColumn("run_id", F.lit(run_id))
        before = table_version(self, name) if count else -1
        log.info("table %s: writing run %s", name, run_id)

        # mergeSchema: a newer version may add columns to a table written by an older one
        writer = df.write.format("delta").mode("overwrite").option("replaceWhere", predicate).option("mergeSchema", "true")
        self.save(writer.partitionBy(*partition_by), name, f"table {name}, run {run_id}")
        if not count:
            log.info("table %s: committed run %s", name, run_id)
            return -1
        n = rows_written(self, name, before, predicate)
        log.info("table %s: committed %d rows of run %s", name, n, run_id)
        return n

    def create_if_absent(self, empty: DataFrame, name: str, partition_by: Iterable[str] = ("run_id",)) -> None:
        """Create table ``name`` with ``empty``'s schema unless it exists, touching no row: an
        append of nothing (two processes creating it at once: the loser's retry appends nothing;
        an overwrite here could wipe a row another process has just committed)."""
        writer = empty.write.format("delta").mode("append").option("mergeSchema", "true").partitionBy(*partition_by)
        self.save(writer, name, f"table {name}, created")

    def save(self, writer: Any, name: str, what: str) -> None:
        """Save a Delta ``writer`` to table ``name`` (by name in the metastore, else by path),
        retrying concurrent-writer conflicts; a failure is one line (``_write_error``)."""
        path = self.path(name)

        def save() -> None:
            if self.in_metastore:
                writer.saveAsTable(path)
            else:
                writer.save(path)

        try:
            retry_conflicts(save, what)
        except (AnalysisException, Py4JJavaError, PySparkException) as e:
            raise _write_error(name, path, e) from None

    def read(self, spark: SparkSession, name: str, run_id: str | None = None) -> DataFrame:
        path = self.path(name)
        if not self.exists(name):
            raise InputError(f"table {name} not found at {path}; run the stage that writes it first")
        try:
            df = spark.read.table(path) if self.in_metastore else spark.read.format("delta").load(path)
        except AnalysisException as e:
            raise InputError(f"table {name} at {path}: unreadable Delta table ({str(e).splitlines()[0][:200]})") from None
        if run_id is not None:
            validate_run_id(run_id)
            df = df.where(F.col("run_id") == run_id)
        return df


# ---------------------------------------------------------------------------------------
# What a commit did: read back from the Delta log


def merge_metrics(store: TableStore, name: str, before: int, result: Any = None) -> dict[str, Any]:
    """The MERGE's row counts: from its result (Delta 4: a one-row DataFrame, no job), else
    the operation metrics of the newest MERGE commit after version ``before`` (the log)."""
    if MERGE_RETURNS_METRICS and isinstance(result, DataFrame):
        r = result.first()
        if r is not None:
            d = r.asDict()
            return {
                "numTargetRowsInserted": d.get("num_inserted_rows", 0),
                "numTargetRowsUpdated": d.get("num_updated_rows", 0),
                "numTargetRowsDeleted": d.get("num_deleted_rows", 0),
            }
    if before < 0 and MERGE_RETURNS_METRICS:
        before = 0  # no result to read (not expected): the log's newest MERGE
    row = newest_commit(store, name, before, F.col("operation") == "MERGE")
    return dict((row["operationMetrics"] if row else None) or {})


def newest_commit(store: TableStore, name: str, before: int, where: Column) -> Row | None:
    """The newest commit after version ``before`` that matches ``where`` (its operation
    metrics). Reads the last few commits of the log, the whole history only when more than
    that were committed since ``before`` (a stream's tables gain a commit per micro-batch:
    reading every commit made each MERGE slower than the last)."""
    table = store.delta_table(active_spark(), name)
    for limit in (HISTORY_WINDOW, None):
        h = table.history(limit) if limit else table.history()
        rows = h.where(F.col("version") > before).select("version", "operationMetrics", where.alias("_ours")).collect()
        mine = [r for r in rows if r["_ours"]]
        if mine:
            return max(mine, key=lambda r: r["version"])
        if limit is not None and len(rows) < limit:  # the window reached back to ``before``: nothing else
            return None
    return None


def table_version(store: TableStore, name: str) -> int:
    """The table's newest version (-1: no table yet)."""
    if not store.exists(name):
        return -1
    row = store.delta_table(active_spark(), name).history(1).select("version").first()
    return int(row["version"]) if row else -1


def rows_written(store: TableStore, name: str, before: int, predicate: str) -> int:
    """Rows added by our commit after version ``before``: found by its predicate, so a
    concurrent writer's commit is not mistaken for ours. 0 when Delta made no commit (an
    empty write into a partition that did not exist changes nothing)."""
    ours = newest_commit(store, name, before, F.col("operationParameters")["predicate"] == predicate)
    if ours is None:
        return 0
    return int((ours["operationMetrics"] or {}).get("numOutputRows", 0))


def read_labels(spark: SparkSession, path: str, fmt: str, user_col: str, label_col: str) -> DataFrame:
    """Read a labels table as (user_id string, label string)."""
    _check_path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    try:
        reader = spark.read.format(fmt)
        if fmt == "csv":
            reader = reader.option("header", True)
        df = reader.load(path)
    except AnalysisException as e:
        raise InputError(f"--labels {path}: cannot read ({str(e).splitlines()[0][:200]})") from None
    for c in (user_col, label_col):
        if c not in df.columns:
            raise InputError(f"--labels {path}: column {c!r} not found (columns: {', '.join(df.columns[:20])})")
    return df.select(F.col(user_col).cast("string").alias("user_id"), F.col(label_col).cast("string").alias("label")).where(
        F.col("user_id").isNotNull() & F.col("label").isNotNull()
    )


def table_store(cfg: PipelineConfig) -> TableStore:
    """The Delta tables under ``run.output`` (a local folder made absolute, or a URI), or in the
    metastore when ``tables.schema`` is set (artifacts stay under ``run.output``)."""
    root = str(Path(cfg.run.output).absolute()) if "://" not in cfg.run.output else cfg.run.output
    return TableStore(root, cfg.tables.catalog, cfg.tables.schema)
