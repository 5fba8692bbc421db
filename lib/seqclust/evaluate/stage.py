"""Evaluate a clustering beside baselines, with Spark aggregates (nothing O(n^2) on the driver).

Internal indices (silhouette, Davies-Bouldin, Calinski-Harabasz, inertia) come from
per-cluster aggregates; external agreement (ARI, NMI, homogeneity, completeness, V-measure)
from a contingency table built in Spark. scikit-learn is the test oracle for both.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pyspark import StorageLevel
from pyspark.ml.functions import array_to_vector
from pyspark.ml.stat import Summarizer
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from seqclust.core.config import BaselineConfig, ClusterConfig, EvaluateConfig, LabelsConfig
from seqclust.core.privacy import pseudonym
from seqclust.core.sampling import user_sample
from seqclust.core.tables import MetricRow
from seqclust.evaluate.baseline import boe_clusters, random_assignment
from seqclust.evaluate.metrics import contingencies, external_scores
from seqclust.runtime.context import RunContext, write_metrics
from seqclust.runtime.store import read_labels
from seqclust.segment.cluster import coarse, leaf_rows, model_run_centers, model_run_tree, silhouette
from seqclust.segment.hierarchy import Tree

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Internal indices from per-cluster aggregates


def internal_scores(df: DataFrame, emb_col: str = "emb", cluster_col: str = "cluster_id") -> dict[str, float]:
    """Davies-Bouldin, Calinski-Harabasz, inertia and silhouettes (squared Euclidean, cosine).

    Only per-cluster aggregates (k rows) and centroids reach the driver.
    """
    vec = df.select(F.col(cluster_col).alias("c"), F.col(emb_col).alias("emb"), array_to_vector(F.col(emb_col)).alias("features"))
    cents = vec.groupBy("c").agg(Summarizer.mean(F.col("features")).alias("m"), F.count("*").alias("n")).collect()
    k = len(cents)
    n = sum(r["n"] for r in cents)
    if k < 2 or n <= k:
        return {}
    ids = [r["c"] for r in cents]
    C = np.array([r["m"].toArray() for r in cents])
    sizes = np.array([r["n"] for r in cents], dtype=np.float64)
    spark = df.sparkSession
    cdf = spark.createDataFrame([(int(i), [float(v) for v in c]) for i, c in zip(ids, C)], "c int, centroid array<double>")
    joined = vec.join(F.broadcast(cdf), "c")
    sq = F.aggregate(F.zip_with("emb", "centroid", lambda x, y: (x - y) * (x - y)), F.lit(0.0).cast("double"), lambda acc, x: acc + x)
    per = joined.groupBy("c").agg(F.sum(F.sqrt(sq)).alias("sd"), F.sum(sq).alias("ssq")).collect()
    sd = {r["c"]: r["sd"] for r in per}
    ssq = {r["c"]: r["ssq"] for r in per}
    S = np.array([sd[i] for i in ids]) / sizes  # mean distance to own centroid
    W = float(sum(ssq[i] for i in ids))
    overall = (C * sizes[:, None]).sum(axis=0) / n
    B = float((sizes * ((C - overall) ** 2).sum(axis=1)).sum())
    dists = np.sqrt(((C[:, None, :] - C[None, :, :]) ** 2).sum(axis=2))
    dists[dists == 0] = np.inf  # as scikit-learn: the diagonal and coinciding centroids count 0
    ratio = (S[:, None] + S[None, :]) / dists
    db = float(np.mean(ratio.max(axis=1)))
    ch = float((B / (k - 1)) / (W / (n - k))) if W > 0 else math.inf
    pred = vec.withColumnRenamed("c", "cluster_id")
    return {
        "silhouette": silhouette(pred, "squaredEuclidean"),
        "silhouette_cosine": silhouette(pred, "cosine"),
        "davies_bouldin": db,
        "calinski_harabasz": ch,
        "inertia": W,
    }


def _drift_rows(
    spark: SparkSession,
    ctx: RunContext,
    cluster_cfg: ClusterConfig,
    k: int,
    seed: int,
    baseline: BaselineConfig | None = None,
    boe_now: DataFrame | None = None,
    keep: Callable[[DataFrame, str], DataFrame] | None = None,
) -> list[MetricRow]:
    """Drift against the model run (``cluster.model_run``) or else the latest earlier
    succeeded run of the same input; [] when there is none. (Long on purpose: finding the
    previous run and measuring three methods against it share persisted tables that must be
    released on every path.)

    Beside the encoder's drift, two references: ``random`` (each run's users drawn at random
    into clusters of that run's sizes, matched by user overlap: what "users changed segment"
    reads when segments carry no information about users) and ``bag_of_events`` (each run's
    sessions clustered on their event counts at that run's k, matched by user overlap).
    ``keep`` restricts both runs to the evaluation sample of users.
    """
    keep = keep or (lambda df, col: df)
    from seqclust.evaluate.drift import segmentation_drift

    runs_t = ctx.tables.runs
    if not ctx.store.exists(runs_t):
        return []
    runs = ctx.store.read(spark, runs_t)
    me = runs.where(F.col("run_id") == ctx.run_id).select("encoder_id").first()
    if cluster_cfg.model_run:
        prev_id, alignment = cluster_cfg.model_run, "same_model"
    else:
        if not ctx.input_path:
            return []
        prev = (
            runs.where(
                (F.col("status") == "succeeded")
                & (F.col("input_path") == F.lit(ctx.input_path))
                & (F.col("run_id") != ctx.run_id)
                & (F.col("started_at") < F.lit(ctx.started_at))
            )
            .orderBy(F.desc("started_at"), F.desc("run_id"))
            .select("run_id", "encoder_id")
            .first()
        )
        if prev is None:
            return []
        prev_id = prev["run_id"]
        alignment = "centroids" if me is not None and prev["encoder_id"] == me["encoder_id"] else "user_overlap"

    def clusters(rid: str) -> DataFrame:
        return keep(
            coarse(ctx.store.read(spark, ctx.tables.clusters, rid)).where(F.col("entity_type") == "user").select("entity_id", "cluster_id"),
            "entity_id",
        )

    def centroids(rid: str) -> list[list[float]]:
        rows = ctx.store.read(spark, ctx.tables.centroids, rid).where(F.col("method") == "encoder").orderBy("cluster_id").collect()
        return [r["centroid"] for r in rows]

    old = clusters(prev_id).persist(StorageLevel.MEMORY_AND_DISK)
    new = clusters(ctx.run_id).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        old_sizes = {r["cluster_id"]: r["count"] for r in old.groupBy("cluster_id").count().collect()}
        if not old_sizes:
            log.warning("evaluate: run %s has no clusters; drift skipped", prev_id)
            return []
        results = {"encoder": (segmentation_drift(old, new, alignment, centroids(prev_id), centroids(ctx.run_id)), alignment)}
        new_sizes = {r["cluster_id"]: r["count"] for r in new.groupBy("cluster_id").count().collect()}

        def shares(sizes: dict[int, int]) -> list[float]:
            return [sizes[i] / sum(sizes.values()) for i in sorted(sizes)]

        r_old = random_assignment(old.select("entity_id"), shares(old_sizes), seed, "cluster_id")
        r_new = random_assignment(new.select("entity_id"), shares(new_sizes), seed + 1, "cluster_id")
        results["random"] = (segmentation_drift(r_old, r_new, "user_overlap"), "user_overlap")
        if baseline is not None and baseline.bag_of_events and boe_now is not None:
            prev_sessions = keep(ctx.store.read(spark, ctx.tables.sessions, prev_id).where("is_modelled"), "user_id")
            if prev_sessions.limit(1).count():
                b_old = boe_clusters(prev_sessions, len(old_sizes), sum(old_sizes.values()), seed, baseline, cluster_cfg, vectors=False)
                b_new = boe_now.select("entity_id", "cluster_id")
                try:
                    results["bag_of_events"] = (segmentation_drift(b_old, b_new, "user_overlap"), "user_overlap")
                finally:
                    b_old.unpersist()
    finally:
        old.unpersist()
        new.unpersist()
    rows: list[MetricRow] = []
    for method, (d, how) in results.items():
        details = {"previous_run": prev_id, "alignment": how, "matched": {str(a): b for a, b in d.matched.items()}}
        log.info(
            "evaluate: %s drift vs run %s (%s): PSI %.4f, JS %.4f, %.1f%% of %d shared users changed segment",
            method,
            prev_id,
            how,
            d.psi,
            d.js,
            100 * d.changed_share,
            d.users_compared,
        )
        rows += [
            MetricRow(method=method, k=k, family="drift", metric=m, value=float(v), details=details)
            for m, v in (
                ("psi_cluster_shares", d.psi),
                ("js_cluster_shares", d.js),
                ("users_changed_cluster", d.changed_share),
                ("users_compared", d.users_compared),
            )
        ]
    return rows


def proxy_labels(sessions: DataFrame) -> DataFrame:
    """Labels any event log has, for external agreement where no true labels exist:
    ``buyer`` (the user purchased in the window) and ``dominant_category`` (the user's most
    frequent category, ties to the smallest). Named as proxies wherever they are reported."""
    buyer = sessions.groupBy("user_id").agg(
        F.when(F.max(F.coalesce(F.col("event_counts")["purchase"], F.lit(0))) > 0, "buyer").otherwise("non_buyer").alias("buyer")
    )
    cats = sessions.select("user_id", F.explode("categories").alias("c")).groupBy("user_id", "c").count()
    dom = (
        cats.groupBy("user_id")
        .agg(F.min(F.struct(-F.col("count"), F.col("c"))).alias("m"))
        .select("user_id", F.col("m.c").alias("dominant_category"))
    )
    return buyer.join(dom, "user_id", "left").withColumnRenamed("user_id", "entity_id")


@dataclass(frozen=True)
class EvaluateResult:
    k: int
    metrics: dict[str, dict[str, float | None]]  # method -> metric -> value
    labelled_users: int


def _internal_rows(users: DataFrame, boe: DataFrame | None, k: int, baseline: BaselineConfig, leaves: int = 0) -> list[MetricRow]:
    """Family ``internal``: each method's indices in its own space (``details.space``); with
    ``leaves``, the segment tree's leaves too (method ``leaf``, column ``leaf_id``)."""
    rows: list[MetricRow] = []
    methods = [("encoder", "cluster_id", k), ("random", "random_id", k)] + ([("leaf", "leaf_id", leaves)] if leaves else [])
    for method, col, kk in methods:
        rows += [
            MetricRow(method=method, k=kk, family="internal", metric=m, value=v, details={"space": "encoder"})
            for m, v in internal_scores(users, "emb", col).items()
        ]
    log.info("evaluate: internal indices of the encoder's%s and the random segments done", " leaf," if leaves else "")
    if boe is not None:
        details = {"space": "bag_of_events", "vocab_size": baseline.vocab_size, "pca_dim": baseline.pca_dim}
        rows += [
            MetricRow(method="bag_of_events", k=k, family="internal", metric=m, value=v, details=details)
            for m, v in internal_scores(boe, "emb", "cluster_id").items()
        ]
        log.info("evaluate: bag-of-events baseline clustered at k=%d, its internal indices done", k)
    return rows


def _agreement_rows(
    spark: SparkSession,
    ctx: RunContext,
    assigned: DataFrame,
    method_cols: list[tuple[str, str]],
    sessions: DataFrame,
    labels: LabelsConfig,
    salt: str | None,
    k: int,
) -> tuple[list[MetricRow], int]:
    """Families ``external`` (the run's labels, when given) and ``proxy`` (labels any log has),
    for every method at once: ``assigned`` holds each method's segment column beside the user.
    Returns the rows and the number of labelled users."""
    rows: list[MetricRow] = []
    n_labelled = 0
    cols = [c for _, c in method_cols]
    if ctx.labels_path:
        lab_df = read_labels(spark, ctx.labels_path, labels.format, labels.user_col, labels.label_col)
        if salt is not None:  # user ids were pseudonymised at ingest: join on the pseudonym
            lab_df = lab_df.withColumn("user_id", pseudonym(F.col("user_id"), salt))
        tables = contingencies(assigned.join(lab_df.withColumnRenamed("user_id", "entity_id"), "entity_id"), "label", cols)
        n_labelled = int(tables["cluster_id"].sum()) if "cluster_id" in tables else 0
        details = {"labels": ctx.labels_path, "label_col": labels.label_col, "labelled_users": n_labelled}
        if n_labelled == 0:
            log.warning("evaluate: labels at %s match none of the clustered users; external metrics skipped", ctx.labels_path)
        else:
            for method, col in method_cols:
                rows += [
                    MetricRow(method=method, k=k, family="external", metric=m, value=v, details=details)
                    for m, v in external_scores(tables[col]).items()
                ]
        rows.append(MetricRow(method="encoder", k=k, family="external", metric="labelled_users", value=float(n_labelled), details=details))
    proxies = proxy_labels(sessions).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        lab = assigned.join(proxies, "entity_id")
        for proxy in ("buyer", "dominant_category"):
            details = {"labels": f"proxy:{proxy}", "note": "proxy label derived from the events, not ground truth"}
            tables = contingencies(lab.where(F.col(proxy).isNotNull()), proxy, cols)
            for method, col in method_cols:
                rows += [
                    MetricRow(method=method, k=k, family="proxy", metric=f"{m}_{proxy}", value=v, details=details)
                    for m, v in external_scores(tables[col]).items()
                    if m in ("ari", "nmi", "v_measure")
                ]
    finally:
        proxies.unpersist()
    log.info("evaluate: agreement with labels and proxy labels done")
    return rows, n_labelled


def _usefulness_rows(
    spark: SparkSession,
    ctx: RunContext,
    sessions: DataFrame,
    shares: list[float],
    k: int,
    n_eval: int,
    seed: int,
    ev: EvaluateConfig,
    cluster_cfg: ClusterConfig,
    baseline: BaselineConfig,
    history_vectors: Callable[[DataFrame, DataFrame], DataFrame] | None,
    confident: DataFrame | None = None,
    tree: Tree | None = None,
) -> list[MetricRow]:
    """Families ``downstream`` (next session: items, categories, conversion; return within N
    days) and ``temporal`` (first half vs second half of each user's history), for the top
    level, the segment tree's leaves and the confident members (``user_id``)."""
    from seqclust.evaluate.downstream import evaluate_downstream, return_rows, temporal_stability_rows

    cents = [
        r["centroid"]
        for r in ctx.store.read(spark, ctx.tables.centroids, ctx.run_id).where(F.col("method") == "encoder").orderBy("cluster_id").collect()
    ]
    # the evaluated users' stored session vectors, read once: every family below pools history
    # vectors from them (joined to the whole embeddings table, each family scanned it: ~1-2 min
    # apiece at 100M events)
    stored = ctx.store.read(spark, ctx.tables.embeddings, ctx.run_id).where(F.col("entity_type") == "session")
    stored = stored.select(F.col("entity_id").alias("session_id"), "embedding").join(sessions.select("session_id"), "session_id")
    stored = stored.persist(StorageLevel.MEMORY_AND_DISK)
    if history_vectors is None:  # the encoder's vectors pooled, as embed.representation=encoder does
        from seqclust.represent.embed import pool_users

        def hv(hist: DataFrame) -> DataFrame:
            emb = hist.select("session_id", "user_id", "end_ts").join(stored, "session_id")
            return pool_users(emb).select("entity_id", "embedding")

    else:
        full = history_vectors

        def hv(hist: DataFrame) -> DataFrame:
            return full(hist, stored)

    fine_cents = model_run_centers(spark, ctx, ctx.run_id, "fine")
    boe_assign = None
    if baseline.bag_of_events:

        def boe_assign(hist: DataFrame) -> DataFrame:
            return boe_clusters(hist, k, n_eval, seed, baseline, cluster_cfg, vectors=False, id_col="user_id")

    try:
        rows = evaluate_downstream(
            sessions,
            hv,
            cents,
            shares,
            seed,
            ev.top_n,
            replicates=ev.bootstrap,
            baseline_assign=boe_assign,
            fine_centroids=fine_cents,
            tree=tree,
            confident=confident,
        )
        rows += temporal_stability_rows(sessions, hv, cents, shares, seed, ev.bootstrap, tree=tree, confident=confident)
        if ev.return_days > 0:
            rows += return_rows(sessions, hv, cents, shares, seed, ev.return_days, ev.bootstrap, fine_centroids=fine_cents)
    finally:
        stored.unpersist()
    return [r.with_k(k) for r in rows]


def run(
    spark: SparkSession,
    ctx: RunContext,
    seed: int,
    labels: LabelsConfig,
    cluster_cfg: ClusterConfig,
    baseline: BaselineConfig,
    salt: str | None = None,
    evaluate_cfg: EvaluateConfig | None = None,
    history_vectors: Callable[[DataFrame, DataFrame], DataFrame] | None = None,
) -> EvaluateResult:
    """Evaluate this run's user clusters beside a random baseline (same cluster sizes) and the
    bag-of-events baseline (KMeans at the same k); write ``metrics``.

    Internal indices are computed in each method's own space (``details.space``); external
    agreement is comparable across methods as is. Above ``evaluate.sample_users`` clustered
    users, every family is measured on the same seeded hash sample of about that many users
    (metric ``evaluated_users`` says how many). ``history_vectors`` ((sessions, their stored
    vectors) -> entity_id, embedding) makes a user's vector from their history for the
    next-session evaluation, the way the run made its user vectors (default: the encoder's
    session vectors pooled).
    """
    ev = evaluate_cfg if evaluate_cfg is not None else EvaluateConfig()  # the configuration's defaults
    emb = (
        ctx.store.read(spark, ctx.tables.embeddings, ctx.run_id)
        .where(F.col("entity_type") == "user")
        .select("entity_id", F.col("embedding").alias("emb"))
    )
    top_rows = coarse(ctx.store.read(spark, ctx.tables.clusters, ctx.run_id)).where(F.col("entity_type") == "user")
    cl = top_rows.select("entity_id", "cluster_id")
    sizes = {r["cluster_id"]: r["count"] for r in cl.groupBy("cluster_id").count().collect()}
    k = len(sizes)
    n_users = sum(sizes.values())
    shares = [sizes[i] / n_users for i in sorted(sizes)]
    keep = user_sample(n_users, ev.sample_users, seed)
    scored = emb.join(cl, "entity_id")
    leaf = leaf_rows(ctx.store.read(spark, ctx.tables.clusters, ctx.run_id))
    tree = model_run_tree(spark, ctx, ctx.run_id) if leaf is not None else None
    leaves = len(tree.leaf_nodes) if tree is not None else 0
    # a tree where no segment split has the top level as its leaves (the same rows): its
    # figures are the encoder's, copied rather than measured twice
    flat_tree = tree is not None and tree.is_flat
    leaves_measured = 0 if flat_tree else leaves
    if leaf is not None and leaves_measured:
        scored = scored.join(leaf.select("entity_id", F.col("cluster_id").alias("leaf_id")), "entity_id", "left")
    users = random_assignment(keep(scored, "entity_id"), shares, seed).persist(StorageLevel.MEMORY_AND_DISK)
    n_eval = users.count()
    if n_eval < n_users:
        log.info("evaluate: on a hash sample of %d of %d users (evaluate.sample_users=%d)", n_eval, n_users, ev.sample_users)
    sessions = keep(ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).where("is_modelled"), "user_id")
    confident = None  # the members at least cluster.min_confidence sure of their top segment
    if "confidence" in top_rows.columns:
        sure = top_rows.where(F.col("confidence") >= cluster_cfg.min_confidence)
        confident = keep(sure, "entity_id").select(F.col("entity_id").alias("user_id"))
    boe = None
    try:
        details = {"users": n_users, "sampled": n_eval < n_users, "sample_users": ev.sample_users}
        rows = [MetricRow(method="encoder", k=k, family="internal", metric="evaluated_users", value=float(n_eval), details=details)]
        if baseline.bag_of_events:
            boe = boe_clusters(sessions, k, n_eval, seed, baseline, cluster_cfg)
        rows += _internal_rows(users, boe, k, baseline, leaves_measured)
        # every method's segment id beside the user: one contingency job per label serves all
        assigned = users.select("entity_id", "cluster_id", "random_id", *(["leaf_id"] if leaves_measured else []))
        method_cols = [("encoder", "cluster_id"), ("random", "random_id")] + ([("leaf", "leaf_id")] if leaves_measured else [])
        if boe is not None:
            assigned = assigned.join(boe.select("entity_id", F.col("cluster_id").alias("boe_id")), "entity_id", "left")
            method_cols.append(("bag_of_events", "boe_id"))
        agreement, n_labelled = _agreement_rows(spark, ctx, assigned, method_cols, sessions, labels, salt, k)
        rows += [r.with_k(leaves) if r.method == "leaf" else r for r in agreement]
        if flat_tree:
            rows += [
                dataclasses.replace(r, method="leaf", k=leaves)
                for r in rows
                if r.method == "encoder" and r.family in ("internal", "external", "proxy") and r.metric != "evaluated_users"
            ]
        rows += _drift_rows(spark, ctx, cluster_cfg, k, seed, baseline, boe, keep)
        families: tuple[str, ...] = ("internal", "external", "proxy", "drift")
        if ev.downstream:
            rows += _usefulness_rows(
                spark, ctx, sessions, shares, k, n_eval, seed, ev, cluster_cfg, baseline, history_vectors, confident, tree
            )
            families = (*families, "downstream", "temporal")
        write_metrics(spark, ctx, rows, families=families)
        results: dict[str, dict[str, float | None]] = {}
        for r in rows:
            results.setdefault(r.method, {})[r.metric] = r.value
        for method, vals in results.items():
            log.info("evaluate: %s %s", method, ", ".join(f"{m}={v:.4f}" for m, v in sorted(vals.items()) if v is not None))
        return EvaluateResult(k, results, n_labelled)
    finally:
        users.unpersist()
        if boe is not None:
            boe.unpersist()
