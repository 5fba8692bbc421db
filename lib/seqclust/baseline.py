"""The bag-of-events baseline: what a user does, counted, with no sequence model.

Each user becomes the TF-IDF vector of the ``event_type:category`` tokens of their modelled
sessions (Spark ML ``CountVectorizer`` -> ``IDF`` -> L2 ``Normalizer``), optionally reduced
with MLlib ``PCA``. It goes through the same KMeans and the same metrics as the encoder, so a
number for the encoder always has this one beside it.
"""

from __future__ import annotations

from pyspark.ml import Pipeline
from pyspark.ml.feature import IDF, PCA, CountVectorizerModel, Normalizer
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F


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
    parts = partitions or int(sessions.sparkSession.conf.get("spark.sql.shuffle.partitions"))
    users = (
        sessions.groupBy("user_id")
        .agg(F.flatten(F.collect_list("tokens")).alias("tokens"))
        .repartition(parts, "user_id")
        .sortWithinPartitions("user_id")
    )
    stages = [
        CountVectorizerModel.from_vocabulary(_vocabulary(users, vocab_size, min_df), inputCol="tokens", outputCol="tf"),
        IDF(inputCol="tf", outputCol="tfidf"),
        Normalizer(inputCol="tfidf", outputCol="features" if not pca_dim else "unreduced", p=2.0),
    ]
    if pca_dim:
        stages += [PCA(k=pca_dim, inputCol="unreduced", outputCol="pca"), Normalizer(inputCol="pca", outputCol="features", p=2.0)]
    out = Pipeline(stages=stages).fit(users).transform(users)
    return out.select(F.col("user_id").alias("entity_id"), "features", vector_to_array("features").alias("emb"))


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
