"""The baselines every figure is shown beside: random segments and the bag of events.

The bag of events: what a user does, counted, with no sequence model.

Each user becomes the TF-IDF vector of the ``event_type:category`` tokens of their modelled
sessions (Spark ML ``CountVectorizer`` -> ``IDF`` -> L2 ``Normalizer``), optionally reduced
with MLlib ``PCA``. It goes through the same KMeans and the same metrics as the encoder, so a
number for the encoder always has this one beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pyspark import StorageLevel
from pyspark.ml import Pipeline
from pyspark.ml.feature import IDF, PCA, CountVectorizerModel, Normalizer
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from seqclust.core.config import BaselineConfig, ClusterConfig
from seqclust.core.sampling import hash_uniform
from seqclust.segment.cluster import fit_best, user_partitions


def bag_of_events(
    sessions: DataFrame, vocab_size: int = 1000, min_df: int = 2, pca_dim: int | None = None, partitions: int | None = None
) -> DataFrame:
    """One row per user: ``entity_id``, ``features`` (vector) and ``emb`` (array<double>).

    Args:
        sessions: rows with ``user_id`` and ``tokens``.
        vocab_size: most frequent tokens kept (by count over all users).
        min_df: a token must occur for at least this many users.
        pca_dim: reduce to this many dimensions with PCA (then L2-normalise again).
        partitions: user partitions (default: ``spark.sql.shuffle.partitions``).
    """
    # hash-partitioned and sorted by user: PCA's sums and KMeans' seeded sampling then see the
    # same rows in the same order wherever (and on however many executors) this runs
    parts = partitions or int(sessions.sparkSession.conf.get("spark.sql.shuffle.partitions") or 200)
    users = (
        sessions.groupBy("user_id")
        .agg(F.flatten(F.collect_list("tokens")).alias("tokens"))
        .repartition(parts, "user_id")
        .sortWithinPartitions("user_id")
    )
    stages: list[Any] = [
        CountVectorizerModel.from_vocabulary(_vocabulary(users, vocab_size, min_df), inputCol="tokens", outputCol="tf"),
        IDF(inputCol="tf", outputCol="tfidf"),
        Normalizer(inputCol="tfidf", outputCol="features" if not pca_dim else "unreduced", p=2.0),
    ]
    if pca_dim:
        stages += [PCA(k=pca_dim, inputCol="unreduced", outputCol="pca"), Normalizer(inputCol="pca", outputCol="features", p=2.0)]
    out = Pipeline(stages=stages).fit(users).transform(users)
    return out.select(F.col("user_id").alias("entity_id"), "features", vector_to_array(F.col("features")).alias("emb"))


def _vocabulary(users: DataFrame, vocab_size: int, min_df: int) -> list[str]:
    """The ``vocab_size`` most frequent tokens (total count; ties by token, so the vocabulary
    does not depend on partitioning as CountVectorizer's does) used by >= ``min_df`` users."""
    per_user = users.select("user_id", F.explode("tokens").alias("token")).groupBy("user_id", "token").count()
    ranked = (
        per_user.groupBy("token")
        .agg(F.sum("count").alias("n"), F.count("*").alias("df"))
        .where(F.col("df") >= min_df)
        .orderBy(F.desc("n"), "token")
        .limit(vocab_size)
    )
    vocab = [r["token"] for r in ranked.collect()]  # at most vocab_size tokens
    if not vocab:
        raise ValueError(f"bag of events: no token is used by {min_df} or more users")
    return vocab


def random_assignment(df: DataFrame, shares: Sequence[float], seed: int, out_col: str = "random_id", key: str = "entity_id") -> DataFrame:
    """Assign each row a random cluster with the given share distribution (the random baseline).
    The draw is a seeded hash of the ``key`` column: the same users land in the same clusters on any
    partitioning."""
    u = F.col("_u")  # hashed once per row, not once per CASE WHEN branch
    cum = np.cumsum(np.asarray(shares, dtype=np.float64) / np.sum(shares))
    expr = F.lit(len(cum) - 1)
    for i in range(len(cum) - 2, -1, -1):
        expr = F.when(u < float(cum[i]), F.lit(i)).otherwise(expr)
    return df.withColumn("_u", hash_uniform(key, seed=seed)).withColumn(out_col, expr.cast("int")).drop("_u")


def boe_clusters(
    sessions: DataFrame,
    k: int,
    n_users: int,
    seed: int,
    baseline: BaselineConfig,
    cluster_cfg: ClusterConfig,
    vectors: bool = True,
    id_col: str = "entity_id",
) -> DataFrame:
    """The bag-of-events baseline clustered at ``k`` with the encoder's KMeans procedure:
    ``id_col``, ``cluster_id`` and, with ``vectors``, ``features`` and ``emb``. The user vectors
    are computed once (cached while the ``n_init`` starts read them); the result is persisted
    and materialised, so the caller reads it as often as it likes and unpersists it."""
    parts = user_partitions(n_users, cluster_cfg)
    vecs = bag_of_events(sessions, baseline.vocab_size, baseline.min_df, baseline.pca_dim, parts).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        model = fit_best(vecs, k, seed, cluster_cfg)
        cols: list[Column | str] = [F.col("entity_id").alias(id_col), "cluster_id", *(["features", "emb"] if vectors else [])]
        out = model.transform(vecs).select(*cols).persist(StorageLevel.MEMORY_AND_DISK)
        out.count()
    finally:
        vecs.unpersist()
    return out
