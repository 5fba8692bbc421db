"""One local Spark session (Delta enabled) for the whole test run; small and quiet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "spark: uses Spark (left out by `make test-fast`)")


SPARK_FIXTURES = {"spark", "cluster", "store", "ctx", "data", "e2e_out"}


def pytest_collection_modifyitems(config, items):
    """Tests that need Spark (a Spark fixture, or the CLI/subprocess runs in these modules) are
    marked ``spark``; ``make test-fast`` runs the rest."""
    spark_modules = {"test_crash.py", "test_submit.py", "test_cluster.py", "test_e2e.py", "test_notebooks.py", "test_incremental.py"}
    for item in items:
        if SPARK_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in spark_modules:
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def spark():
    from seqclust.core.config import SparkConfig
    from seqclust.runtime.spark import get_spark

    conf = SparkConfig(
        master="local[2]",
        shuffle_partitions=2,
        log_level="ERROR",
        conf={"spark.default.parallelism": "2", "spark.sql.adaptive.coalescePartitions.enabled": "true"},
    )
    # the tests' JVM keeps the console as its stderr (capfd sees executor errors); the CLI's
    # default sends it to a file (core.console)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEQCLUST_NATIVE_LOG", "-")
        session = get_spark(conf)
    yield session
    session.stop()


@pytest.fixture()
def store(tmp_path):
    from seqclust.runtime.store import TableStore

    return TableStore(str(tmp_path / "tables"))


@pytest.fixture()
def ctx(store, tmp_path):
    import datetime as dt

    from seqclust.core.config import TablesConfig
    from seqclust.runtime.context import RunContext

    return RunContext(
        run_id="t1",
        store=store,
        tables=TablesConfig(),
        started_at=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
    )
