"""The one SparkSession factory."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pyspark import StorageLevel
from pyspark.errors import PySparkRuntimeError
from pyspark.sql import DataFrame, SparkSession

from seqclust.core.config import SparkConfig
from seqclust.core.console import native_log, native_stderr_to_log
from seqclust.core.errors import SeqclustError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Row-level caches (sessions, per-user token lists and vectors) are kept on local disk, not in
# the JVM heap: at 100M events a MEMORY_AND_DISK cache of them filled the 4 GB local heap while
# tasks still needed it (out of memory in sessionize, measured); small caches (k rows, samples)
# stay in memory. On a cluster the disk is the executors' local disk.
ROWS_CACHE = StorageLevel.DISK_ONLY

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


LOG4J_CONF = Path(__file__).with_name("log4j2.properties")


# the configured shuffle partitions and rows per partition, kept on the session for scale_shuffle
MIN_PARTITIONS_KEY = "spark.seqclust.shufflePartitions"
ROWS_PER_PARTITION_KEY = "spark.seqclust.rowsPerPartition"


def _on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def _jar_list(package: str) -> Path:
    """Where the local jar files Ivy resolved for ``package`` are listed (one per line)."""
    base = Path(os.environ.get("SEQCLUST_CACHE") or Path.home() / ".cache" / "seqclust")
    return base / f"jars-{re.sub(r'[^A-Za-z0-9_.-]', '_', package)}.txt"


def cached_delta_jars() -> list[str] | None:
    """Delta's jars as resolved by an earlier start (``seqclust warmup`` in ``make setup``), when
    every one of them is still on disk: a start with ``spark.jars`` skips Ivy's resolution (a
    second of work and ~60 lines on stderr). None: resolve through ``spark.jars.packages``."""
    try:
        jars = _jar_list(delta_package()).read_text().split()
    except OSError:
        return None
    return jars if jars and all(Path(j).is_file() for j in jars) else None


def _remember_jars(spark: SparkSession, package: str) -> None:
    """After a start that resolved ``package`` through Ivy, list the local jars it used."""
    jars = [j.removeprefix("file://").removeprefix("file:") for j in spark.sparkContext.getConf().get("spark.jars", "").split(",") if j]
    if not jars or not all(Path(j).is_file() for j in jars):
        return
    f = _jar_list(package)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("\n".join(jars) + "\n")
        tmp.replace(f)
    except OSError as e:  # a read-only home: every start resolves, as before
        log.debug("could not record Delta's jars in %s: %s", f, e)


def get_spark(cfg: SparkConfig | None = None, packages: Sequence[str] = ()) -> SparkSession:
    """Return the active session, or build one.

    An existing session (Databricks, a notebook, a test fixture, spark-submit with its own
    conf) is reused as is. Otherwise a session is built with Delta's extension and catalog;
    Delta's jars are added through ``configure_spark_with_delta_pip`` unless the JVM already
    has them (spark-submit ``--packages``). For a local master the workers are pinned to this
    interpreter and the driver is bound to loopback. ``packages``: more Maven coordinates for
    a session this process starts (the Kafka source); under spark-submit they are the submit's
    ``--packages``.
    """
    cfg = cfg or SparkConfig()
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if _on_databricks():  # pragma: no cover - exercised on Databricks only
        return SparkSession.builder.getOrCreate()

    builder = SparkSession.builder.appName(cfg.app_name)
    # Under spark-submit the JVM already runs with the submit's master, packages and conf:
    # only session-level settings below apply, and the master is never overridden.
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    master = None if submitted else (cfg.master or os.environ.get("SPARK_MASTER") or "local[*]")
    if master:
        builder = builder.master(master)
    is_local = (master or "").startswith("local")
    if is_local:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no "hostname resolves to a loopback address" warning
        builder = (
            builder.config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
        )
        if cfg.driver_memory:
            builder = builder.config("spark.driver.memory", cfg.driver_memory)
    builder = (
        builder.config("spark.sql.extensions", DELTA_EXTENSION)
        .config("spark.sql.catalog.spark_catalog", DELTA_CATALOG)
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config(MIN_PARTITIONS_KEY, str(cfg.shuffle_partitions))
        .config(ROWS_PER_PARTITION_KEY, str(cfg.rows_per_partition))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.databricks.delta.snapshotPartitions", str(max(1, min(cfg.shuffle_partitions, 8))))
        .config("spark.python.worker.reuse", "true")
        # tables are partitioned by run_id and a write holds one run: concurrent writers skip the
        # sort by run_id before writing (it spilled GBs at 100M events; 20M rows: 30.5 -> 22.2 s)
        .config("spark.sql.maxConcurrentOutputFileWriters", "4")
    )
    conf = dict(cfg.conf)
    java_opts = conf.get("spark.driver.extraJavaOptions", "")
    if not submitted and LOG4J_CONF.is_file() and "log4j2.configurationFile" not in java_opts:
        # the JVM's own start-up logging at WARN (Spark's default profile logs INFO until setLogLevel);
        # a user's own driver options are kept beside it
        conf["spark.driver.extraJavaOptions"] = f"{java_opts} -Dlog4j2.configurationFile=file:{LOG4J_CONF}".strip()
    for k, v in conf.items():
        builder = builder.config(k, v)
    package = None
    if not submitted:
        own_jars = "spark.jars" in conf or "spark.jars.packages" in conf  # the user's: leave them to Spark, remember nothing
        jars = None if own_jars else cached_delta_jars()
        if jars:
            builder = builder.config("spark.jars", ",".join(jars))
            if packages:
                builder = builder.config("spark.jars.packages", ",".join(packages))
        else:
            from delta import configure_spark_with_delta_pip

            builder = configure_spark_with_delta_pip(builder, extra_packages=list(packages) or None)
            package = None if own_jars or packages else delta_package()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    target = None if submitted else native_log()
    log.info(
        "starting Spark (master=%s)%s", master or "from spark-submit", f"; its own messages go to {target} (-v: here)" if target else ""
    )
    spark = _start(builder, packages, target)
    spark.sparkContext.setLogLevel(cfg.log_level)
    if package:
        _remember_jars(spark, package)
    return spark


def scale_shuffle(spark: SparkSession, rows: int | None) -> int:
    """Shuffle partitions for a stage over ``rows`` input rows: ``spark.shuffle_partitions``, or
    one per ``spark.rows_per_partition`` rows when that is more (set on the session; returned)."""
    conf = spark.conf
    floor = int(conf.get(MIN_PARTITIONS_KEY, None) or conf.get("spark.sql.shuffle.partitions") or 200)
    per = int(conf.get(ROWS_PER_PARTITION_KEY, None) or 0)
    n = max(floor, -(-int(rows) // per)) if per > 0 and rows else floor
    if str(n) != conf.get("spark.sql.shuffle.partitions"):
        log.info("shuffle partitions: %d (%s rows, one partition per %d beyond %d)", n, f"{rows:,}" if rows else "?", per, floor)
        conf.set("spark.sql.shuffle.partitions", str(n))
    return n


def _start(builder: SparkSession.Builder, packages: Sequence[str], target: str | None) -> SparkSession:
    """``builder.getOrCreate()``; a JVM that died resolving ``packages`` is one clear error.
    ``target``: the file a JVM this process launches keeps as its stderr (``core.console``: the
    JVM's own warnings, netlib's BLAS probe, Spark's log4j console lines), None: the console."""
    try:
        with native_stderr_to_log() if target else contextlib.nullcontext():
            return builder.getOrCreate()
    except PySparkRuntimeError as e:
        if not packages or "JAVA_GATEWAY_EXITED" not in str(e):
            raise
        where = f"in {target}" if target else "above"
        raise SeqclustError(
            f"Spark did not start: it could not resolve {', '.join(packages)} (the resolver's lines {where} say which jar; "
            "a module whose POM is in ~/.m2 without its jar stops Ivy: run `mvn dependency:get -Dartifact=<that module>` "
            "or remove its folder there)"
        ) from None


def kafka_package() -> str:
    """The Maven coordinate of Spark's Kafka source for the installed pyspark (its Scala line
    read from Delta's coordinate: ``_2.12`` for Spark 3.5, ``_2.13`` for Spark 4)."""
    import pyspark

    scala = re.search(r"_(2\.1[23])(?=:|$)", delta_package().split(":")[1])
    return f"org.apache.spark:spark-sql-kafka-0-10_{scala.group(1) if scala else '2.13'}:{pyspark.__version__}"


def delta_package() -> str:
    """The Maven coordinate of the Delta jar matching the installed delta-spark and pyspark:
    whatever delta-spark's own ``configure_spark_with_delta_pip`` asks for (its naming changed
    between lines: ``delta-spark_2.12:3.3.x`` for Spark 3.5, ``delta-spark_4.2_2.13:4.4.x``)."""
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    builder = configure_spark_with_delta_pip(SparkSession.Builder())  # a fresh builder: nothing global
    return str(builder._options["spark.jars.packages"]).split(",")[0]


def warm_up(tmp_dir: str) -> str:
    """Start Spark with Delta once (resolving Delta's jars into the local Ivy cache) and
    round-trip a one-row Delta table; return the Spark version."""
    spark = get_spark(SparkConfig(master="local[1]", shuffle_partitions=1, log_level="ERROR"))
    path = os.path.join(tmp_dir, "warmup_delta")
    spark.range(1).write.format("delta").mode("overwrite").save(path)
    assert spark.read.format("delta").load(path).count() == 1
    return spark.version


def concurrently(tasks: dict[str, Callable[[], T]]) -> dict[str, T]:
    """Run independent Spark actions (writes to different tables, say) on threads at once and
    return their results by name. Each runs with the caller's local properties (job group,
    description: ``inheritable_thread_target``). Every task finishes before this returns; the
    first failure (in ``tasks``' order) is then raised.

    Why: a micro-batch's small Delta commits are mostly driver-side latency (planning, the log,
    many sub-second jobs), so on 2 cores two or three of them overlap well."""
    from concurrent.futures import ThreadPoolExecutor

    from pyspark import inheritable_thread_target

    if len(tasks) <= 1:
        return {k: f() for k, f in tasks.items()}
    with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="seqclust-write") as pool:
        futures = {k: pool.submit(inheritable_thread_target(f)) for k, f in tasks.items()}
    errors = [(k, fut.exception()) for k, fut in futures.items() if fut.exception() is not None]
    if errors:
        raise errors[0][1]  # type: ignore[misc]
    return {k: fut.result() for k, fut in futures.items()}


def materialised(df: DataFrame, done: list[DataFrame]) -> DataFrame:
    """``df`` computed once into the executors' block stores (memory and disk) with its lineage
    cut (a local checkpoint; appended to ``done`` for ``release``).

    Why not ``persist``: a cached frame keeps its plan, and every later plan over it (a MERGE
    plans its source several times, AQE re-plans) resolves the Delta tables it read again — a
    data-skipping job per table each time: 20-30 sub-second jobs in one 2-core micro-batch,
    measured. The price: an executor lost with the blocks fails the job that needed them (a
    stream re-runs its micro-batch, a batch run resumes)."""
    out = df.localCheckpoint(eager=True)
    done.append(out)
    return out


def release(done: list[DataFrame]) -> None:
    """Free the blocks of ``materialised`` frames now, not when the JVM's garbage collector
    finds them (a long-running stream makes a set per micro-batch)."""
    for df in done:
        try:
            df._jdf.queryExecution().analyzed().rdd().unpersist(False)
        except Exception:  # noqa: BLE001 - best effort: the context cleaner frees them later
            log.debug("could not free a local checkpoint", exc_info=True)
    done.clear()
