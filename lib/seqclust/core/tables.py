"""Every Delta table seqclust writes, defined once: its columns and types, its partitioning, and
the typed rows of the two tables written from the driver (``runs`` and ``metrics``).

Each writer hands its DataFrame to ``conform`` before the table store writes it, so a column
that changes name or type in code fails there, naming the table and the column, instead of
landing as a silent schema change (the store writes with ``mergeSchema``, which would accept
it). The Arrow schema the sessionizer's workers emit derives from ``SESSION_PIECES``.
``run_id`` is added by the store and is not part of these schemas.

Table names are configurable (``tables.<key>``, validated identifiers); the keys here are the
fields of ``TablesConfig``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from seqclust import __version__
from seqclust.core.errors import SeqclustError

STR, INT, LONG, DBL, FLT, BOOL, TS = (
    T.StringType(),
    T.IntegerType(),
    T.LongType(),
    T.DoubleType(),
    T.FloatType(),
    T.BooleanType(),
    T.TimestampType(),
)


def _schema(*cols: tuple[str, T.DataType]) -> T.StructType:
    return T.StructType([T.StructField(n, t) for n, t in cols])


EVENTS = _schema(
    ("event_id", STR),
    ("user_id", STR),
    ("ts", TS),
    ("event_type", STR),
    ("item_id", STR),
    ("category_id", STR),
    ("price", DBL),
    ("window_start", TS),  # incremental windows: the window an event arrived in (null otherwise)
)
QUARANTINE = _schema(
    ("source", STR),
    ("source_file", STR),
    ("raw", STR),
    ("reason", STR),
    ("ingested_at", TS),
    ("window_start", TS),
)
SESSIONS = _schema(
    ("session_id", STR),
    ("user_id", STR),
    ("start_ts", TS),
    ("end_ts", TS),
    ("duration_s", DBL),
    ("n_events", INT),
    ("event_counts", T.MapType(STR, INT)),
    ("event_types", T.ArrayType(STR)),
    ("categories", T.ArrayType(STR)),
    ("items", T.ArrayType(STR)),
    ("prices", T.ArrayType(DBL)),
    ("gaps_s", T.ArrayType(DBL)),
    ("tokens", T.ArrayType(STR)),
    ("is_modelled", BOOL),
    ("root_start_ts", TS),  # a session cut by max length/duration: the start of its first piece
)
# what the sessionizer's workers emit: sessions and runaway pieces (``reason`` not null, lists empty)
SESSION_PIECES = T.StructType([*SESSIONS.fields, T.StructField("reason", STR)])
SESSION_QUARANTINE = _schema(
    ("session_id", STR),
    ("user_id", STR),
    ("start_ts", TS),
    ("end_ts", TS),
    ("n_events", LONG),
    ("reason", STR),
)
EMBEDDINGS = _schema(
    ("entity_type", STR),  # session | user
    ("entity_id", STR),
    ("embedding", T.ArrayType(FLT)),
    ("encoder_id", STR),
    ("user_id", STR),  # sessions only
    ("end_ts", TS),  # sessions only
    ("n_sessions", LONG),  # users only
)
CLUSTERS = _schema(
    ("entity_type", STR),
    ("entity_id", STR),
    ("cluster_id", INT),
    ("distance_to_centroid", DBL),
    ("granularity", STR),  # coarse (the top level) | leaf (the deepest segment of the tree) | fine (recommendation fill)
    ("segment_path", STR),  # coarse and leaf rows: the segment's place in the tree ('2', '2.1'); fine rows: null
    ("confidence", DBL),  # the margin of the user's segment over the nearest other at that level, 0..1 (hierarchy.margin)
)
CENTROIDS = _schema(
    ("cluster_id", INT),
    ("method", STR),  # encoder (top level) | fine | tokens (token segments) | tree (every node of the segment tree)
    ("centroid", T.ArrayType(DBL)),
    ("size", LONG),
    ("segment_path", STR),  # tree rows: the node's path; other rows: the top segment's path or null
)
CLUSTER_PROFILES = _schema(
    ("cluster_id", INT),  # coarse rows: the top-level cluster id; leaf and node rows: the leaf id / node index
    ("granularity", STR),  # coarse | leaf | node (a segment of the tree that is neither top nor leaf)
    ("segment_path", STR),
    ("size", LONG),
    ("share", DBL),
    ("sessions_per_user", DBL),
    ("event_mix", T.MapType(STR, DBL)),
    ("event_mix_lift", T.MapType(STR, DBL)),
    ("conversion_rate", DBL),
    ("median_session_events", DBL),
    ("median_session_duration_s", DBL),
    ("median_gap_s", DBL),
    ("median_price", DBL),
    ("price_index", DBL),
    ("top_categories", T.ArrayType(_schema(("category", STR), ("share", DBL), ("lift", DBL)))),
    ("description", STR),
)
METRICS = _schema(
    ("method", STR),
    ("entity_type", STR),
    ("k", INT),
    ("family", STR),
    ("metric", STR),
    ("value", DBL),
    ("ci_low", DBL),
    ("ci_high", DBL),
    ("details", STR),
)

# seqclust stream (the stream's own run id): see seqclust.serve.stream
LIVE_SEGMENTS = _schema(
    ("user_id", STR),
    ("cluster_id", INT),  # the top-level segment
    ("distance_to_centroid", DBL),
    ("model_run_id", STR),
    ("encoder_id", STR),
    ("sessions_counted", LONG),
    ("last_session_id", STR),
    ("updated_at", TS),
    ("batch_id", LONG),
    ("confidence", DBL),  # at the top level (as clusters.confidence)
    ("leaf_id", INT),  # the leaf of the model run's segment tree (its cluster_id among the leaves)
    ("segment_path", STR),
    ("leaf_confidence", DBL),
)
# a stream user's pooling state (the sufficient statistics of batch pooling: exact, bounded by
# the vocabulary and the vector size, not by the user's history); prev_* is the state before
# the batch that wrote the row, so a re-run of that batch starts from it again
_STATE = (
    ("sessions", LONG),
    ("vector_sum", T.ArrayType(DBL)),
    ("token_counts", T.MapType(STR, LONG)),
    ("last_end_ts", TS),
    ("last_session_id", STR),
)
LIVE_USER_STATE = _schema(
    ("user_id", STR),
    ("batch_id", LONG),
    *_STATE,
    *((f"prev_{name}", t) for name, t in _STATE),
)
LIVE_SESSIONS = _schema(
    ("session_id", STR),
    ("user_id", STR),
    ("start_ts", TS),
    ("end_ts", TS),
    ("n_events", INT),
    ("embedding", T.ArrayType(FLT)),
    ("cluster_id", INT),  # the user's segment after this session closed
    ("batch_id", LONG),
)
# the clean events of the sessions a micro-batch left open, tagged with its batch id: the next
# micro-batch sessionizes them again with its new events (bounded by the lateness and the gap)
LIVE_OPEN_EVENTS = T.StructType([*EVENTS.fields, T.StructField("batch_id", LONG)])
LIVE_PROGRESS = _schema(
    ("batch_id", LONG),  # -1: a flush (every open session closed)
    ("input_rows", LONG),
    ("quarantined", LONG),
    ("late", LONG),
    ("new_events", LONG),
    ("closed_sessions", LONG),
    ("users_updated", LONG),
    ("max_ts", TS),  # the latest event time of this batch (the watermark's base)
    ("watermark", TS),
    ("seconds", DBL),
    ("finished_at", TS),
    ("source", STR),
)

# ---------------------------------------------------------------------------------------
# runs: one row per run, mutable while the run goes on


@dataclass
class RunRecord:
    """The ``runs`` row of one run; ``RUNS`` (its Spark schema) derives from these fields."""

    status: str = "running"
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    error: str | None = None
    config_json: str | None = None
    config_hash: str | None = None
    code_version: str | None = __version__
    git_commit: str | None = None
    input_path: str | None = None
    input_fingerprint: str | None = None
    input_delta_version: int | None = None
    input_files: int | None = None
    labels_path: str | None = None
    encoder_id: str | None = None
    encoder_path: str | None = None
    rows_input: int | None = None
    rows_clean: int | None = None
    rows_quarantined: int | None = None
    rows_duplicates: int | None = None
    rows_out_of_window: int | None = None
    window_since: dt.datetime | None = None
    window_until: dt.datetime | None = None
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    # valid rows with an empty optional column (item_id, category_id, price), by column
    rows_empty_optional: dict[str, int] = field(default_factory=dict)
    sessions: int | None = None
    sessions_quarantined: int | None = None
    users: int | None = None
    k: int | None = field(default=None, metadata={"spark": INT})
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stages_completed: list[str] = field(default_factory=list)
    report_path: str | None = None
    mlflow_run_id: str | None = None
    # the process running the run (host:pid:token) and its last heartbeat (seqclust.runtime.lease)
    lease_owner: str | None = None
    lease_heartbeat: dt.datetime | None = None

    def row(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def from_row(cls, d: Mapping[str, Any]) -> RunRecord:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None})


_PY = {str: STR, int: LONG, float: DBL, bool: BOOL, dt.datetime: TS}


def _spark_type(tp: Any) -> T.DataType:
    """The Spark type of a (possibly optional) annotation of ``RunRecord``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is dict:
        return T.MapType(_spark_type(args[0]), _spark_type(args[1]))
    if origin is list:
        return T.ArrayType(_spark_type(args[0]))
    if args and origin is not None and len(args) == 1:  # X | None
        return _spark_type(args[0])
    if tp in _PY:
        return _PY[tp]
    raise TypeError(f"no Spark type for {tp!r}")


def _record_schema(cls: type) -> T.StructType:
    hints = typing.get_type_hints(cls)
    return T.StructType([T.StructField(f.name, f.metadata.get("spark") or _spark_type(hints[f.name])) for f in dataclasses.fields(cls)])


RUNS = _record_schema(RunRecord)


# ---------------------------------------------------------------------------------------
# metrics: the only way to build a metrics row


@dataclass(frozen=True)
class MetricRow:
    """One row of ``metrics``. ``details`` is a mapping (written as sorted JSON); a value that is
    not a finite number is written as null."""

    method: str
    family: str
    metric: str
    value: float | None
    k: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    details: Mapping[str, Any] | None = None
    entity_type: str = "user"

    def __post_init__(self) -> None:
        for name in ("method", "family", "metric", "entity_type"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"MetricRow.{name} must be a non-empty string, not {getattr(self, name)!r}")
        if self.details is not None and not isinstance(self.details, Mapping):
            raise TypeError(f"MetricRow.details must be a mapping, not {type(self.details).__name__}")

    def with_k(self, k: int) -> MetricRow:
        return dataclasses.replace(self, k=k)

    def row(self) -> tuple[Any, ...]:
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(float(x)) else float(x)

        details = None if self.details is None else json.dumps(dict(self.details), sort_keys=True)
        return (
            self.method,
            self.entity_type,
            None if self.k is None else int(self.k),
            self.family,
            self.metric,
            num(self.value),
            num(self.ci_low),
            num(self.ci_high),
            details,
        )


def metric_rows_frame(spark: SparkSession, rows: Iterable[MetricRow], families: Iterable[str]) -> DataFrame:
    """``rows`` as a DataFrame of ``METRICS``; every row's family must be in ``families`` (the
    families the writer replaces)."""
    fams = set(families)
    data = []
    for r in rows:
        if not isinstance(r, MetricRow):
            raise TypeError(f"metrics rows are MetricRow, not {type(r).__name__}")
        if r.family not in fams:
            raise ValueError(f"metric row of family {r.family} written with families {sorted(fams)}")
        data.append(r.row())
    return spark.createDataFrame(data, METRICS)


# ---------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class TableSpec:
    key: str  # the TablesConfig field naming the table
    schema: T.StructType
    partition_by: tuple[str, ...] = ("run_id",)
    doc: str = ""


TABLES: dict[str, TableSpec] = {
    s.key: s
    for s in (
        TableSpec("events", EVENTS, doc="clean, de-duplicated events"),
        TableSpec("quarantine", QUARANTINE, doc="input rows refused, with the reason"),
        TableSpec("sessions", SESSIONS, doc="one row per session"),
        TableSpec("session_quarantine", SESSION_QUARANTINE, doc="runaway (bot-like) sessions"),
        TableSpec("embeddings", EMBEDDINGS, ("run_id", "entity_type"), doc="session and user vectors"),
        TableSpec("clusters", CLUSTERS, doc="each user's segment: top level (coarse), deepest (leaf) and fine"),
        TableSpec(
            "centroids",
            CENTROIDS,
            doc="segment centres (method encoder | fine | tree) and token segments (method tokens: log prior, then log p of each behaviour token)",
        ),
        TableSpec("cluster_profiles", CLUSTER_PROFILES, doc="what each segment does"),
        TableSpec("metrics", METRICS, doc="every measured figure, by family"),
        TableSpec("runs", RUNS, doc="one row per run"),
        TableSpec("live_segments", LIVE_SEGMENTS, doc="seqclust stream: each user's current segment"),
        TableSpec("live_sessions", LIVE_SESSIONS, doc="seqclust stream: each closed session, its vector and the user's segment"),
        TableSpec("live_progress", LIVE_PROGRESS, doc="seqclust stream: one row per micro-batch"),
        TableSpec("live_user_state", LIVE_USER_STATE, doc="seqclust stream: each user's pooling state (sums and counts)"),
        TableSpec("live_open_events", LIVE_OPEN_EVENTS, doc="seqclust stream: the events of the sessions still open"),
    )
}


def _plain(t: T.DataType) -> T.DataType:
    """``t`` without nullability flags (what ``conform`` compares)."""
    if isinstance(t, T.ArrayType):
        return T.ArrayType(_plain(t.elementType), True)
    if isinstance(t, T.MapType):
        return T.MapType(_plain(t.keyType), _plain(t.valueType), True)
    if isinstance(t, T.StructType):
        return T.StructType([T.StructField(f.name, _plain(f.dataType), True) for f in t.fields])
    return t


def conform(df: DataFrame, key: str) -> DataFrame:
    """``df`` with the columns of table ``key`` in their declared order; a missing column, an
    extra one or a different type is a SeqclustError naming each (a bug in a writer, caught
    before it reaches the table)."""
    spec = TABLES[key]
    have = {f.name: f.dataType for f in df.schema.fields if f.name != "run_id"}
    want = {f.name: f.dataType for f in spec.schema.fields}
    problems = [f"{c} missing" for c in want if c not in have]
    problems += [f"{c} not in the contract" for c in have if c not in want]
    problems += [
        f"{c} is {have[c].simpleString()}, the contract says {want[c].simpleString()}"
        for c in want
        if c in have and _plain(have[c]) != _plain(want[c])
    ]
    if problems:
        raise SeqclustError(f"table {key}: the rows do not match its schema in seqclust.core.tables: {'; '.join(problems)}")
    return df.select(*want, *(["run_id"] if "run_id" in df.columns else []))


def arrow_schema(schema: T.StructType):  # -> pyarrow.Schema
    """The Arrow schema of a Spark schema as the Arrow exchange uses it (timestamps in UTC
    microseconds)."""
    import pyarrow as pa

    def conv(t: T.DataType) -> pa.DataType:
        simple = {
            T.StringType: pa.string(),
            T.IntegerType: pa.int32(),
            T.LongType: pa.int64(),
            T.DoubleType: pa.float64(),
            T.FloatType: pa.float32(),
            T.BooleanType: pa.bool_(),
            T.TimestampType: pa.timestamp("us", tz="UTC"),
        }
        if type(t) in simple:
            return simple[type(t)]
        if isinstance(t, T.ArrayType):
            return pa.list_(conv(t.elementType))
        if isinstance(t, T.MapType):
            return pa.map_(conv(t.keyType), conv(t.valueType))
        if isinstance(t, T.StructType):
            return pa.struct([(f.name, conv(f.dataType)) for f in t.fields])
        raise TypeError(f"no Arrow type for {t.simpleString()}")

    return pa.schema([(f.name, conv(f.dataType)) for f in schema.fields])
