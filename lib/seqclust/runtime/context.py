"""What every stage of one run needs to know: its id, where tables live, its inputs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from seqclust.core.config import TablesConfig, validate_run_id
from seqclust.core.tables import TABLES, MetricRow, conform, metric_rows_frame
from seqclust.runtime.store import TableStore


@dataclass(frozen=True)
class RunContext:
    run_id: str
    store: TableStore
    tables: TablesConfig
    started_at: dt.datetime  # fixed per run: "now" for validation is this, so reruns agree
    input_path: str | None = None
    labels_path: str | None = None
    # incremental mode: this run adds the events with since <= ts < until to the run id's tables
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    # rows this process wrote per table (summed over a table's partial writes): the summary of a
    # single-stage command, without counting every table again
    written: dict[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)

    @property
    def incremental(self) -> bool:
        return self.since is not None or self.until is not None

    @property
    def window_start(self) -> dt.datetime:
        """The window's key in ``events``/``quarantine`` (the epoch for an open start)."""
        return self.since or dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.store.root) / "_artifacts"

    @property
    def run_dir(self) -> Path:
        return self.artifacts_dir / "runs" / self.run_id

    def write(self, df: DataFrame, key: str, **kw: Any) -> int:
        """Replace this run's rows of table ``key`` (a ``tables.TABLES`` key) with ``df``, checked
        against the table's schema and partitioned as it says (``TableStore.write_run``)."""
        name = getattr(self.tables, key)
        return self.wrote(name, self.store.write_run(conform(df, key), name, self.run_id, partition_by=TABLES[key].partition_by, **kw))

    def wrote(self, name: str, n: int) -> int:
        """Note ``n`` rows written to table ``name`` by this process (a MERGE's inserts too); -1: not counted."""
        if n >= 0:
            self.written[name] = self.written.get(name, 0) + n
        return n


def write_metrics(spark: SparkSession, ctx: RunContext, rows: Iterable[MetricRow], families: Iterable[str]) -> int:
    """Replace this run's metrics of the given families with ``rows``."""
    families = tuple(families)
    for f in families:  # they reach SQL below
        if not f.replace("_", "").isalpha() or not f.islower():
            raise ValueError(f"metric family {f!r} is not a lower-case word")
    df = metric_rows_frame(spark, rows, families)
    fam = ", ".join(f"'{f}'" for f in families)
    return ctx.write(df, "metrics", extra_predicate=f"family IN ({fam})")
