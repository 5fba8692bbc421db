"""The bag-of-events baseline: what a user does, counted, with no sequence model.

Each user becomes the TF-IDF vector of the ``event_type:category`` tokens of their modelled
sessions (Spark ML ``CountVectorizer`` -> ``IDF`` -> L2 ``Normalizer``), optionally reduced
with MLlib ``PCA``. It goes through the same KMeans and the same metrics as the encoder, so a
number for the encoder always has this one beside it.
"""

from __future__ import annotations

from pyspark.ml import Pipeline
from pyspark.ml.feature import IDF, PCA, CountVectorizer, Normalizer
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def bag_of_events(sessions: DataFrame, vocab_size: int = 1000, min_df: int = 2, pca_dim: int | None = None) -> DataFrame:
    """One row per user: ``entity_id``, ``features`` (vector) and ``emb`` (array<double>).

    Args:
        sessions: rows with ``user_id`` and ``tokens``.
        vocab_size: most frequent tokens kept (by count over all users).
        min_df: a token must occur for at least this many users.
        pca_dim: reduce to this many dimensions with PCA (then L2-normalise again).
    """
    users = sessions.groupBy("user_id").agg(F.flatten(F.collect_list("tokens")).alias("tokens"))
    stages = [
        CountVectorizer(inputCol="tokens", outputCol="tf", vocabSize=vocab_size, minDF=float(min_df)),
        IDF(inputCol="tf", outputCol="tfidf"),
        Normalizer(inputCol="tfidf", outputCol="features" if not pca_dim else "unreduced", p=2.0),
    ]
    if pca_dim:
        stages += [PCA(k=pca_dim, inputCol="unreduced", outputCol="pca"), Normalizer(inputCol="pca", outputCol="features", p=2.0)]
    out = Pipeline(stages=stages).fit(users).transform(users)
    return out.select(F.col("user_id").alias("entity_id"), "features", vector_to_array("features").alias("emb"))
