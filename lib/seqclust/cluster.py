"""Cluster user vectors with MLlib KMeans; k from a sweep when not fixed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.config import ClusterConfig
from seqclust.context import RunContext
from seqclust.errors import ConfigError, InputError

log = logging.getLogger(__name__)


def fit_kmeans(features: DataFrame, k: int, seed: int, cfg: ClusterConfig) -> KMeansModel:
    """Seeded k-means|| on a ``features`` vector column (Euclidean; vectors are L2-normalised,
    so this orders neighbours as cosine distance does)."""
    km = KMeans(
        k=k,
        seed=seed,
        initMode="k-means||",
        initSteps=cfg.init_steps,
        maxIter=cfg.max_iter,
        solver=cfg.solver,
        featuresCol="features",
        predictionCol="cluster_id",
    )
    return km.fit(features)


def silhouette(pred: DataFrame, distance: str = "squaredEuclidean", pred_col: str = "cluster_id") -> float:
    """Spark's silhouette (exact, O(n·k) thanks to per-cluster aggregates)."""
    return float(
        ClusteringEvaluator(featuresCol="features", predictionCol=pred_col, distanceMeasure=distance, metricName="silhouette").evaluate(
            pred
        )
    )


def with_distance(pred: DataFrame, centers: list[list[float]]) -> DataFrame:
    """Add the Euclidean ``distance_to_centroid`` of each row's ``emb`` array to its centre."""
    lit_centers = F.array(*[F.array(*[F.lit(float(v)) for v in c]) for c in centers])
    center = F.element_at(lit_centers, F.col("cluster_id") + 1)
    sq = F.aggregate(F.zip_with("emb", center, lambda a, b: (a - b) * (a - b)), F.lit(0.0).cast("double"), lambda acc, x: acc + x)
    return pred.withColumn("distance_to_centroid", F.sqrt(sq))


@dataclass(frozen=True)
class ClusterResult:
    k: int
    users: int
    sweep: list[dict[str, float]]


def run(spark: SparkSession, ctx: RunContext, cfg: ClusterConfig, seed: int) -> ClusterResult:
    """Cluster this run's user vectors; write ``clusters``, ``centroids`` and the k sweep."""
    users = (
        ctx.store.read(spark, ctx.tables.embeddings, ctx.run_id)
        .where(F.col("entity_type") == "user")
        .select("entity_id", F.col("embedding").alias("emb"))
        .withColumn("features", array_to_vector("emb"))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        n = users.count()
        if n == 0:
            raise InputError("no user vectors to cluster (did the embed stage run?)")
        ks = [cfg.k] if cfg.k is not None else list(range(cfg.k_min, min(cfg.k_max, n - 1) + 1))
        if cfg.k is not None and cfg.k >= n:
            raise ConfigError(f"cluster.k: {cfg.k} is not below the number of users ({n})")
        if not ks:
            raise InputError(f"only {n} users: too few to cluster (need at least {cfg.k_min + 1})")
        sweep = []
        best = None
        for k in ks:
            model = fit_kmeans(users, k, seed, cfg)
            pred = model.transform(users)
            sil = silhouette(pred)
            row = {"k": k, "silhouette": sil, "inertia": float(model.summary.trainingCost)}
            sweep.append(row)
            log.info("cluster: k=%d silhouette %.4f inertia %.2f", k, sil, row["inertia"])
            if best is None or sil > best[0] + 1e-9:
                best = (sil, k, model)
        assert best is not None
        _, k, model = best
        centers = [c.tolist() for c in model.clusterCenters()]
        pred = with_distance(model.transform(users), centers)
        clusters = pred.select(
            F.lit("user").alias("entity_type"),
            "entity_id",
            F.col("cluster_id").cast("int").alias("cluster_id"),
            "distance_to_centroid",
        )
        ctx.store.write_run(clusters, ctx.tables.clusters, ctx.run_id)
        sizes = {
            r["cluster_id"]: r["count"]
            for r in ctx.store.read(spark, ctx.tables.clusters, ctx.run_id).groupBy("cluster_id").count().collect()
        }
        cent_rows = [(i, "encoder", [float(v) for v in c], int(sizes.get(i, 0))) for i, c in enumerate(centers)]
        cent_schema = T.StructType(
            [
                T.StructField("cluster_id", T.IntegerType()),
                T.StructField("method", T.StringType()),
                T.StructField("centroid", T.ArrayType(T.DoubleType())),
                T.StructField("size", T.LongType()),
            ]
        )
        ctx.store.write_run(spark.createDataFrame(cent_rows, cent_schema), ctx.tables.centroids, ctx.run_id)
        model.write().overwrite().save(str(ctx.run_dir / "kmeans"))
        sweep_rows = [
            {
                "method": "encoder",
                "k": r["k"],
                "metric": m,
                "value": r[m],
                "family": "sweep",
                "details": "k sweep; chosen by silhouette" if r["k"] == k else "k sweep",
            }
            for r in sweep
            for m in ("silhouette", "inertia")
        ]
        from seqclust.evaluate import write_metrics

        write_metrics(spark, ctx, sweep_rows, families=("sweep",))
        log.info("cluster: k=%d chosen for %d users", k, n)
        return ClusterResult(k, n, sweep)
    finally:
        users.unpersist()
