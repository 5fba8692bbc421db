"""Typed configuration: frozen dataclasses loaded from YAML.

Resolution order (later wins): dataclass defaults < ``conf/base.yaml`` < ``conf/<env>.yaml``
< ``--set key=value`` overrides. Unknown keys and bad values fail at load time with a
message that names the dotted key. ``conf/base.yaml`` documents every key and is kept equal
to the defaults below by a test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from seqclust.core.errors import ConfigError

CANONICAL_EVENT_TYPES = ("view", "search", "cart", "fav", "purchase", "other")

# Identifiers that reach SQL or the filesystem: conservative on purpose.
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


T_ = typing.TypeVar("T_")


def validate_identifier(name: str, what: str) -> str:
    """Return ``name`` if it is a safe SQL/file identifier, else raise ConfigError."""
    if not isinstance(name, str) or not _IDENT_RE.match(name):
        raise ConfigError(f"{what}: {name!r} is not a valid name (letters, digits, underscore; must not start with a digit)")
    return name


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is safe to use in a Delta predicate and a path."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ConfigError(f"run_id: {run_id!r} is not allowed (1-64 of letters, digits, '_', '-', '.'; must start with a letter or digit)")
    return run_id


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class SparkConfig:
    master: str | None = None  # None: leave it to spark-submit / an existing session
    app_name: str = "seqclust"
    shuffle_partitions: int = 8
    # a run of more rows than shuffle_partitions x this gets one shuffle partition per this many
    # input rows (set per stage from the run's row count; 0: always shuffle_partitions). At 100M
    # events four partitions spilled ~40 GB to disk (docs/SCALING.md)
    rows_per_partition: int = 2_500_000
    log_level: str = "WARN"
    driver_memory: str | None = None  # only honoured when this process starts the JVM
    conf: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.shuffle_partitions >= 1, "shuffle_partitions", "must be >= 1")
        _check(self.rows_per_partition >= 0, "rows_per_partition", "must be >= 0 (0: never more than shuffle_partitions)")
        _check(self.log_level in ("ERROR", "WARN", "INFO", "DEBUG"), "log_level", "must be ERROR, WARN, INFO or DEBUG")


@dataclass(frozen=True)
class ColumnsConfig:
    """Source column name for each logical field; None when the source lacks it."""

    user_id: str = "user_id"
    ts: str = "ts"
    event_type: str | None = "event_type"  # None: every event is source.default_event_type
    item_id: str | None = "item_id"
    category_id: str | None = "category_id"
    price: str | None = "price"
    event_id: str | None = "event_id"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            _check(v is None or (isinstance(v, str) and v.strip() != ""), f.name, "must be a non-empty column name or null")
        for req in ("user_id", "ts"):
            _check(getattr(self, req) is not None, req, "is required")


@dataclass(frozen=True)
class KafkaConfig:
    """``source.format: kafka`` (``seqclust stream`` only): each message's value is one event as a
    JSON object, read with the same column mapping as JSON lines."""

    bootstrap_servers: str | None = None  # host:port[,host:port...]
    topic: str | None = None  # one topic, or several separated by commas
    starting_offsets: str = "earliest"  # where a new stream (no checkpoint yet) starts: earliest | latest
    max_offsets_per_trigger: int | None = None  # at most this many messages per micro-batch (null: all there are)
    # further options of Spark's Kafka source as is, e.g. {"kafka.security.protocol": "SASL_SSL"}
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.starting_offsets in ("earliest", "latest"), "kafka.starting_offsets", "must be earliest or latest")
        _check(self.max_offsets_per_trigger is None or self.max_offsets_per_trigger >= 1, "kafka.max_offsets_per_trigger", "must be >= 1")
        for key in ("subscribe", "subscribePattern", "assign", "kafka.bootstrap.servers", "startingOffsets"):
            _check(key not in self.options, f"kafka.options.{key}", "is set by source.kafka's own keys")


@dataclass(frozen=True)
class SourceConfig:
    path: str | None = None
    # kafka: seqclust stream only (source.kafka)
    format: Literal["auto", "parquet", "csv", "json", "delta", "kafka"] = "auto"
    delimiter: str = ","
    header: bool = True
    encoding: str = "UTF-8"  # of CSV / JSON files; bytes that do not decode are quarantined as bad_encoding
    multiline: bool = False  # CSV: quoted fields may hold line breaks (each file is then read by one task)
    file_glob: str | None = None  # only files whose name matches, e.g. "*.csv" (Spark pathGlobFilter)
    # a Delta source: read this table version (time travel) instead of the latest; null = latest
    delta_version: int | None = None
    # how ingest keeps the validated rows between its passes (reason counts, quarantine, events):
    # auto = none for Parquet/Delta (re-reading columnar files is as fast as a cache, measured at
    # 10M, and keeps the heap free: a memory cache ran the 100M bench out of it), disk for
    # CSV/JSON (parsed once)
    cache: Literal["auto", "none", "disk", "memory"] = "auto"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    # auto: native timestamps as is, strings as ISO-8601, numbers as epoch seconds
    ts_format: str = "auto"
    timezone: str = "UTC"
    # raw value -> canonical type; raw values not listed are unknown
    event_types: dict[str, str] = field(default_factory=lambda: {t: t for t in CANONICAL_EVENT_TYPES})
    unknown_event_type: Literal["quarantine", "other"] = "quarantine"
    default_event_type: str = "view"  # used when columns.event_type is null
    min_ts: str = "2000-01-01T00:00:00Z"
    max_clock_skew_hours: float = 24.0
    max_price: float = 1.0e7

    def __post_init__(self) -> None:
        _check(len(self.delimiter) >= 1, "delimiter", "must not be empty")
        for raw, canon in self.event_types.items():
            _check(canon in CANONICAL_EVENT_TYPES, f"event_types.{raw}", f"must be one of {', '.join(CANONICAL_EVENT_TYPES)}")
        _check(self.max_price > 0, "max_price", "must be > 0")
        _check(self.default_event_type in CANONICAL_EVENT_TYPES, "default_event_type", f"must be one of {', '.join(CANONICAL_EVENT_TYPES)}")
        _check(self.max_clock_skew_hours >= 0, "max_clock_skew_hours", "must be >= 0")
        _check(self.delta_version is None or self.delta_version >= 0, "delta_version", "must be >= 0 or null")
        _check(
            self.format != "kafka" or bool(self.kafka.bootstrap_servers and self.kafka.topic),
            "format",
            "kafka needs source.kafka.bootstrap_servers and source.kafka.topic",
        )
        _check(
            self.ts_format in TS_KEYWORDS or _is_datetime_pattern(self.ts_format),
            "ts_format",
            f"{self.ts_format!r} is neither one of {', '.join(TS_KEYWORDS)} nor a Spark datetime pattern "
            "(e.g. yyyy-MM-dd HH:mm:ss; letters outside quotes must be pattern letters)",
        )


TS_KEYWORDS = ("auto", "epoch_s", "epoch_ms", "iso8601")
# the pattern letters Spark's datetime parser accepts (Spark 3+: week-based letters are refused)
_PATTERN_LETTERS = set("GyMLdDQqEFaHhKkmsSVzOXxZ")


def _is_datetime_pattern(fmt: str) -> bool:
    """Whether ``fmt`` reads as a Spark datetime pattern: outside 'quoted' text, every letter
    is a pattern letter, and there is at least one."""
    import re

    bare = re.sub(r"'[^']*'", "", fmt)
    if bare.count("'"):
        return False  # an unclosed quote
    letters = [c for c in bare if c.isalpha()]
    return bool(letters) and all(c in _PATTERN_LETTERS for c in letters)


@dataclass(frozen=True)
class LabelsConfig:
    """Known labels per user (e.g. planted personas), used for external agreement only."""

    path: str | None = None
    format: Literal["auto", "parquet", "csv", "json", "delta"] = "auto"
    user_col: str = "user_id"
    label_col: str = "persona"


@dataclass(frozen=True)
class SessionizeConfig:
    """Analytics-style rules (GA4/Snowplow defaults where they have one)."""

    gap_minutes: float = 30.0
    max_duration_minutes: float = 24 * 60.0  # longer sessions are cut into windows of this
    max_events: int = 1000  # longer sessions are cut into chunks of this many events
    min_events: int = 1  # shorter sessions are kept but not modelled
    midnight_split: bool = False  # GA4 does not split at midnight
    timezone: str = "UTC"  # whose midnight
    # runaway/bot sessions (before any cut) go to the session quarantine, not to modelling
    bot_events_per_minute: float = 60.0
    bot_min_events: int = 100  # the rate rule applies from this many events on
    bot_max_events: int = 5000
    # arrow: one shuffle + sort + vectorised numpy over Arrow batches (fast);
    # sql: Spark window functions (the reference engine; same rules, same ids)
    engine: Literal["arrow", "sql"] = "arrow"

    def __post_init__(self) -> None:
        _check(self.gap_minutes > 0, "gap_minutes", "must be > 0")
        _check(self.max_duration_minutes > 0, "max_duration_minutes", "must be > 0")
        _check(self.max_events >= 1, "max_events", "must be >= 1")
        _check(self.min_events >= 1, "min_events", "must be >= 1")
        _check(self.bot_events_per_minute > 0, "bot_events_per_minute", "must be > 0")
        _check(self.bot_min_events >= 1, "bot_min_events", "must be >= 1")
        _check(self.bot_max_events >= 1, "bot_max_events", "must be >= 1")


TOKEN_FIELDS = ("event_type", "category", "item", "price_band", "gap_bucket")


@dataclass(frozen=True)
class TokenizeConfig:
    max_len: int = 50
    vocab_size: int = 5000
    min_count: int = 2
    price_bands: int = 8
    # what a token is: any of event_type, category, item, price_band, gap_bucket, joined by ':'
    token_fields: list[str] = field(default_factory=lambda: ["event_type", "category"])

    def __post_init__(self) -> None:
        _check(len(self.token_fields) >= 1, "token_fields", "must name at least one field")
        bad = [f for f in self.token_fields if f not in TOKEN_FIELDS]
        _check(not bad, "token_fields", f"unknown field(s) {', '.join(map(repr, bad))} (choose from {', '.join(TOKEN_FIELDS)})")
        _check(len(set(self.token_fields)) == len(self.token_fields), "token_fields", "lists a field twice")
        _check(self.max_len >= 2, "max_len", "must be >= 2")
        _check(self.vocab_size >= 8, "vocab_size", "must be >= 8")
        _check(self.min_count >= 1, "min_count", "must be >= 1")
        _check(2 <= self.price_bands <= 64, "price_bands", "must be between 2 and 64")


@dataclass(frozen=True)
class EncoderConfig:
    architecture: Literal["gru", "transformer"] = "gru"
    objective: Literal["bag_reconstruction", "contrastive"] = "bag_reconstruction"
    embedding_dim: int = 64
    token_dim: int = 32
    hidden: int = 64
    train_sample: int = 20000
    epochs: int = 30  # an upper bound: early stopping on validation loss (patience) ends training
    batch_size: int = 256
    learning_rate: float = 0.003
    validation_fraction: float = 0.1
    patience: int = 2
    mask_prob: float = 0.15
    path: str | None = None  # reuse an existing artifact instead of training

    def __post_init__(self) -> None:
        _check(2 <= self.embedding_dim <= 1024, "embedding_dim", "must be between 2 and 1024")
        _check(self.token_dim >= 2, "token_dim", "must be >= 2")
        _check(self.hidden >= 2, "hidden", "must be >= 2")
        _check(self.train_sample >= 10, "train_sample", "must be >= 10")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(0 <= self.validation_fraction < 0.9, "validation_fraction", "must be in [0, 0.9)")
        _check(self.patience >= 0, "patience", "must be >= 0")
        _check(0 <= self.mask_prob < 1, "mask_prob", "must be in [0, 1)")


@dataclass(frozen=True)
class EmbedConfig:
    arrow_batch_size: int = 4096
    pooling: Literal["mean", "recency"] = "mean"
    recency_half_life_days: float = 14.0
    # a reused encoder must know most of this data's tokens, else it is for another catalogue
    max_oov_rate: float = 0.5
    # gpu: each task pins the GPU Spark assigned it (spark.task.resource.gpu.amount=1)
    device: Literal["cpu", "gpu"] = "cpu"
    # what a user vector is: the pooled encoder vectors, the behaviour tokens (TF-IDF of
    # event-type n-grams, type x price x pace, interest, session shape and time; SVD), or both
    # concatenated (hybrid, each block's share of the squared norm set by hybrid_weight)
    representation: Literal["encoder", "tokens", "hybrid"] = "hybrid"
    hybrid_weight: float = 0.5  # the encoder block's share in the hybrid
    token_vocab: int = 5000  # behaviour tokens kept: those used by most users
    token_min_df: int = 2
    token_dim: int = 64  # SVD dimensions of the behaviour tokens
    token_fit_users: int = 20000  # the SVD is fitted on a seeded hash sample of about this many users

    def __post_init__(self) -> None:
        _check(self.arrow_batch_size >= 1, "arrow_batch_size", "must be >= 1")
        _check(0 < self.hybrid_weight < 1, "hybrid_weight", "must be in (0, 1)")
        _check(self.token_vocab >= 2, "token_vocab", "must be >= 2")
        _check(self.token_min_df >= 1, "token_min_df", "must be >= 1")
        _check(2 <= self.token_dim <= 512, "token_dim", "must be between 2 and 512")
        _check(100 <= self.token_fit_users <= 1_000_000, "token_fit_users", "must be from 100 to 1000000 (held in driver memory)")
        _check(0 < self.max_oov_rate <= 1, "max_oov_rate", "must be in (0, 1]")
        _check(self.recency_half_life_days > 0, "recency_half_life_days", "must be > 0")


@dataclass(frozen=True)
class ClusterConfig:
    k: int | None = None  # None: sweep k_min..k_max and pick by silhouette
    k_min: int = 2
    k_max: int = 12
    max_iter: int = 40
    # MLlib k-means|| rounds (Spark's default is 2; 5 finds the better optimum far more often and
    # converges in fewer iterations) and seeded starts per fit, the lowest inertia kept (the
    # sweep's in-memory k-means++ fits use n_init and max_iter too)
    init_steps: int = 5
    n_init: int = 3
    # k-means++ starts per k in the in-memory sweep (cheap there; fewer starts leave the
    # silhouette curve at the mercy of local optima). The chosen k's sweep centres also
    # compete with the MLlib fit: the lower inertia on all users gives the segments.
    sweep_n_init: int = 10
    solver: Literal["auto", "row", "block"] = "block"
    # k rule (docs/EVALUATION.md): silhouette = the best silhouette (in the sweep's space, see
    # sweep_pca_dim); parsimonious = the smallest k whose silhouette is within
    # silhouette_tolerance of the best; stability = the most stable k within the tolerance.
    # Every rule says "k uncertain" when a k further than one away is within the tolerance.
    selection: Literal["parsimonious", "stability", "silhouette"] = "silhouette"
    silhouette_tolerance: float = 0.05
    stability_runs: int = 3  # refits on subsamples per k (ARI vs the full fit)
    stability_fraction: float = 0.8
    # choose k on (a seeded hash sample of about) this many users, in driver memory, then fit
    # the chosen k with MLlib on every user: the sweep's cost stops growing with the data
    sweep_sample: int = 50000
    # the sweep and the persona fit run on the top this-many principal components of the
    # (sampled) user vectors, centres then lifted back to the vectors; null: on the vectors
    sweep_pca_dim: int | None = 32
    # personas are fitted on users with at least this many modelled sessions (when there are
    # 20 per k or more), then every user is assigned; 1: fit on every user
    fit_min_sessions: int = 2
    # segment profiles: exact sizes, the other figures from a seeded hash sample of about this
    # many users' sessions (null: all users)
    profile_sample: int | None = 50000
    # user vectors per partition for KMeans (data-sized, not core-sized: same segments anywhere)
    rows_per_partition: int = 100000
    # assign users to the segments of an earlier run (its saved KMeans) instead of fitting
    model_run: str | None = None
    # fine segments beside the personas (granularity 'fine' in clusters): k in the tens, for
    # recommendation fill; at most one per fine_min_users users; null: none
    fine_k: int | None = 50
    fine_min_users: int = 20
    # the fine segments' KMeans is fitted on a seeded hash sample of about this many users (every
    # user is then placed): at 100M events, 50 centres on all 2.1M users took 8 min; null: all
    fine_fit_users: int | None = 200000
    # the k-means segments refined by the likelihood of each user's behaviour tokens (hard EM
    # of per-field multinomials, seqclust.segment.refine; needs a representation with behaviour tokens):
    # tokens | none. alpha: Laplace smoothing; stops after refine_max_iter passes or when at
    # most refine_tol of the users change segment in a pass
    refine: Literal["tokens", "none"] = "tokens"
    refine_alpha: float = 1.0
    refine_max_iter: int = 10
    refine_tol: float = 0.001
    # the segment tree (seqclust.segment.hierarchy, docs/EVALUATION.md): each segment of the top
    # level is tested for sub-structure on its own members and split where the silhouette of its
    # best sub-split beats one Gaussian blob's by split_min_gap, the split is stable
    # (split_min_stability) and users keep their sub-segment across the two halves of their
    # history (split_min_temporal ARI); recursively, to split_max_depth levels in all (1: flat).
    # Segments with fewer than split_min_users tested members stay leaves; no sub-segment may
    # have fewer than split_min_child_users. Tested on a hash sample of about split_sample
    # fitted users.
    split_max_depth: int = 3
    split_min_users: int = 200
    split_min_child_users: int = 50
    split_k_max: int = 6
    split_min_gap: float = 0.15
    split_min_stability: float = 0.8
    split_min_temporal: float = 0.5
    split_sample: int = 20000
    # a user is a confident member of their segment when the margin of its centre over the
    # nearest other one (clusters.confidence, 0..1, hierarchy.margin) is at least this; the run
    # reports the confident share per level and how the confident members' segments hold
    # across time and predict conversion, and `seqclust export --min-confidence` keeps them
    min_confidence: float = 0.2

    def __post_init__(self) -> None:
        _check(0 <= self.min_confidence <= 1, "min_confidence", "must be in [0, 1]")
        _check(1 <= self.split_max_depth <= 5, "split_max_depth", "must be from 1 to 5")
        _check(self.split_min_users >= 20, "split_min_users", "must be >= 20")
        _check(self.split_min_child_users >= 5, "split_min_child_users", "must be >= 5")
        _check(2 <= self.split_k_max <= 20, "split_k_max", "must be from 2 to 20")
        _check(0 <= self.split_min_gap < 1, "split_min_gap", "must be in [0, 1)")
        _check(0 <= self.split_min_stability <= 1, "split_min_stability", "must be in [0, 1]")
        _check(-1 <= self.split_min_temporal <= 1, "split_min_temporal", "must be in [-1, 1]")
        _check(self.split_sample >= 1000, "split_sample", "must be >= 1000")
        _check(self.refine in ("tokens", "none"), "refine", "must be tokens or none")
        _check(self.refine_alpha > 0, "refine_alpha", "must be > 0")
        _check(1 <= self.refine_max_iter <= 100, "refine_max_iter", "must be from 1 to 100")
        _check(0 <= self.refine_tol < 1, "refine_tol", "must be in [0, 1)")
        if self.model_run is not None:
            validate_run_id(self.model_run)
        _check(0 <= self.silhouette_tolerance < 1, "silhouette_tolerance", "must be in [0, 1)")
        _check(self.stability_runs >= 0, "stability_runs", "must be >= 0")
        _check(0 < self.stability_fraction <= 1, "stability_fraction", "must be in (0, 1]")
        _check(self.k is None or self.k >= 2, "k", "must be >= 2 or null")
        _check(self.k_min >= 2, "k_min", "must be >= 2")
        _check(self.k_max >= self.k_min, "k_max", "must be >= k_min")
        _check(self.max_iter >= 1, "max_iter", "must be >= 1")
        _check(self.init_steps >= 1, "init_steps", "must be >= 1")
        _check(self.n_init >= 1, "n_init", "must be >= 1")
        _check(self.sweep_n_init >= 1, "sweep_n_init", "must be >= 1")
        _check(self.fine_k is None or 2 <= self.fine_k <= 5000, "fine_k", "must be from 2 to 5000, or null")
        _check(self.fine_min_users >= 2, "fine_min_users", "must be >= 2")
        _check(self.fine_fit_users is None or self.fine_fit_users >= 1000, "fine_fit_users", "must be >= 1000 or null")
        _check(self.sweep_pca_dim is None or self.sweep_pca_dim >= 2, "sweep_pca_dim", "must be >= 2 or null")
        _check(self.fit_min_sessions >= 1, "fit_min_sessions", "must be >= 1")
        _check(self.rows_per_partition >= 1000, "rows_per_partition", "must be >= 1000")
        _check(self.profile_sample is None or self.profile_sample >= 1000, "profile_sample", "must be >= 1000 or null")
        _check(
            isinstance(self.sweep_sample, int) and 100 <= self.sweep_sample <= 2_000_000,
            "sweep_sample",
            "must be a number of users from 100 to 2000000 (the k sweep holds this many vectors in driver memory)",
        )


@dataclass(frozen=True)
class BaselineConfig:
    """The bag-of-events baseline (TF-IDF of tokens per user), clustered at the encoder's k."""

    bag_of_events: bool = True
    vocab_size: int = 1000
    min_df: int = 2
    pca_dim: int | None = None

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 2, "vocab_size", "must be >= 2")
        _check(self.min_df >= 1, "min_df", "must be >= 1")
        _check(self.pca_dim is None or self.pca_dim >= 2, "pca_dim", "must be >= 2 or null")


@dataclass(frozen=True)
class EvaluateConfig:
    """Downstream usefulness: next-session HitRate/NDCG@top_n of segment-based lists."""

    downstream: bool = True
    top_n: int = 10
    bootstrap: int = 200  # replicates for the confidence intervals
    # return-within-N-days: does the segment predict who comes back (0 = skip; skipped too when
    # the log spans less than two windows)
    return_days: float = 7.0
    # above this many clustered users every family is measured on a seeded hash sample of about
    # this many (null: all users): the evaluation's cost stops growing with the data, and at
    # this size the estimates' intervals are a fraction of the gaps between methods
    sample_users: int | None = 25000

    def __post_init__(self) -> None:
        _check(self.sample_users is None or self.sample_users >= 1000, "sample_users", "must be >= 1000 or null")
        _check(self.top_n >= 1, "top_n", "must be >= 1")
        _check(self.bootstrap >= 10, "bootstrap", "must be >= 10")
        _check(self.return_days >= 0, "return_days", "must be >= 0 (0 = skip)")


@dataclass(frozen=True)
class TablesConfig:
    """Table names (a folder under run.output locally; catalog.schema.<name> on Databricks)."""

    quarantine: str = "quarantine"
    events: str = "events"
    sessions: str = "sessions"
    session_quarantine: str = "session_quarantine"
    embeddings: str = "embeddings"
    clusters: str = "clusters"
    cluster_profiles: str = "cluster_profiles"
    centroids: str = "centroids"
    metrics: str = "metrics"
    runs: str = "runs"
    live_segments: str = "live_segments"  # seqclust stream: each user's current segment
    live_sessions: str = "live_sessions"  # seqclust stream: each closed session, its vector and segment
    live_progress: str = "live_progress"  # seqclust stream: one row per micro-batch
    live_user_state: str = "live_user_state"  # seqclust stream: each user's pooling state (sums and counts)
    live_open_events: str = "live_open_events"  # seqclust stream: the events of the sessions still open
    # Set ``schema`` (and on Unity Catalog ``catalog``) to keep the tables in the metastore as
    # <catalog>.<schema>.<name> instead of folders under run.output (Databricks).
    catalog: str | None = None
    schema: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None or f.name not in ("catalog", "schema"):
                validate_identifier(v, f"tables.{f.name}")
        _check(self.catalog is None or self.schema is not None, "tables.catalog", "needs tables.schema too")

    def names(self) -> list[str]:
        """The table names (without catalog and schema)."""
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("catalog", "schema")]


@dataclass(frozen=True)
class RunConfig:
    output: str = "out"
    run_id: str | None = None
    seed: int = 42
    # a run id is run by one process at a time; a lease not renewed for this long is free
    lease_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check(bool(self.output), "output", "must not be empty")
        _check(self.lease_timeout_s >= 10, "lease_timeout_s", "must be >= 10 seconds")
        if self.run_id is not None:
            validate_run_id(self.run_id)


@dataclass(frozen=True)
class PrivacyConfig:
    """Optional pseudonymisation of user ids at ingest, before anything is written.

    The salt is a secret: it never sits in a config file; it is read from the environment
    variable named here (on Databricks, set it from a secret scope in the cluster's env).
    """

    pseudonymize: bool = False
    salt_env: str = "SEQCLUST_PSEUDONYM_SALT"
    min_salt_length: int = 16

    def __post_init__(self) -> None:
        _check(bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.salt_env)), "salt_env", "must be an environment variable name")
        _check(self.min_salt_length >= 8, "min_salt_length", "must be >= 8")

    def salt(self) -> str | None:
        """The salt when pseudonymisation is on (ConfigError if it is missing or short), else None."""
        if not self.pseudonymize:
            return None
        value = os.environ.get(self.salt_env, "")
        if len(value) < self.min_salt_length:
            raise ConfigError(
                f"privacy.pseudonymize is on but ${self.salt_env} is {'unset' if not value else 'too short'}: "
                f"export a secret of at least {self.min_salt_length} characters (never put it in conf/)"
            )
        return value


@dataclass(frozen=True)
class GenerateConfig:
    """Defaults for the embedded demo run (no --input): generated data."""

    users: int = 5000
    seed: int = 7
    bad_rate: float = 0.001

    def __post_init__(self) -> None:
        _check(self.users >= 1, "users", "must be >= 1")
        _check(0 <= self.bad_rate < 1, "bad_rate", "must be in [0, 1)")


@dataclass(frozen=True)
class StreamConfig:
    """``seqclust stream``: live segments from a stream of events (see ``seqclust.serve.stream``)."""

    # events up to this much older than the latest one seen are still merged into their
    # sessions; older ones are quarantined as late. A session closes when its last event is
    # more than sessionize.gap_minutes older than (latest seen - this).
    allowed_lateness_minutes: float = 10.0
    trigger_seconds: float = 10.0  # micro-batch interval (without --available-now)
    max_files_per_trigger: int | None = None  # file sources: at most this many new files per micro-batch
    # also write the stream run's events and sessions (each once, when its session closes); the
    # batch tables are the system of record, so a stream does not keep its own copies by default
    keep_history: bool = False

    def __post_init__(self) -> None:
        _check(self.allowed_lateness_minutes >= 0, "allowed_lateness_minutes", "must be >= 0")
        _check(self.trigger_seconds > 0, "trigger_seconds", "must be > 0")
        _check(self.max_files_per_trigger is None or self.max_files_per_trigger >= 1, "max_files_per_trigger", "must be >= 1")


@dataclass(frozen=True)
class ReportConfig:
    """The HTML report's pictures: the map of users, typical journeys."""

    # the map: a seeded hash sample of at most this many users (PCA of their vectors, the bag of
    # events of the same users beside it); t-SNE on the first tsne_users of them (0 = no t-SNE)
    map_users: int = 20000
    tsne_users: int = 3000
    # typical journeys: the most over-represented event-type 2-/3-grams per segment, and example
    # sessions drawn from the segment's `neighbourhood` users nearest its centre
    top_ngrams: int = 5
    examples: int = 3
    neighbourhood: int = 50
    # the n-grams are counted over the sessions of a seeded hash sample of about this many users
    # (at 100M events, every session's n-grams took most of the report's ten minutes)
    journey_users: int = 50000

    def __post_init__(self) -> None:
        _check(self.journey_users >= 100, "report.journey_users", "must be >= 100")
        _check(100 <= self.map_users <= 200000, "report.map_users", "must be in [100, 200000]")
        _check(0 <= self.tsne_users <= 20000, "report.tsne_users", "must be in [0, 20000] (0 = no t-SNE)")
        _check(self.top_ngrams >= 1, "report.top_ngrams", "must be >= 1")
        _check(0 <= self.examples <= 20, "report.examples", "must be in [0, 20]")
        _check(self.neighbourhood >= 1, "report.neighbourhood", "must be >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking of each run that evaluates: params, metrics with baselines, the encoder
    artifact and the HTML report."""

    mlflow: bool = False
    # null: a SQLite store under <run.output>/_mlflow locally, the workspace's server on Databricks
    tracking_uri: str | None = None
    experiment: str = "seqclust"
    # a model run registers its segments model under this name (null: not registered); on
    # Databricks a Unity Catalog name catalog.schema.model
    registered_model: str | None = "seqclust_segments"
    registry_uri: str | None = None  # null: the tracking store locally; databricks-uc on Databricks

    def __post_init__(self) -> None:
        _check(bool(self.experiment and self.experiment.strip()), "tracking.experiment", "must not be empty")
        _check(
            self.registered_model is None or re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){0,2}", self.registered_model) is not None,
            "tracking.registered_model",
            "letters, digits, _ and - in up to three dot-separated parts (catalog.schema.model)",
        )


@dataclass(frozen=True)
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    sessionize: SessionizeConfig = field(default_factory=SessionizeConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    def config_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a type annotation; raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        assert isinstance(tp, type)
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        kt, vt = args
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where}: unknown config key (known here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


def build_section(cls: type[T_], data: Mapping[str, Any], prefix: str) -> T_:
    """One config section (``SourceConfig``, ``EmbedConfig`` …) from its dict (as ``to_dict``
    wrote it), checked as a YAML file's section is; errors name ``prefix.key``."""
    return _build(cls, data, prefix)  # type: ignore[no-any-return]


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k not in ("event_types", "conf"):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value read as a YAML scalar) into a key path and a value."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = PipelineConfig
    cur = data
    for i, part in enumerate(path):
        dotted = ".".join(path[: i + 1])
        if dataclasses.is_dataclass(node):
            fields = {f.name: f for f in dataclasses.fields(node)}
            if part not in fields:
                raise ConfigError(f"{dotted}: unknown config key (--set)")
            tp = typing.get_type_hints(node)[part]
        elif typing.get_origin(node) is dict:
            tp = typing.get_args(node)[1]
        else:
            raise ConfigError(f"{dotted}: unknown config key (--set); {'.'.join(path[:i])} is a plain value")
        if i == len(path) - 1:
            cur[part] = value
            return
        # descend into a nested dataclass (unwrap Optional) or a dict
        inner = (
            [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
        )
        node = inner[0]
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt


def default_conf_dir() -> Path | None:
    """``$SEQCLUST_CONF_DIR`` or ``./conf`` when present (absent inside a bare wheel install)."""
    env = os.environ.get("SEQCLUST_CONF_DIR")
    if env:
        return Path(env)
    p = Path("conf")
    return p if p.is_dir() else None


PRESETS_DIR = Path(__file__).resolve().parents[1] / "ingest" / "presets"


def presets() -> list[str]:
    """Names of the source presets shipped with the package."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(
    conf: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    env: str | None = None,
    preset: str | None = None,
) -> PipelineConfig:
    """Load the configuration.

    Args:
        conf: an environment YAML file (e.g. ``conf/local.yaml``); its folder's ``base.yaml``
            is applied first. When None, ``<conf dir>/<env>.yaml`` is used if it exists.
        overrides: ``key=value`` strings applied last.
        preset: a source preset (``presets()``), applied after the files, before overrides.
        env: environment name when ``conf`` is None (default ``$SEQCLUST_ENV`` or ``local``).

    Returns:
        A validated, frozen PipelineConfig.
    """
    data: dict[str, Any] = {}
    files: list[Path] = []
    if conf is not None:
        p = Path(conf)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        base = p.parent / "base.yaml"
        if base.is_file() and base.resolve() != p.resolve():
            files.append(base)
        files.append(p)
    else:
        d = default_conf_dir()
        if d is not None:
            name = env or os.environ.get("SEQCLUST_ENV", "local")
            for f in (d / "base.yaml", d / f"{name}.yaml"):
                if f.is_file():
                    files.append(f)
    if preset is not None:
        if preset not in presets():
            raise ConfigError(f"--preset {preset!r}: unknown preset (known: {', '.join(presets())})")
        files.append(PRESETS_DIR / f"{preset}.yaml")
    for f in files:
        data = _deep_merge(data, _read_yaml(f))
    for item in overrides:
        path, value = parse_override(item)
        _apply_override(data, path, value)
    return _build(PipelineConfig, data)
