"""Where a user goes in a model run's segments, from their pooled session vectors and their
behaviour-token counts: one function for every way seqclust places users without refitting —
``seqclust stream`` (from each user's running sums), the MLflow model a service calls
(``seqclust.serve.request``, from the events of one request) — held to ``seqclust assign
--model`` (the batch path in Spark) by tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession

from seqclust.core.config import EmbedConfig, PipelineConfig
from seqclust.core.errors import ConfigError
from seqclust.represent import embed
from seqclust.runtime.context import RunContext
from seqclust.segment import cluster, refine
from seqclust.segment.hierarchy import Tree


@dataclass(frozen=True)
class Model:
    """What users are placed with: the model run's encoder artifact and segments."""

    run_id: str
    artifact: Any
    centers: list[list[float]]
    token_segments: refine.TokenSegments | None
    tree: Tree | None = None  # every node of the model run's segment tree (None: its top level, flat)


def load_model(spark: SparkSession, ctx: RunContext, cfg: PipelineConfig) -> Model:
    """The model run's artifact (``cfg.encoder.path``, set from the run) and segments; a clear
    error when the run has none, or its representation needs what the artifact lacks."""
    from seqclust.represent.encoder import load_artifact

    rid = cfg.cluster.model_run
    if not rid or not cfg.encoder.path:
        raise ConfigError("--model RUN_ID is required")
    if cfg.embed.pooling != "mean":
        raise ConfigError(
            "embed.pooling must be mean to place users without Spark (recency pooling weighs sessions by the latest one's age)"
        )
    art = load_artifact(cfg.encoder.path)
    embed.require_token_model(art, cfg.embed)
    centers, rows, tree = run_segments(spark, ctx, rid, cfg.cluster.refine != "none" and art.token_model is not None)
    segs = refine.TokenSegments.from_rows(rows) if rows else None
    return Model(rid, art, centers, segs, tree or Tree.flat(np.asarray(centers, dtype=np.float64)))


def run_segments(
    spark: SparkSession, ctx: RunContext, run_id: str, refined: bool
) -> tuple[list[list[float]], list[list[float]], Tree | None]:
    """A model run's segments as its tables hold them: the top-level centres, the token
    segments' rows (``refine.TokenSegments.from_rows``; none unless ``refined``) and the
    segment tree (None for a run written before trees existed)."""
    centers = cluster.model_run_centers(spark, ctx, run_id)
    rows = cluster.model_run_centers(spark, ctx, run_id, "tokens") if refined else []
    return centers, rows, cluster.model_run_tree(spark, ctx, run_id)


PLACED = ("cluster_id", "distance_to_centroid", "confidence", "leaf_id", "segment_path", "leaf_confidence")


def placer(
    cfg: EmbedConfig, tmodel: Any, segs: Any, centers: np.ndarray, tree: Tree
) -> Callable[[np.ndarray, pa.Array, pa.Array], dict[str, pa.Array]]:
    """``place(vector_sums [n, dim], tokens list<string>, n list<long>)`` -> the columns of
    ``PLACED``, one row per user: the user vector as ``embed.user_vectors`` makes it (the
    L2-normalised sum of the session vectors, the token model's projection of the counts, or
    both weighted), the nearest centre, the token segments' most likely one for a user with known
    tokens (``refine.assign``) and the distance to the chosen centre; then down the segment
    ``tree`` from there (``Tree.place``, as the batch's leaf rows): the leaf, its path and the
    confidence at the top level and at the leaf."""
    from seqclust.represent.behaviour import project, vocab_coo
    from seqclust.segment.cluster import nearest_np
    from seqclust.segment.refine import score

    rep = cfg.representation
    wa, wb = math.sqrt(cfg.hybrid_weight), math.sqrt(1.0 - cfg.hybrid_weight)
    leaf_of, paths = tree.leaf_id, tree.paths
    value_set = pa.array(tmodel.tokens, pa.string()) if tmodel is not None else None

    def place(vs: np.ndarray, tokens: pa.Array, counts: pa.Array) -> dict[str, pa.Array]:
        n, dim = vs.shape
        sq = np.zeros(n)
        for j in range(dim):  # summed in the order of embed.l2_normalize's SQL aggregate
            sq = sq + vs[:, j] * vs[:, j]
        enc = (vs / np.maximum(np.sqrt(sq), 1e-12)[:, None]).astype(np.float32)
        toks = pa.RecordBatch.from_arrays([tokens, counts], names=["tokens", "n"])
        coo = vocab_coo(toks, value_set) if value_set is not None else None
        X = enc
        if rep != "encoder":
            assert coo is not None
            Z = project(coo[0], coo[1], coo[2], n, tmodel)
            a, b = (enc.astype(np.float64) * wa).astype(np.float32), (Z.astype(np.float64) * wb).astype(np.float32)
            X = Z if rep == "tokens" else np.concatenate([a, b], axis=1)
        X64 = X.astype(np.float64)
        ids, dist = nearest_np(X64, centers)
        if segs is not None and coo is not None:
            best, has = score(coo[1], coo[2], coo[0], n, segs)
            ids = np.where(has, best, ids).astype(np.int32)
            dist = nearest_np(X64, centers, ids)[1]
        node, _, top_conf, leaf_conf = tree.place(X64, ids)
        return {
            "cluster_id": pa.array(ids, pa.int32()),
            "distance_to_centroid": pa.array(dist),
            "confidence": pa.array(top_conf, pa.float64()),
            "leaf_id": pa.array(leaf_of[node], pa.int32()),
            "segment_path": pa.array([paths[i] for i in node], pa.string()),
            "leaf_confidence": pa.array(leaf_conf, pa.float64()),
        }

    return place
