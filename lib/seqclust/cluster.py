"""Cluster user vectors with MLlib KMeans; k from a sweep when not fixed."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.config import ClusterConfig, validate_run_id
from seqclust.context import RunContext
from seqclust.errors import ConfigError, InputError
from seqclust.metrics import bootstrap_ci, contingency, external_scores, hash_uniform
from seqclust.profiles import cluster_profiles

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


def user_partitions(n: int, cfg: ClusterConfig) -> int:
    """Partitions for ``n`` user vectors: one per ``cfg.rows_per_partition`` users. A k-means
    iteration is a Spark job whose cost at user-table sizes is mostly per task, so fewer,
    fuller partitions fit faster; the count depends on the data only (not on the cluster's
    cores), so a seeded fit gives the same segments on any cluster layout."""
    return max(1, math.ceil(n / cfg.rows_per_partition))


def fit_best(features: DataFrame, k: int, seed: int, cfg: ClusterConfig) -> KMeansModel:
    """The lowest-inertia of ``cfg.n_init`` seeded k-means|| fits (seeds ``seed``,
    ``seed + 1``, …): one k-means|| start can settle in a poor local optimum, and a k judged
    on a poor fit loses the sweep for a reason that has nothing to do with the data."""
    best = None
    for i in range(cfg.n_init):
        model = fit_kmeans(features, k, seed + i, cfg)
        cost = float(model.summary.trainingCost)
        if best is None or cost < best[0]:
            best = (cost, model)
    return best[1]


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


def stability(users: DataFrame, reference: DataFrame, k: int, seed: int, cfg: ClusterConfig) -> list[float]:
    """ARI between the full fit's assignment and refits on ``stability_runs`` seeded subsamples
    (each refit assigns every user); contingency tables are built in Spark."""
    out = []
    for b in range(cfg.stability_runs):
        sub = users.sample(fraction=cfg.stability_fraction, seed=seed + 7919 * (b + 1))
        refit = fit_kmeans(sub, k, seed + 1009 * (b + 1), cfg).transform(users).select("entity_id", F.col("cluster_id").alias("refit"))
        out.append(external_scores(contingency(reference.join(refit, "entity_id"), "cluster_id", "refit"))["ari"])
    return out


def choose_k(sweep: list[dict[str, float]], selection: str, tolerance: float) -> tuple[int, str]:
    """The documented rule: with ``stability``, among the k whose silhouette is within
    ``tolerance`` (relative) of the best, the one with the highest mean stability (ties: the
    higher silhouette); with ``silhouette``, the best silhouette."""
    best = max(sweep, key=lambda r: (r["silhouette"], -r["k"]))
    if selection == "silhouette" or "stability" not in best:
        return int(best["k"]), "best silhouette"
    floor = best["silhouette"] - tolerance * abs(best["silhouette"])
    candidates = [r for r in sweep if r["silhouette"] >= floor]
    pick = max(candidates, key=lambda r: (round(r["stability"], 6), r["silhouette"], -r["k"]))
    return int(pick["k"]), f"most stable k with silhouette within {tolerance:.0%} of the best ({best['silhouette']:.4f} at k={best['k']})"


def sweep_and_fit(users: DataFrame, n: int, ks: list[int], seed: int, cfg: ClusterConfig):
    """Fit every k of ``ks`` (on a hash sample of ``cfg.sweep_sample`` users when there are
    more), choose k by the documented rule, and return ``(k, model, sweep, rule)`` with the
    chosen k's model fitted on all ``users``."""
    sample, n_sweep = users, n
    if len(ks) > 1 and cfg.sweep_sample is not None and n > cfg.sweep_sample:
        sample = users.where(hash_uniform("entity_id", seed=seed) < cfg.sweep_sample / n).persist(StorageLevel.MEMORY_AND_DISK)
        n_sweep = sample.count()
        log.info("cluster: k sweep on a sample of %d of %d users (cluster.sweep_sample)", n_sweep, n)
    sweep, models = [], {}
    for k in ks:
        model = fit_best(sample, k, seed, cfg)
        pred = model.transform(sample)
        row = {"k": k, "silhouette": silhouette(pred), "inertia": float(model.summary.trainingCost)}
        if cfg.stability_runs > 0:
            runs = stability(sample, pred.select("entity_id", "cluster_id"), k, seed, cfg)
            row["stability"], row["stability_low"], row["stability_high"] = bootstrap_ci(runs, seed=seed)
        sweep.append(row)
        models[k] = model
        log.info(
            "cluster: k=%d silhouette %.4f inertia %.2f%s",
            k,
            row["silhouette"],
            row["inertia"],
            f" stability {row['stability']:.3f} [{row['stability_low']:.3f}, {row['stability_high']:.3f}]" if "stability" in row else "",
        )
    k, rule = choose_k(sweep, cfg.selection, cfg.silhouette_tolerance)
    model = models[k]
    if sample is not users:
        sample.unpersist()
        rule += f"; chosen on {n_sweep} sampled users, refitted on all {n}"
        model = fit_best(users, k, seed, cfg)
    for row in sweep:
        row["sweep_users"] = n_sweep
    return k, model, sweep, rule


@dataclass(frozen=True)
class ClusterResult:
    k: int
    users: int
    sweep: list[dict[str, float]]
    rule: str = ""


def run(spark: SparkSession, ctx: RunContext, cfg: ClusterConfig, seed: int) -> ClusterResult:
    """Cluster this run's user vectors; write ``clusters``, ``centroids`` and the k sweep."""
    stored = ctx.store.read(spark, ctx.tables.embeddings, ctx.run_id).where(F.col("entity_type") == "user")
    n = stored.count()
    users = (
        stored.select("entity_id", F.col("embedding").alias("emb"))
        .withColumn("features", array_to_vector("emb"))
        # rows in a fixed partition and order: KMeans' seeded k-means|| sampling and the
        # stability subsamples then pick the same users on any cluster layout
        .repartition(user_partitions(n, cfg), "entity_id")
        .sortWithinPartitions("entity_id")
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        if n == 0:
            raise InputError("no user vectors to cluster (did the embed stage run?)")
        if cfg.model_run:
            from pyspark.ml.clustering import KMeansModel

            validate_run_id(cfg.model_run)
            path = ctx.artifacts_dir / "runs" / cfg.model_run / "kmeans"
            if not path.is_dir():
                raise InputError(f"cluster.model_run: run {cfg.model_run} has no KMeans model (looked in {path})")
            model = KMeansModel.load(str(path))
            k, rule, sweep = model.getK(), f"assigned to the segments of run {cfg.model_run} (no refit)", []
            log.info("cluster: assigning %d users to the %d segments of run %s", n, k, cfg.model_run)
            return _finish(spark, ctx, users, model, k, n, sweep, rule, save_model=False)
        ks = [cfg.k] if cfg.k is not None else list(range(cfg.k_min, min(cfg.k_max, n - 1) + 1))
        if cfg.k is not None and cfg.k >= n:
            raise ConfigError(f"cluster.k: {cfg.k} is not below the number of users ({n})")
        if not ks:
            raise InputError(f"only {n} users: too few to cluster (need at least {cfg.k_min + 1})")
        k, model, sweep, rule = sweep_and_fit(users, n, ks, seed, cfg)
        return _finish(spark, ctx, users, model, k, n, sweep, rule)
    finally:
        users.unpersist()


def _finish(
    spark: SparkSession, ctx: RunContext, users: DataFrame, model, k: int, n: int, sweep: list, rule: str, save_model: bool = True
) -> ClusterResult:
    """Write clusters, centroids, the model, profiles and the sweep for the chosen model."""
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
        r["cluster_id"]: r["count"] for r in ctx.store.read(spark, ctx.tables.clusters, ctx.run_id).groupBy("cluster_id").count().collect()
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
    if save_model:
        model.write().overwrite().save(str(ctx.run_dir / "kmeans"))
    sessions = ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).where("is_modelled")
    profiles = cluster_profiles(spark, sessions, ctx.store.read(spark, ctx.tables.clusters, ctx.run_id))
    ctx.store.write_run(profiles, ctx.tables.cluster_profiles, ctx.run_id)
    for p in ctx.store.read(spark, ctx.tables.cluster_profiles, ctx.run_id).orderBy("cluster_id").collect():
        log.info("cluster %d: %s", p["cluster_id"], p["description"])
    sweep_rows = [
        {
            "method": "encoder",
            "k": r["k"],
            "metric": m,
            "value": r[m],
            "ci_low": r.get(f"{m}_low"),
            "ci_high": r.get(f"{m}_high"),
            "family": "sweep",
            "details": json.dumps({"chosen": r["k"] == k, "rule": rule, "users": r.get("sweep_users")}),
        }
        for r in sweep
        for m in ("silhouette", "inertia", "stability")
        if m in r
    ]
    from seqclust.evaluate import write_metrics

    write_metrics(spark, ctx, sweep_rows, families=("sweep",))
    log.info("cluster: k=%d for %d users (%s)", k, n, rule)
    return ClusterResult(k, n, sweep, rule)
