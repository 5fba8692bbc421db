"""spark.concurrently and spark.materialised: the two helpers a micro-batch's speed rests on."""

import threading
import time

import pytest


def test_concurrent_tasks_overlap_keep_the_job_group_and_raise_the_first_failure(spark):
    from seqclust.runtime.spark import concurrently

    sc = spark.sparkContext
    sc.setJobGroup("seqclust-test-group", "concurrently")
    both = threading.Barrier(2, timeout=30)  # each task waits for the other: they must run at once
    finished = []

    def task(name):
        def run():
            both.wait()
            n = spark.range(1000).count()
            finished.append(name)
            return (name, n, sc.getLocalProperty("spark.jobGroup.id"))

        return run

    out = concurrently({"a": task("a"), "b": task("b")})
    assert out == {"a": ("a", 1000, "seqclust-test-group"), "b": ("b", 1000, "seqclust-test-group")}

    def slow():
        time.sleep(0.5)
        finished.append("slow")
        return 1

    def fails():
        raise ValueError("first")

    def fails_later():
        time.sleep(0.2)
        raise KeyError("second")

    with pytest.raises(ValueError, match="first"):
        concurrently({"fails": fails, "slow": slow, "later": fails_later})
    assert "slow" in finished  # every task ran to its end before the error was raised
    sc.setLocalProperty("spark.jobGroup.id", None)


def test_a_materialised_frame_has_no_delta_scan_left_and_is_freed(spark, tmp_path):
    from seqclust.runtime.spark import materialised, release

    path = str(tmp_path / "t")
    spark.range(100).withColumnRenamed("id", "x").write.format("delta").save(path)
    df = spark.read.format("delta").load(path).where("x % 2 = 0")
    assert "Relation [" in df._jdf.queryExecution().analyzed().toString()  # a plain (or cached) frame: the table's files

    done = []
    m = materialised(df, done)
    plan = m._jdf.queryExecution().analyzed()
    assert "LogicalRDD" in plan.toString() and "Relation [" not in plan.toString()  # no table left to resolve again
    assert sorted(r.x for r in m.collect()) == list(range(0, 100, 2))
    persistent = spark.sparkContext._jsc.sc().getPersistentRDDs()
    rdd_id = plan.rdd().id()
    assert len(done) == 1 and persistent.contains(rdd_id)  # its blocks are kept
    release(done)
    assert done == [] and not spark.sparkContext._jsc.sc().getPersistentRDDs().contains(rdd_id)


def test_the_jvm_and_blas_lines_go_to_the_native_log_not_the_console(tmp_path):
    """The JVM prints "Using incubator modules" at launch and netlib's JNI loader prints that it
    found no system BLAS at the first MLlib fit, both straight to the JVM's stderr; a JVM that
    seqclust launches keeps the native log file as its stderr. The same start with
    SEQCLUST_NATIVE_LOG=- shows what would have been printed."""
    import os
    import subprocess
    import sys

    code = (
        "from seqclust.core.config import SparkConfig; from seqclust.runtime.spark import get_spark\n"
        "spark = get_spark(SparkConfig(master='local[1]', shuffle_partitions=1, log_level='WARN'))\n"
        "from pyspark.ml.clustering import KMeans; from pyspark.ml.linalg import Vectors\n"
        "df = spark.createDataFrame([(Vectors.dense([float(i % 7), float(i % 3)]),) for i in range(60)], ['features'])\n"
        "KMeans(k=3, seed=1).fit(df); print('fitted'); spark.stop()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SEQCLUST_NATIVE_LOG"}

    def start(target: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**env, "SEQCLUST_NATIVE_LOG": target}
        )

    log_file = tmp_path / "native.log"
    quiet = start(str(log_file))
    assert quiet.returncode == 0 and "fitted" in quiet.stdout, quiet.stderr[-2000:]
    assert quiet.stderr.strip() == "", quiet.stderr[-2000:]
    loud = start("-")
    assert loud.returncode == 0 and "fitted" in loud.stdout, loud.stderr[-2000:]
    native = [ln for ln in loud.stderr.splitlines() if "incubator" in ln or "netlib" in ln]
    assert native, loud.stderr[-2000:]  # this JVM does print them (MLlib's BLAS probe on every Spark line)
    assert all(ln in log_file.read_text() for ln in native)
