"""Embed sessions on the executors and pool them into user vectors.

The artifact's config, vocabulary and weights (plain JSON and npz bytes, nothing pickled)
are broadcast once. An Arrow-batch iterator UDF (``mapInArrow``, the Arrow-native form of an
iterator pandas UDF) builds the Keras model once per Python worker, caches it for every
later task of that worker, and featurises each Arrow batch straight from its list buffers,
so no per-row Python objects are made on the way in or out.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.compat import to_arrow
from seqclust.core.config import EmbedConfig
from seqclust.core.errors import ArtifactError
from seqclust.represent import behaviour
from seqclust.represent.features import DEFAULT_TOKEN_FIELDS, Vocab, compose_tokens, event_parts, featurize, input_columns
from seqclust.runtime.context import RunContext
from seqclust.runtime.store import one_row

log = logging.getLogger(__name__)

# Per Python worker: encoder_id -> (vocab, predict). Survives across tasks (worker reuse);
# bounded, least recently used out first: a long-lived worker that embeds with many encoders
# (assign runs against several model runs) keeps at most this many models in memory.
MAX_WORKER_MODELS = 2
_MODELS: OrderedDict[str, tuple[Vocab, Callable[[dict[str, np.ndarray]], np.ndarray]]] = OrderedDict()


def _remember(encoder_id: str, model: Any, cache: OrderedDict = _MODELS, limit: int = MAX_WORKER_MODELS) -> Any:
    """Put ``model`` in the worker's cache as the most recently used, dropping the least
    recently used beyond ``limit``."""
    cache[encoder_id] = model
    cache.move_to_end(encoder_id)
    while len(cache) > limit:
        cache.popitem(last=False)
    return model


def _worker_model(encoder_id: str, payload: Any) -> tuple[Vocab, Callable[[dict[str, np.ndarray]], np.ndarray]]:
    cached = _MODELS.get(encoder_id)
    if cached is not None:
        _MODELS.move_to_end(encoder_id)
    else:
        from pyspark import TaskContext

        from seqclust.represent.encoder import embedding_fn, weights_from_npz

        cfg_json, vocab_json, npz = payload.value
        ctx = TaskContext.get()
        threads = max(1, int(ctx.cpus())) if ctx is not None else 1
        gpus = ctx.resources().get("gpu") if ctx is not None else None
        if gpus is not None and gpus.addresses:
            # before TensorFlow starts in this worker: see only the GPU Spark assigned
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.addresses)
        else:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        cached = _remember(
            encoder_id, (Vocab.from_json(vocab_json), embedding_fn(json.loads(cfg_json), weights_from_npz(npz), threads=threads))
        )
    return cached


def embed_sessions(
    spark: SparkSession,
    sessions: DataFrame,
    artifact: Any,
    keep: tuple[str, ...] = ("session_id", "user_id", "end_ts"),
) -> DataFrame:
    """Add ``embedding`` (array<float>, L2-normalised) to each session; keep only ``keep`` columns.

    Args:
        artifact: an ``encoder.Artifact`` (its payload is broadcast).
    """
    payload = spark.sparkContext.broadcast(artifact.payload())
    encoder_id = artifact.encoder_id
    dim = int(artifact.model_cfg["embedding_dim"])
    in_df = sessions.select(*keep, *input_columns(sessions.columns, artifact.vocab.token_fields))
    out_schema = T.StructType([in_df.schema[c] for c in keep] + [T.StructField("embedding", T.ArrayType(T.FloatType(), False))])

    def embed_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        vocab, predict = _worker_model(encoder_id, payload)
        for batch in batches:
            z = predict(featurize(batch, vocab)) if batch.num_rows else np.zeros((0, dim), np.float32)
            offsets = pa.array(np.arange(0, z.shape[0] * dim + 1, dim, dtype=np.int32))
            emb = pa.ListArray.from_arrays(offsets, pa.array(z.reshape(-1), pa.float32()))
            yield pa.RecordBatch.from_arrays([batch.column(c) for c in keep] + [emb], names=[*keep, "embedding"])

    return in_df.mapInArrow(embed_batches, out_schema)


def l2_normalize(col: Column) -> Column:
    norm = F.sqrt(F.aggregate(col, F.lit(0.0).cast("double"), lambda acc, x: acc + x * x))
    return F.transform(col, lambda x: (x / F.greatest(norm, F.lit(1e-12))).cast("float"))


def pool_users(session_emb: DataFrame, pooling: str = "mean", half_life_days: float = 14.0, dim: int | None = None) -> DataFrame:
    """Pool session vectors into one L2-normalised vector per user (in Spark).

    ``recency`` weighs a session by 2^(-age / half-life), age measured from the latest
    session end in the data. The sums are ``dim`` plain SQL aggregates (a hash aggregate with
    generated code; ``Summarizer`` over vectors falls back to a sort-based object aggregate
    past a few hundred users, several times slower); the scale of the weighted sum does not
    matter after the L2 normalisation, so it is not divided by the total weight.
    """
    if dim is None:
        first = session_emb.select(F.size("embedding").alias("d")).first()
        dim = int(first["d"]) if first is not None else 0
    df = session_emb
    if pooling == "recency":
        ref = one_row(df.agg(F.max("end_ts")))[0]
        age_days = (F.unix_micros(F.lit(ref)) - F.unix_micros("end_ts")) / (86400 * 1e6)
        weight = F.exp(-math.log(2) * age_days / half_life_days)
    else:
        weight = F.lit(1.0)
    df = df.withColumn("_w", weight)
    sums = [F.sum(F.col("embedding")[i].cast("double") * F.col("_w")).alias(f"_s{i}") for i in range(dim)]
    pooled = df.groupBy("user_id").agg(*sums, F.count("*").alias("n_sessions"))
    return pooled.select(
        F.col("user_id").alias("entity_id"),
        l2_normalize(F.array(*[F.col(f"_s{i}") for i in range(dim)])).alias("embedding"),
        "n_sessions",
    )


def require_token_model(artifact: Any, cfg: EmbedConfig) -> Any:
    """The artifact's behaviour-token model; a clear error when the representation needs one
    and the artifact (an older or reused one) has none."""
    if artifact.token_model is None and cfg.representation != "encoder":
        raise ArtifactError(
            f"encoder {artifact.encoder_id} carries no behaviour-token model, which embed.representation="
            f"{cfg.representation} needs: train a new encoder, or set embed.representation=encoder"
        )
    return artifact.token_model


def history_vectors(artifact: Any, cfg: EmbedConfig) -> Callable[[DataFrame, DataFrame], DataFrame]:
    """(sessions, their stored vectors ``session_id, embedding``) -> ``(entity_id, embedding)``:
    user vectors from only those sessions, made as the run made its user vectors."""

    def fn(sessions: DataFrame, stored: DataFrame) -> DataFrame:
        emb = sessions.select("session_id", "user_id", "end_ts").join(stored, "session_id")
        return user_vectors(sessions, emb, artifact, cfg).select("entity_id", "embedding")

    return fn


def user_vectors(
    sessions: DataFrame | None,
    session_emb: DataFrame | None,
    artifact: Any,
    cfg: EmbedConfig,
    counts: DataFrame | None = None,
    pooled: DataFrame | None = None,
) -> DataFrame:
    """``(entity_id, embedding, n_sessions)`` per user of ``sessions``, as ``cfg.representation``
    says: the encoder's session vectors pooled (``session_emb``: user_id, end_ts, embedding),
    the behaviour tokens of ``sessions`` (the artifact's token model), or both concatenated
    with weights sqrt(hybrid_weight) and sqrt(1 - hybrid_weight) (unit norm, so squared
    Euclidean distances are that mix of the two blocks' distances). Used for the run's users
    and, in the next-session evaluation, for their history alone. ``counts``: the behaviour-token
    counts of exactly ``sessions`` when already counted (``behaviour.token_counts``); ``pooled``:
    the pooled session vectors (``entity_id, embedding, n_sessions``) when already pooled (a
    stream's running sums): then neither ``sessions`` nor ``session_emb`` is read."""
    dim = int(artifact.model_cfg["embedding_dim"])
    if pooled is None:
        assert session_emb is not None
        enc = pool_users(session_emb, cfg.pooling, cfg.recency_half_life_days, dim=dim)
    else:
        enc = pooled
    if cfg.representation == "encoder":
        return enc
    tm = require_token_model(artifact, cfg)
    if counts is None:
        assert sessions is not None
        counts = behaviour.token_counts(sessions, artifact.vocab, tm.interest)
    tok = behaviour.user_vectors(counts, tm)
    zeros = F.array_repeat(F.lit(0.0).cast("float"), tm.dim)
    joined = enc.join(tok.withColumnRenamed("user_id", "entity_id"), "entity_id", "left").withColumn(
        "tokens_vec", F.coalesce("tokens_vec", zeros)
    )
    if cfg.representation == "tokens":
        return joined.select("entity_id", F.col("tokens_vec").alias("embedding"), "n_sessions")
    a, b = math.sqrt(cfg.hybrid_weight), math.sqrt(1.0 - cfg.hybrid_weight)
    vec = F.concat(F.transform("embedding", lambda x: (x * a).cast("float")), F.transform("tokens_vec", lambda x: (x * b).cast("float")))
    return joined.select("entity_id", vec.alias("embedding"), "n_sessions")


@dataclass(frozen=True)
class EmbedResult:
    sessions: int
    users: int
    encoder_id: str


def oov_rate(sessions: DataFrame, vocab: Vocab, sample: int = 20000, seed: int = 0) -> float:
    """Share of event tokens (in a bounded sample of sessions) the vocabulary does not know."""
    rows = to_arrow(
        sessions.select(*input_columns(sessions.columns, vocab.token_fields)).orderBy(F.xxhash64("session_id", F.lit(seed))).limit(sample)
    )
    if tuple(vocab.token_fields) == DEFAULT_TOKEN_FIELDS:
        flat = pc.list_flatten(rows.column("tokens"))
    else:
        flat = compose_tokens(event_parts(rows, vocab), tuple(vocab.token_fields))
    if len(flat) == 0:
        return 0.0
    known = pc.sum(pc.is_in(flat, value_set=pa.array(vocab.tokens, pa.string()))).as_py() or 0
    return 1.0 - known / len(flat)


def run(
    spark: SparkSession, ctx: RunContext, cfg: EmbedConfig, artifact: Any, reused: bool = False, counts: DataFrame | None = None
) -> EmbedResult:
    """Embed this run's modelled sessions, pool to users, write ``embeddings``.

    A reused encoder (``--encoder``) is first checked against the data: if more than
    ``max_oov_rate`` of the tokens are unknown to its vocabulary, it is refused. ``counts``:
    the users' behaviour-token counts of this run's modelled sessions under ``artifact``, when
    this process has them already (the train stage's).
    """
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.arrow_batch_size))
    require_token_model(artifact, cfg)
    sessions = ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).where("is_modelled")
    if reused:
        rate = oov_rate(sessions, artifact.vocab)
        log.info("embed: reused encoder %s misses %.1f%% of this data's tokens", artifact.encoder_id, 100 * rate)
        if rate > cfg.max_oov_rate:
            raise ArtifactError(
                f"encoder {artifact.encoder_id} does not fit this data: {100 * rate:.0f}% of its tokens are outside the encoder's "
                f"vocabulary (embed.max_oov_rate={cfg.max_oov_rate}); train a new encoder for this source"
            )
    emb = embed_sessions(spark, sessions, artifact)
    session_rows = emb.select(
        F.lit("session").alias("entity_type"),
        F.col("session_id").alias("entity_id"),
        "embedding",
        F.lit(artifact.encoder_id).alias("encoder_id"),
        F.col("user_id").alias("user_id"),
        F.col("end_ts").alias("end_ts"),
        F.lit(None).cast("long").alias("n_sessions"),
    )
    # first write replaces every row of this run (users included), so no stale rows remain
    n_s = ctx.write(session_rows, "embeddings")
    log.info("embed: %d session vectors (encoder %s)", n_s, artifact.encoder_id)
    stored = (
        ctx.store.read(spark, ctx.tables.embeddings, ctx.run_id)
        .where(F.col("entity_type") == "session")
        .select("user_id", "end_ts", "embedding")
    )
    users = user_vectors(sessions, stored, artifact, cfg, counts).select(
        F.lit("user").alias("entity_type"),
        "entity_id",
        "embedding",
        F.lit(artifact.encoder_id).alias("encoder_id"),
        F.lit(None).cast("string").alias("user_id"),
        F.lit(None).cast("timestamp").alias("end_ts"),
        "n_sessions",
    )
    n_u = ctx.write(users, "embeddings", extra_predicate="entity_type = 'user'")
    log.info(
        "embed: %d user vectors (%s%s)",
        n_u,
        cfg.representation,
        f", encoder {cfg.pooling} pooling" if cfg.representation != "tokens" else "",
    )
    return EmbedResult(n_s, n_u, artifact.encoder_id)
