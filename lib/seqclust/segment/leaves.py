"""The segment tree in Spark: grown in driver memory on a hash sample of the fitted users (their
vectors and the vectors of the two halves of their histories), then every user placed down it
on the executors (``place``: per Arrow batch, the tree's centres shipped as arrays)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from seqclust.core.compat import to_arrow
from seqclust.core.config import ClusterConfig
from seqclust.core.sampling import user_sample
from seqclust.runtime.context import RunContext
from seqclust.segment.hierarchy import SplitRule, Tree, grow

log = logging.getLogger(__name__)

HistoryFn = Callable[[DataFrame, DataFrame], DataFrame]  # (sessions, stored session vectors) -> (entity_id, embedding)


def _numpy(t, id_col: str, vec_col: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(t.column(id_col).to_pylist(), dtype=object)
    if len(ids) == 0:
        return ids, np.zeros((0, 0))
    X = pc.list_flatten(t.column(vec_col)).to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(ids), -1)
    return ids, X


def tree_sample(users: DataFrame, top: DataFrame, n: int, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, vectors, top cluster ids)`` of a seeded hash sample of about ``cfg.split_sample``
    of the users the top level was fitted on (``fit_min_sessions`` or more sessions; every user
    when too few have them), sorted by id."""
    rich = users
    if cfg.fit_min_sessions > 1 and "n_sessions" in users.columns:
        r = users.where(F.col("n_sessions").isNull() | (F.col("n_sessions") >= cfg.fit_min_sessions))
        if r.limit(cfg.split_min_users).count() >= cfg.split_min_users:
            rich = r
    pick = user_sample(n, cfg.split_sample, seed)(
        rich.select("entity_id", "emb").join(top.select("entity_id", "cluster_id"), "entity_id"), "entity_id"
    )
    t = to_arrow(pick)
    ids, X = _numpy(t, "entity_id", "emb")
    labels = np.asarray(t.column("cluster_id").to_pylist(), dtype=np.int64)
    order = np.argsort(ids.astype(str), kind="stable")
    return ids[order], X[order], labels[order]


def half_vectors(spark: SparkSession, ctx: RunContext, ids: np.ndarray, dim: int, history: HistoryFn) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of the users ``ids`` from the first and from the second half of their modelled
    sessions (made as the run made its user vectors, by ``history``), aligned with ``ids``;
    rows of NaN for users with fewer than two sessions."""
    keep = spark.createDataFrame(pd.DataFrame({"user_id": [str(i) for i in ids]}))
    sessions = ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).where("is_modelled").join(F.broadcast(keep), "user_id")
    stored = (
        ctx.store.read(spark, ctx.tables.embeddings, ctx.run_id)
        .where(F.col("entity_type") == "session")
        .select(F.col("entity_id").alias("session_id"), "embedding")
    )
    w = Window.partitionBy("user_id").orderBy("start_ts", "session_id")
    ranked = sessions.withColumn("_r", F.row_number().over(w)).withColumn("_n", F.count("*").over(Window.partitionBy("user_id")))
    ranked = ranked.where(F.col("_n") >= 2)
    index = {str(u): i for i, u in enumerate(ids)}
    out = []
    for half in (F.col("_r") <= F.floor(F.col("_n") / 2), F.col("_r") > F.floor(F.col("_n") / 2)):
        part = ranked.where(half).drop("_r", "_n")
        hid, H = _numpy(to_arrow(history(part, stored).select("entity_id", "embedding")), "entity_id", "embedding")
        M = np.full((len(ids), dim), np.nan)
        if len(hid):
            M[[index[str(u)] for u in hid]] = H
        out.append(M)
    return out[0], out[1]


def grow_tree(
    spark: SparkSession,
    ctx: RunContext,
    users: DataFrame,
    top: DataFrame,
    centers: np.ndarray,
    n: int,
    cfg: ClusterConfig,
    seed: int,
    history: HistoryFn | None,
) -> Tree:
    """The segment tree over the top level (``top``: entity_id, cluster_id; ``centers``: its
    centres), or the flat tree when ``cluster.split_max_depth`` is 1."""
    centers = np.asarray(centers, dtype=np.float64)
    if cfg.split_max_depth <= 1:
        return Tree.flat(centers)
    ids, X, labels = tree_sample(users, top, n, cfg, seed)
    halves = None
    if history is not None and len(ids):

        def halves() -> tuple[np.ndarray, np.ndarray]:
            log.info("cluster: vectors of the two halves of %d users' histories, for the persistence test", len(ids))
            return half_vectors(spark, ctx, ids, X.shape[1], history)

    else:
        log.info("cluster: segment tree without the persistence test (no vectors for halves of users' histories)")
    log.info("cluster: testing %d segments for sub-segments on %d users", len(centers), len(ids))
    tree = grow(X, labels, centers, SplitRule.from_config(cfg), seed, halves)
    leaves = len(tree.leaf_nodes)
    log.info("cluster: segment tree of %d leaves under %d top segments (%s)", leaves, len(centers), ", ".join(tree.paths))
    return tree


PLACED = "struct<node:int,distance:double,top_confidence:double,leaf_confidence:double>"


def place(users: DataFrame, tree: Tree, vec_col: str = "emb", top_col: str = "cluster_id") -> DataFrame:
    """``users`` with ``leaf_id``, ``segment_path``, ``leaf_distance`` (Euclidean, to the leaf's
    centre), ``top_confidence`` and ``leaf_confidence``: each user goes down the tree from their
    top segment ``top_col``, to the nearest child centre at every level (``Tree.place``, per
    Arrow batch), with the margin of each placement."""
    paths, parent, centers = list(tree.paths), tree.parent.copy(), tree.centers.copy()

    @F.pandas_udf(PLACED)  # type: ignore[call-overload]
    def descend(vecs: pd.Series, top: pd.Series) -> pd.DataFrame:
        t = Tree(tuple(paths), parent, centers)
        X = np.stack(vecs.to_numpy()).astype(np.float64) if len(vecs) else np.zeros((0, centers.shape[1]))
        node, d2, top_conf, leaf_conf = t.place(X, top.to_numpy())
        return pd.DataFrame(
            {"node": node.astype(np.int32), "distance": np.sqrt(d2), "top_confidence": top_conf, "leaf_confidence": leaf_conf}
        )

    leaf_of = F.array(*[F.lit(int(v)) for v in tree.leaf_id])
    path_of = F.array(*[F.lit(p) for p in paths])
    placed = users.withColumn("_p", descend(vec_col, top_col))
    return placed.select(
        "*",
        F.element_at(leaf_of, F.col("_p.node") + 1).alias("leaf_id"),
        F.element_at(path_of, F.col("_p.node") + 1).alias("segment_path"),
        F.col("_p.distance").alias("leaf_distance"),
        F.col("_p.top_confidence").alias("top_confidence"),
        F.col("_p.leaf_confidence").alias("leaf_confidence"),
    ).drop("_p")


def tree_rows(tree: Tree, sizes: dict[str, int]) -> list[tuple[int, str, list[float], int, str]]:
    """``centroids`` rows of method ``tree``: every node (its index in path order, its centre,
    its users), with its ``segment_path``."""
    return [(i, "tree", [float(v) for v in tree.centers[i]], int(sizes.get(p, 0)), p) for i, p in enumerate(tree.paths)]


def node_sizes(tree: Tree, leaf_counts: dict[int, int]) -> dict[str, int]:
    """Users per node from users per leaf (a node holds its leaves' users)."""
    out = {p: 0 for p in tree.paths}
    for node, leaf in enumerate(tree.leaf_id):
        if leaf >= 0:
            n = int(leaf_counts.get(int(leaf), 0))
            i = node
            while i >= 0:
                out[tree.paths[i]] += n
                i = int(tree.parent[i])
    return out
