"""Cluster user vectors with MLlib KMeans; k from a sweep when not fixed.

The sweep is model selection on a bounded sample (``cluster.sweep_sample`` users, in driver
memory, scikit-learn); the segments are the chosen k's MLlib fit on every user.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd  # the pandas UDFs' type hints are resolved in this module's namespace
import pyarrow.compute as pc
from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.functions import array_to_vector
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from seqclust.core import tables
from seqclust.core.compat import to_arrow
from seqclust.core.config import ClusterConfig, validate_run_id
from seqclust.core.errors import ConfigError, InputError
from seqclust.core.sampling import bootstrap_ci, user_sample
from seqclust.runtime.context import RunContext, write_metrics
from seqclust.runtime.spark import ROWS_CACHE
from seqclust.runtime.store import one_row
from seqclust.segment import refine
from seqclust.segment.hierarchy import Tree, own_margin
from seqclust.segment.leaves import HistoryFn, grow_tree, node_sizes, place, tree_rows
from seqclust.segment.profiles import cluster_profiles
from seqclust.segment.scores import local_kmeans, silhouette_sq

log = logging.getLogger(__name__)


def fit_kmeans(features: DataFrame, k: int, seed: int, cfg: ClusterConfig) -> KMeansModel:
    """Seeded k-means|| on a ``features`` vector column (Euclidean; vectors are L2-normalised,
    so this orders neighbours as cosine distance does). When k-means|| finds fewer distinct
    centres than k (a view-only clickstream: every bag-of-events vector is the same), MLlib's
    block solver fails (ArrayIndexOutOfBoundsException in KMeansAggregator, Spark 4.2, with an
    executor stack trace per retried task); that case is detected before fitting
    (``_distinct_at_least``) and fitted with the row solver, which returns the fewer centres.
    Should the block solver still fail that way, the fit is repeated with the row solver."""

    def fit(solver: str) -> KMeansModel:
        km = KMeans(
            k=k,
            seed=seed,
            initMode="k-means||",
            initSteps=cfg.init_steps,
            maxIter=cfg.max_iter,
            solver=solver,
            featuresCol="features",
            predictionCol="cluster_id",
        )
        return km.fit(features)

    if cfg.solver == "row":
        return fit("row")
    if not _distinct_at_least(features, k):
        log.info("cluster: fewer than k=%d distinct vectors: MLlib's row solver (its block solver cannot fit them)", k)
        return fit("row")
    try:
        return fit(cfg.solver)
    except Exception as e:  # py4j wraps the JVM error; only this known failure is retried
        if "ArrayIndexOutOfBounds" not in str(e):
            raise
        log.warning(
            "cluster: MLlib's %s solver failed on vectors with fewer distinct values than k=%d; refitting with the row solver",
            cfg.solver,
            k,
        )
        return fit("row")


def _distinct_at_least(features: DataFrame, k: int) -> bool:
    """Whether ``features`` holds at least ``k`` distinct vectors: a HyperLogLog count of the
    vectors' hashes in one pass (no shuffle of rows), confirmed exactly only when it is near k."""
    from pyspark.ml.functions import vector_to_array

    h = F.hash(vector_to_array(F.col("features")))
    approx = one_row(features.agg(F.approx_count_distinct(h).alias("n")))["n"] or 0
    if approx >= 2 * k:
        return True
    return features.select(h.alias("h")).distinct().limit(k).count() >= k


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
    best: tuple[float, KMeansModel] | None = None
    for i in range(max(1, cfg.n_init)):
        model = fit_kmeans(features, k, seed + i, cfg)
        cost = float(model.summary.trainingCost)
        if best is None or cost < best[0]:
            best = (cost, model)
    assert best is not None
    return best[1]


def silhouette(pred: DataFrame, distance: str = "squaredEuclidean", pred_col: str = "cluster_id") -> float:
    """Spark's silhouette (exact, O(n·k) thanks to per-cluster aggregates)."""
    return float(
        ClusteringEvaluator(featuresCol="features", predictionCol=pred_col, distanceMeasure=distance, metricName="silhouette").evaluate(
            pred
        )
    )


def sample_vectors(users: DataFrame, n: int, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(entity ids, float64 vectors)`` of every user when ``n <= limit``, else of a seeded hash
    sample of about ``limit`` users, sorted by id (the same rows on any cluster layout). The
    only user vectors that reach the driver: about ``limit x dim`` floats, whatever ``n``."""
    t = to_arrow(user_sample(n, limit, seed)(users.select("entity_id", "emb"), "entity_id"))
    ids = np.asarray(t.column("entity_id").to_pylist(), dtype=object)
    if len(ids) == 0:
        return ids, np.zeros((0, 0))
    order = np.argsort(ids.astype(str), kind="stable")
    X = pc.list_flatten(t.column("emb")).to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(ids), -1)
    return ids[order], X[order]


def stability(X: np.ndarray, labels: np.ndarray, k: int, seed: int, cfg: ClusterConfig) -> list[float]:
    """ARI between ``labels`` (the fit on all of ``X``) and ``stability_runs`` single-start refits
    on seeded ``stability_fraction`` subsamples, each refit assigning every row of ``X``."""
    from sklearn.metrics import adjusted_rand_score

    out = []
    for b in range(cfg.stability_runs):
        sub = np.random.default_rng(seed + 7919 * (b + 1)).random(len(X)) < cfg.stability_fraction
        if sub.sum() <= k:
            sub[:] = True
        refit = local_kmeans(X[sub], k, seed + 1009 * (b + 1), 1, cfg.max_iter)
        out.append(float(adjusted_rand_score(labels, refit.predict(X))))
    return out


@dataclass(frozen=True)
class KChoice:
    """The chosen k, the rule in words, and whether the evidence was clear: ``uncertain``
    when a k more than one away from the choice is within the silhouette tolerance too
    (``runner_up`` is the best of those)."""

    k: int
    rule: str
    uncertain: bool = False
    runner_up: int | None = None


def select_k(sweep: list[dict[str, float]], selection: str, tolerance: float) -> KChoice:
    """The documented rules (docs/EVALUATION.md). ``parsimonious``: the smallest k whose
    silhouette is within ``tolerance`` (relative) of the best: a k that splits a persona in
    two rarely raises the silhouette by more than noise, and one that merges two lowers it
    clearly. ``stability``: among those k, the most stable (ties: the higher silhouette).
    ``silhouette``: the best silhouette. Every rule reports the k within the tolerance that
    are more than one away from its choice as the runner-up and calls the choice uncertain."""
    best = max(sweep, key=lambda r: (r["silhouette"], -r["k"]))
    floor = best["silhouette"] - tolerance * abs(best["silhouette"])
    band = [r for r in sweep if r["silhouette"] >= floor]
    if selection == "silhouette" or (selection == "stability" and "stability" not in best):
        pick, rule = best, "best silhouette"
    elif selection == "stability":
        pick = max(band, key=lambda r: (round(r["stability"], 6), r["silhouette"], -r["k"]))
        rule = f"most stable k with silhouette within {tolerance:.0%} of the best ({best['silhouette']:.4f} at k={best['k']})"
    else:
        pick = min(band, key=lambda r: r["k"])
        rule = f"smallest k with silhouette within {tolerance:.0%} of the best ({best['silhouette']:.4f} at k={best['k']})"
    far = [r for r in band if abs(r["k"] - pick["k"]) > 1]
    runner = max(far, key=lambda r: (r["silhouette"], -r["k"])) if far else None
    if runner is not None:
        rule += f"; k uncertain: k={runner['k']} is within the tolerance too (silhouette {runner['silhouette']:.4f})"
    return KChoice(int(pick["k"]), rule, runner is not None, int(runner["k"]) if runner else None)


def choose_k(sweep: list[dict[str, float]], selection: str, tolerance: float) -> tuple[int, str]:
    """``(k, rule)`` of ``select_k``."""
    c = select_k(sweep, selection, tolerance)
    return c.k, c.rule


def sweep_curves(X: np.ndarray, ks: list[int], seed: int, cfg: ClusterConfig, centers: dict | None = None) -> list[dict[str, float]]:
    """Per k of ``ks``: silhouette, inertia and (with ``stability_runs``) stability with its
    bootstrap interval, from scikit-learn fits (best of ``sweep_n_init`` k-means++ starts) on
    the in-memory vectors ``X``; each k's centres go into ``centers`` when given."""
    sweep = []
    for k in ks:
        km = local_kmeans(X, k, seed, cfg.sweep_n_init, cfg.max_iter)
        if centers is not None:
            centers[k] = km.cluster_centers_
        row = {"k": k, "silhouette": silhouette_sq(X, km.labels_), "inertia": float(km.inertia_)}
        if cfg.stability_runs > 0:
            runs = stability(X, km.labels_, k, seed, cfg)
            row["stability"], row["stability_low"], row["stability_high"] = bootstrap_ci(runs, seed=seed)
        sweep.append(row)
        log.info(
            "cluster: k=%d silhouette %.4f inertia %.2f%s",
            k,
            row["silhouette"],
            row["inertia"],
            f" stability {row['stability']:.3f} [{row['stability_low']:.3f}, {row['stability_high']:.3f}]" if "stability" in row else "",
        )
    return sweep


def fit_population(users: DataFrame, n: int, ks: list[int], cfg: ClusterConfig) -> tuple[DataFrame, int, str]:
    """``(users the personas are fitted on, their number, a note for the rule)``: the users
    with at least ``cfg.fit_min_sessions`` modelled sessions when there are at least 20 per
    k of the sweep, else every user. A one-session user's vector is mostly noise (on the
    persona family a classifier that knows the personas is right for 89-97% of them, 98-100%
    from four sessions on), and centres pulled towards that noise misplace everyone; every
    user is then assigned to the nearest centre."""
    m = cfg.fit_min_sessions
    if m <= 1 or "n_sessions" not in users.columns:
        return users, n, ""
    rich = users.where(F.col("n_sessions").isNull() | (F.col("n_sessions") >= m))
    n_rich = rich.count()
    need = 20 * max(ks)
    if n_rich == n:
        return users, n, ""
    if n_rich < need:
        log.info("cluster: only %d of %d users have %d or more sessions (fewer than %d): personas fitted on every user", n_rich, n, m, need)
        return users, n, ""
    log.info("cluster: personas fitted on the %d of %d users with %d or more sessions; every user is then assigned", n_rich, n, m)
    return rich, n_rich, f"fitted on the {n_rich} of {n} users with {m}+ sessions (cluster.fit_min_sessions), every user assigned"


@dataclass(frozen=True)
class Projection:
    """The space the personas are found in: the top principal directions of the fit users'
    vectors (``components`` ``[d, D]``, fitted on the sweep sample), or the vectors themselves
    (``components`` None). k-means is translation-invariant, so the projection needs no
    centring: ``P = X @ components.T``."""

    components: np.ndarray | None

    @staticmethod
    def fit(X: np.ndarray, dim: int | None, seed: int) -> Projection:
        if dim is None or X.shape[1] <= dim or X.shape[0] <= dim:
            return Projection(None)
        from sklearn.decomposition import PCA

        pca = PCA(n_components=dim, random_state=seed, svd_solver="full").fit(X)
        log.info(
            "cluster: personas sought on the top %d principal components (%.0f%% of the variance)",
            dim,
            100 * float(pca.explained_variance_ratio_.sum()),
        )
        return Projection(np.asarray(pca.components_, dtype=np.float64))

    def np(self, X: np.ndarray) -> np.ndarray:
        return X if self.components is None else X @ self.components.T

    def spark(self, users: DataFrame, vec_col: str = "emb", out_col: str = "pemb") -> DataFrame:
        """``out_col`` (array) and ``features`` (vector) in the projected space."""
        if self.components is None:
            return users.withColumn(out_col, F.col(vec_col)).withColumn("features", array_to_vector(F.col(out_col)))
        P = np.asarray(self.components, dtype=np.float64).T  # d x m

        @F.pandas_udf("array<double>")  # type: ignore[call-overload]
        def project(vecs: pd.Series) -> pd.Series:  # numpy per Arrow batch (SQL array lambdas: ~19x slower)
            return pd.Series(list(_stack(vecs, P.shape[0]) @ P))

        return users.withColumn(out_col, project(vec_col)).withColumn("features", array_to_vector(F.col(out_col)))


def lift_centers(users: DataFrame, centers, k: int, vec_col: str = "emb", space_col: str = "pemb") -> np.ndarray:
    """Full-space centres of a partition found in the projected space: the mean ``vec_col`` of
    the users nearest each projected centre (one aggregation; k x dim numbers reach the
    driver). Assigning by nearest full-space centre then agrees with the projected assignment
    (measured: ARI >= 0.995 on the persona family), so every reader of the ``centroids`` table
    keeps working on the stored vectors."""
    assigned = assign_nearest(users.select(vec_col, space_col), centers, space_col)
    rows = (
        assigned.select("cluster_id", F.posexplode(vec_col).alias("pos", "v"))
        .groupBy("cluster_id", "pos")
        .agg(F.avg("v").alias("v"))
        .collect()
    )
    dim = 1 + max(r["pos"] for r in rows)
    out = np.full((k, dim), np.nan)
    for r in rows:
        out[r["cluster_id"], r["pos"]] = r["v"]
    empty = np.isnan(out).any(axis=1)
    if empty.any():  # a centre nobody is nearest to has no mean: it is dropped (k shrinks)
        log.warning("cluster: %d of %d centres have no user; dropped", int(empty.sum()), k)
        out = out[~empty]
    return out


def sweep_and_fit(users: DataFrame, n: int, ks: list[int], seed: int, cfg: ClusterConfig) -> Fit:
    """Score every k of ``ks`` on a bounded sample, choose k by the documented rule, and fit
    the chosen k on all ``users`` (the fit population: see ``fit_population``).

    Both run in one space: the top ``cfg.sweep_pca_dim`` principal components of the sample
    (``Projection``), where the noise directions that k-means would otherwise split on are
    gone (measured on the persona family: at the planted k, mixture 0.79 -> 0.94 ARI; the
    silhouette then finds every planted k within one). There MLlib KMeans (best of ``n_init``
    k-means|| starts) and the sweep's best k-means++ centres compete on inertia over all
    ``users``; the lower gives the segments, lifted back to the stored vectors
    (``lift_centers``). MLlib's k-means|| can settle in a clearly worse optimum than ten
    k-means++ starts, and a poor optimum shows as wrong segments whatever the representation.

    The sweep is model selection, so it runs where it is cheapest: on every user up to
    ``cfg.sweep_sample`` (a seeded hash sample of about that many above it), in the driver's
    memory with scikit-learn (k-means++, best of ``n_init`` starts), exact silhouette and
    ``stability_runs`` subsample refits per k; a k costs well under a second at 50,000 users.
    """
    ids, X = sample_vectors(users, n, cfg.sweep_sample, seed)
    n_sweep = len(ids)
    ks = [k for k in ks if k < n_sweep] or ks[:1]
    sampled = n_sweep < n
    proj = Projection.fit(X, cfg.sweep_pca_dim, seed)
    P = proj.np(X)
    log.info("cluster: k sweep %s on %d%s users in driver memory", f"{ks[0]}..{ks[-1]}", n_sweep, f" sampled of {n}" if sampled else "")
    centers: dict[int, np.ndarray] = {}
    sweep = sweep_curves(P, ks, seed, cfg, centers)
    choice = select_k(sweep, cfg.selection, cfg.silhouette_tolerance) if len(ks) > 1 else KChoice(ks[0], "set by cluster.k")
    rule = choice.rule
    if proj.components is not None:
        rule += f"; on the top {proj.components.shape[0]} principal components"
    if sampled:
        rule += f"; chosen on {n_sweep} sampled users, refitted on all {n}"
    for row in sweep:
        row["sweep_users"] = n_sweep
    k = choice.k
    space = proj.spark(users).persist(ROWS_CACHE)
    try:
        log.info("cluster: k=%d chosen; MLlib KMeans on all %d users (best of %d starts)", k, n, cfg.n_init)
        model = fit_best(space, k, seed, cfg)
        ml_centers = np.array([c for c in model.clusterCenters()])
        ml_cost = float(model.summary.trainingCost)
        sk_cost = inertia(space, centers[k], "pemb")
        if sk_cost < ml_cost * (1 - 1e-9):
            log.info(
                "cluster: the sweep's k-means++ centres fit all users better (inertia %.2f vs MLlib %.2f): they are the segments",
                sk_cost,
                ml_cost,
            )
            final, how = centers[k], "k-means++ centres of the sweep (lower inertia on all users than MLlib's fit)"
        else:
            log.info("cluster: MLlib's fit (inertia %.2f) is the segments (sweep centres: %.2f on all users)", ml_cost, sk_cost)
            final, how = ml_centers, "MLlib KMeans on all users"
        if proj.components is not None:
            final = lift_centers(space, final, k)
            how += ", lifted to the stored vectors (each segment's mean user vector)"
    finally:
        space.unpersist()
    return Fit(len(final), np.asarray(final), sweep, rule, choice, how, min(ml_cost, sk_cost))


@dataclass(frozen=True)
class Fit:
    k: int
    centers: np.ndarray
    sweep: list[dict[str, float]]
    rule: str
    choice: KChoice
    how: str
    inertia: float


_NEAREST = "struct<cluster_id:int,distance_to_centroid:double,confidence:double>"


def _stack(vecs: pd.Series, dim: int) -> np.ndarray:
    """An Arrow batch's array column (a Series of arrays) as an n x dim float64 matrix."""
    return np.stack(vecs.to_numpy()).astype(np.float64, copy=False) if len(vecs) else np.zeros((0, dim))


def nearest_np(X: np.ndarray, C: np.ndarray, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centre id, Euclidean distance) per row of ``X`` (squared differences summed,
    ties to the lower id), or with ``own`` the distance to each row's own centre."""
    ids, dist, _ = nearest_margin_np(X, C, own)
    return ids, dist


def nearest_margin_np(X: np.ndarray, C: np.ndarray, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``nearest_np`` with each row's confidence: the margin of its centre (the nearest, or
    ``own``) against the nearest other one (``hierarchy.margin``)."""
    ids = np.empty(len(X), np.int32)
    dist = np.empty(len(X))
    conf = np.empty(len(X))
    for s in range(0, len(X), 1024):  # n x k x d differences, 1,024 rows at a time (~50 MB at k = 50, d = 128)
        x = X[s : s + 1024]
        all_d2 = ((x[:, None, :] - C[None]) ** 2).sum(axis=2)
        j = own[s : s + 1024].astype(np.int64) if own is not None else all_d2.argmin(axis=1)
        ids[s : s + 1024] = j
        dist[s : s + 1024] = np.sqrt(all_d2[np.arange(len(j)), j])
        conf[s : s + 1024] = own_margin(all_d2, j)
    return ids, dist, conf


def _nearest_udf(centers, with_own: bool):
    """A pandas UDF over Arrow batches (numpy on each batch; the centres, k x d numbers, go with
    it). The SQL form it replaces (``transform``/``zip_with``/``aggregate`` over literal arrays,
    interpreted per element) took 233 s to place 210,526 users among 50 fine centres."""
    C = np.asarray(centers, dtype=np.float64)

    def stack(vecs: pd.Series) -> np.ndarray:
        return _stack(vecs, C.shape[1])

    if with_own:

        @F.pandas_udf("double")  # type: ignore[call-overload]
        def own_distance(vecs: pd.Series, cluster_id: pd.Series) -> pd.Series:
            return pd.Series(nearest_np(stack(vecs), C, cluster_id.to_numpy())[1])

        return own_distance

    @F.pandas_udf(_NEAREST)  # type: ignore[call-overload]
    def nearest(vecs: pd.Series) -> pd.DataFrame:
        ids, dist, conf = nearest_margin_np(stack(vecs), C)
        return pd.DataFrame({"cluster_id": ids, "distance_to_centroid": dist, "confidence": conf})

    return nearest


def assign_nearest(users: DataFrame, centers, vec_col: str = "emb", confidence: bool = False) -> DataFrame:
    """``cluster_id`` (the nearest centre, squared Euclidean; ties to the lower id) and the
    Euclidean ``distance_to_centroid`` of each row's ``vec_col`` array; with ``confidence``,
    the margin of that centre over the nearest other one too (``hierarchy.margin``)."""
    out = (
        users.withColumn("_near", _nearest_udf(centers, with_own=False)(vec_col))
        .withColumn("cluster_id", F.col("_near.cluster_id"))
        .withColumn("distance_to_centroid", F.col("_near.distance_to_centroid"))
    )
    if confidence:
        out = out.withColumn("confidence", F.col("_near.confidence"))
    return out.drop("_near")


def distance_to_own(users: DataFrame, centers, vec_col: str = "emb") -> DataFrame:
    """The Euclidean ``distance_to_centroid`` of each row's ``vec_col`` to the centre of its
    own ``cluster_id`` (refined segments are not always the nearest centre)."""
    return users.withColumn("distance_to_centroid", _nearest_udf(centers, with_own=True)(vec_col, F.col("cluster_id")))


def member_means(assigned: DataFrame, centers, vec_col: str = "emb") -> list[list[float]]:
    """Each segment's mean ``vec_col`` over the rows of ``assigned`` (``cluster_id``); a segment
    with no row keeps its centre from ``centers`` (one aggregation, k x dim numbers)."""
    rows = (
        assigned.select("cluster_id", F.posexplode(vec_col).alias("pos", "v"))
        .groupBy("cluster_id", "pos")
        .agg(F.avg("v").alias("v"))
        .collect()
    )
    out = [list(map(float, c)) for c in centers]
    for r in rows:
        out[r["cluster_id"]][r["pos"]] = float(r["v"])
    return out


def inertia(users: DataFrame, centers, vec_col: str = "emb") -> float:
    """Sum of squared distances of ``users`` to their nearest centre (one Spark job)."""
    row = one_row(assign_nearest(users.select(vec_col), centers, vec_col).agg(F.sum(F.col("distance_to_centroid") ** 2)))
    return float(row[0] or 0.0)


def coarse(clusters: DataFrame) -> DataFrame:
    """The top-level (coarse) rows of a ``clusters`` or ``cluster_profiles`` table; rows written
    before granularities existed have none and are top level."""
    if "granularity" not in clusters.columns:
        return clusters
    return clusters.where(F.col("granularity").isNull() | (F.col("granularity") == "coarse"))


LEVELS = ("top", "leaf")


def leaf_rows(rows: DataFrame) -> DataFrame | None:
    """The segment tree's leaf rows of a ``clusters`` or ``cluster_profiles`` table (in
    ``clusters``, every user once, in their deepest segment); None for a table written before
    the tree existed."""
    if "granularity" not in rows.columns or "segment_path" not in rows.columns:
        return None
    return rows.where(F.col("granularity") == "leaf")


def at_level(rows: DataFrame, level: str) -> DataFrame:
    """The rows of a ``clusters`` or ``cluster_profiles`` table at ``level``: ``top`` (the
    coarse rows) or ``leaf`` (the segment tree's leaves; a run written before the tree existed
    has none, and its top level is its leaves)."""
    if level not in LEVELS:
        raise ConfigError(f"--level: {level!r} is not one of {', '.join(LEVELS)}")
    leaves = leaf_rows(rows) if level == "leaf" else None
    return coarse(rows) if leaves is None else leaves


def fine_centers(users: DataFrame, n: int, k: int, seed: int, cfg: ClusterConfig) -> list[list[float]] | None:
    """Fine segments for recommendation fill: MLlib KMeans at ``cfg.fine_k`` on the same user
    vectors (at most one segment per ``fine_min_users`` users; none when that is not finer than
    the personas' k), fitted on a seeded hash sample of about ``fine_fit_users`` users."""
    if cfg.fine_k is None:
        return None
    fk = min(cfg.fine_k, n // cfg.fine_min_users)
    if fk <= k:
        log.info("cluster: no fine segments (%d users allow at most %d, not more than k=%d)", n, fk, k)
        return None
    fit_on = user_sample(n, cfg.fine_fit_users, seed)(users, "entity_id")
    model = fit_kmeans(fit_on, fk, seed, cfg)
    sampled = (
        f", fitted on a sample of about {cfg.fine_fit_users} users" if cfg.fine_fit_users is not None and n > cfg.fine_fit_users else ""
    )
    log.info("cluster: %d fine segments (MLlib KMeans, cluster.fine_k%s) for recommendation fill", fk, sampled)
    return [[float(v) for v in c] for c in model.clusterCenters()]


@dataclass(frozen=True)
class ClusterResult:
    k: int
    users: int
    sweep: list[dict[str, float]]
    rule: str = ""
    uncertain: bool = False
    runner_up: int | None = None


def model_run_centers(spark: SparkSession, ctx: RunContext, run_id: str, method: str = "encoder") -> list[list[float]]:
    """The segment centres of an earlier run (its ``centroids`` rows of ``method``: ``encoder``
    for the personas, ``fine`` for the fine segments), for assigning without refit."""
    validate_run_id(run_id)
    rows = []
    if ctx.store.exists(ctx.tables.centroids):
        rows = ctx.store.read(spark, ctx.tables.centroids, run_id).where(F.col("method") == method).orderBy("cluster_id").collect()
    if not rows and method != "encoder":
        return []
    if not rows:
        raise InputError(f"cluster.model_run: run {run_id} has no segments (no centroids rows under {ctx.store.root})")
    return [list(r["centroid"]) for r in rows]


def _token_lists(
    spark: SparkSession, ctx: RunContext, cfg: ClusterConfig, artifact: Any, counts: DataFrame | None = None
) -> tuple[DataFrame, tuple[str, ...]] | None:
    """Each user's behaviour-token counts (``refine.token_lists``) when ``cluster.refine`` is on
    and the run's encoder artifact carries a token model; None (and why, in the log) otherwise."""
    if cfg.refine == "none":
        return None
    tm = getattr(artifact, "token_model", None)
    if tm is None:
        log.info("cluster: segments not refined (the representation has no behaviour tokens: embed.representation encoder)")
        return None
    from seqclust.represent import behaviour

    if counts is None:
        sessions = ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).where("is_modelled")
        counts = behaviour.token_counts(sessions, artifact.vocab, tm.interest)
    lists = refine.token_lists(counts, tm.tokens)
    return lists.persist(ROWS_CACHE), tm.tokens


def run(
    spark: SparkSession,
    ctx: RunContext,
    cfg: ClusterConfig,
    seed: int,
    artifact: Any = None,
    counts: DataFrame | None = None,
    history: HistoryFn | None = None,
) -> ClusterResult:
    """Cluster this run's user vectors; write ``clusters``, ``centroids`` and the k sweep.
    With ``artifact`` (the run's encoder artifact) and ``cluster.refine: tokens``, the k-means
    segments are refined by the likelihood of the users' behaviour tokens (``seqclust.segment.refine``).
    Each segment is then tested for sub-segments (``seqclust.segment.hierarchy``); ``history``
    makes user vectors from a subset of their sessions (``embed.history_vectors``), for the
    split test's persistence across the halves of users' histories."""
    stored = ctx.store.read(spark, ctx.tables.embeddings, ctx.run_id).where(F.col("entity_type") == "user")
    n = stored.count()
    users = (
        stored.select("entity_id", F.col("embedding").alias("emb"), "n_sessions")
        .withColumn("features", array_to_vector(F.col("emb")))
        # rows in a fixed partition and order: KMeans' seeded k-means|| sampling and the
        # stability subsamples then pick the same users on any cluster layout
        .repartition(user_partitions(n, cfg), "entity_id")
        .sortWithinPartitions("entity_id")
        .persist(ROWS_CACHE)
    )
    lists = None
    try:
        if n == 0:
            raise InputError("no user vectors to cluster (did the embed stage run?)")
        lists = _token_lists(spark, ctx, cfg, artifact, counts)
        if cfg.model_run:
            centers = model_run_centers(spark, ctx, cfg.model_run)
            dim = len(one_row(stored.select("embedding"))["embedding"])
            if len(centers[0]) != dim:
                raise InputError(
                    f"cluster.model_run: run {cfg.model_run}'s segments have {len(centers[0])} dimensions, these user vectors {dim} "
                    "(another embed.representation?)"
                )
            rule = f"assigned to the segments of run {cfg.model_run} (no refit)"
            log.info("cluster: assigning %d users to the %d segments of run %s", n, len(centers), cfg.model_run)
            fine = model_run_centers(spark, ctx, cfg.model_run, "fine") or None
            stored_tokens = model_run_centers(spark, ctx, cfg.model_run, "tokens") if lists is not None else []
            model_segs = refine.TokenSegments.from_rows(stored_tokens) if stored_tokens else None
            if lists is not None and model_segs is None:
                log.info("cluster: run %s has no token segments (not refined): users go to the nearest centre", cfg.model_run)
                lists = None
            return _finish(
                spark, ctx, users, centers, n, [], rule, cfg, seed, fine=fine, lists=lists, model_segs=model_segs, history=history
            )
        ks = [cfg.k] if cfg.k is not None else list(range(cfg.k_min, min(cfg.k_max, n - 1) + 1))
        if cfg.k is not None and cfg.k >= n:
            raise ConfigError(f"cluster.k: {cfg.k} is not below the number of users ({n})")
        if not ks:
            raise InputError(f"only {n} users: too few to cluster (need at least {cfg.k_min + 1})")
        fit_users, n_fit, who = fit_population(users, n, ks, cfg)
        fit = sweep_and_fit(fit_users, n_fit, ks, seed, cfg)
        rule = fit.rule + f"; segments: {fit.how}" + (f"; {who}" if who else "")
        return _finish(spark, ctx, users, fit.centers, n, fit.sweep, rule, cfg, seed, fit.choice, lists=lists, history=history)
    finally:
        users.unpersist()
        if lists is not None:
            lists[0].unpersist()


def _refined(
    users: DataFrame,
    centers: list[list[float]],
    n: int,
    lists: tuple[DataFrame, tuple[str, ...]],
    model_segs: refine.TokenSegments | None,
    cfg: ClusterConfig,
) -> tuple[DataFrame, list[list[float]], refine.TokenSegments, str]:
    """(labels, centres, token segments, note for the rule): the nearest-centre segments refined
    by token likelihood (``seqclust.segment.refine``), or with ``model_segs`` (assign) the model run's
    token segments applied without refit. Refitted centres are the segments' mean vectors."""
    token_df, tokens = lists
    k = len(centers)
    labels0 = assign_nearest(users.select("entity_id", "emb"), centers).select("entity_id", "cluster_id")
    if model_segs is not None:
        if model_segs.logp.shape[1] != len(tokens) or model_segs.k != k:
            raise InputError(
                f"cluster.model_run: run {cfg.model_run}'s token segments ({model_segs.k} x {model_segs.logp.shape[1]}) do not "
                f"fit this encoder's {len(tokens)} behaviour tokens and {k} segments"
            )
        return refine.assign(refine.with_tokens(labels0, token_df), model_segs), centers, model_segs, "; by token likelihood"
    r = refine.refine(labels0, token_df, k, tokens, cfg.refine_alpha, cfg.refine_max_iter, cfg.refine_tol)
    centers = member_means(users.join(r.labels, "entity_id"), centers)
    note = f"; refined by the likelihood of users' behaviour tokens ({r.moved} of {n} users moved, {r.passes} passes)"
    return r.labels, centers, r.segments, note


def _write_sweep(spark: SparkSession, ctx: RunContext, sweep: list, k: int, rule: str, choice: KChoice | None) -> None:
    """The k sweep as ``metrics`` rows (family ``sweep``), the chosen k and the rule in details."""
    details = {"rule": rule, "uncertain": bool(choice and choice.uncertain), "runner_up": choice.runner_up if choice else None}
    sweep_rows = [
        tables.MetricRow(
            method="encoder",
            family="sweep",
            metric=m,
            value=r[m],
            k=r["k"],
            ci_low=r.get(f"{m}_low"),
            ci_high=r.get(f"{m}_high"),
            details={**details, "chosen": r["k"] == k, "users": r.get("sweep_users")},
        )
        for r in sweep
        for m in ("silhouette", "inertia", "stability")
        if m in r
    ]
    write_metrics(spark, ctx, sweep_rows, families=("sweep",))


def _finish(
    spark: SparkSession,
    ctx: RunContext,
    users: DataFrame,
    centers,
    n: int,
    sweep: list,
    rule: str,
    cfg: ClusterConfig,
    seed: int,
    choice: KChoice | None = None,
    fine: list[list[float]] | None = None,
    lists: tuple[DataFrame, tuple[str, ...]] | None = None,
    model_segs: refine.TokenSegments | None = None,
    history: HistoryFn | None = None,
) -> ClusterResult:
    """Write clusters (nearest centre, or refined: see ``seqclust.segment.refine``), the segment
    tree's leaves (``seqclust.segment.hierarchy``), centroids, profiles and the sweep for
    ``centers``; with ``cluster.fine_k``, the fine segments too (``granularity = 'fine'`` in
    ``clusters``, method ``fine`` in ``centroids``)."""
    centers = [[float(v) for v in c] for c in centers]
    k = len(centers)
    if fine is None and not cfg.model_run:
        fine = fine_centers(users, n, k, seed, cfg)
    labels, token_segs = None, None
    if lists is not None:
        labels, centers, token_segs, note = _refined(users, centers, n, lists, model_segs, cfg)
        rule += note
    if labels is None:
        top = assign_nearest(users, centers).select("entity_id", "cluster_id", "distance_to_centroid")
    else:
        top = distance_to_own(users.join(labels, "entity_id"), centers).select("entity_id", "cluster_id", "distance_to_centroid")
    top = top.persist(ROWS_CACHE)
    try:
        if cfg.model_run:
            tree = model_run_tree(spark, ctx, cfg.model_run) or Tree.flat(np.asarray(centers))
        else:
            tree = grow_tree(spark, ctx, users, top, np.asarray(centers), n, cfg, seed, history)
        sizes, fine_sizes, leaf_sizes = _write_clusters(spark, ctx, users, top, tree, fine, cfg.min_confidence)
    finally:
        if labels is not None:
            labels.unpersist()  # the refined labels, cached by refine.refine for its count and the writes
        top.unpersist()
    nodes = node_sizes(tree, leaf_sizes)
    cent_rows: list[tuple[int, str, list[float], int, str | None]] = [
        (i, "encoder", [float(v) for v in c], int(sizes.get(i, 0)), str(i)) for i, c in enumerate(centers)
    ]
    cent_rows += [(i, "fine", [float(v) for v in c], int(fine_sizes.get(i, 0)), None) for i, c in enumerate(fine or [])]
    if token_segs is not None:
        cent_rows += [(*r, str(r[0])) for r in token_segs.rows(np.array([sizes.get(i, 0) for i in range(k)]))]
    cent_rows += tree_rows(tree, nodes)
    ctx.write(spark.createDataFrame(cent_rows, tables.CENTROIDS), "centroids")
    _write_profiles(spark, ctx, tree, n, seed, cfg, {i: int(sizes.get(i, 0)) for i in range(k)}, leaf_sizes, nodes)
    _write_sweep(spark, ctx, sweep, k, rule, choice)
    _write_tree_metrics(spark, ctx, tree)
    leaves = len(tree.leaf_nodes)
    log.info("cluster: k=%d for %d users (%s)%s", k, n, rule, f"; {leaves} leaf segments in the tree" if leaves != k else "")
    return ClusterResult(k, n, sweep, rule, bool(choice and choice.uncertain), choice.runner_up if choice else None)


def _write_clusters(
    spark: SparkSession,
    ctx: RunContext,
    users: DataFrame,
    top: DataFrame,
    tree: Tree,
    fine: list[list[float]] | None,
    min_confidence: float,
) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """The ``clusters`` rows: every user once at the top level (coarse), once at their leaf of
    the tree, and (with fine segments) once at their fine segment. Returns the users per
    segment of each: (top, fine, leaf)."""
    placed = place(users.select("entity_id", "emb").join(top, "entity_id"), tree)
    base: list[Column | str] = [F.lit("user").alias("entity_type"), "entity_id"]

    def level(cluster_id: str, distance: str, granularity: str, path: Column, confidence: str) -> Column:
        return F.struct(
            F.col(cluster_id).cast("int").alias("cluster_id"),
            F.col(distance).alias("distance_to_centroid"),
            F.lit(granularity).alias("granularity"),
            path.alias("segment_path"),
            F.col(confidence).alias("confidence"),
        )

    # both rows of a user from one pass over the placed users (the descent runs once)
    clusters = placed.select(
        *base,
        F.inline(
            F.array(
                level("cluster_id", "distance_to_centroid", "coarse", F.col("cluster_id").cast("string"), "top_confidence"),
                level("leaf_id", "leaf_distance", "leaf", F.col("segment_path"), "leaf_confidence"),
            )
        ),
    )
    if fine is not None:
        clusters = clusters.unionByName(
            assign_nearest(users, fine, confidence=True).select(
                *base,
                F.col("cluster_id").cast("int").alias("cluster_id"),
                "distance_to_centroid",
                F.lit("fine").alias("granularity"),
                F.lit(None).cast("string").alias("segment_path"),
                "confidence",
            )
        )
    ctx.write(clusters, "clusters")
    counts = (
        ctx.store.read(spark, ctx.tables.clusters, ctx.run_id)
        .groupBy("granularity", "cluster_id")
        .agg(
            F.count("*").alias("count"),
            F.sum((F.col("confidence") >= min_confidence).cast("long")).alias("confident"),
            F.sum("confidence").alias("confidence"),
        )
        .collect()
    )
    _write_confidence_metrics(spark, ctx, counts, min_confidence)
    by = {g: {r["cluster_id"]: r["count"] for r in counts if r["granularity"] == g} for g in ("coarse", "fine", "leaf")}
    return by["coarse"], by["fine"], by["leaf"]


def _write_confidence_metrics(spark: SparkSession, ctx: RunContext, counts: list, min_confidence: float) -> None:
    """Family ``confidence`` per level (method ``encoder`` for the top level, ``leaf``, ``fine``):
    ``confident_share`` (users whose ``clusters.confidence`` is at least ``min_confidence``)
    and ``mean_confidence``, overall and per segment (``details.segment``)."""
    method = {"coarse": "encoder", "leaf": "leaf", "fine": "fine"}
    rows = []
    for g, m in method.items():
        mine = [r for r in counts if r["granularity"] == g]
        n = sum(r["count"] for r in mine)
        if not n:
            continue
        k = len(mine)
        base = {"threshold": min_confidence, "users": n}
        rows += [
            tables.MetricRow(m, "confidence", "confident_share", sum(r["confident"] or 0 for r in mine) / n, k=k, details=base),
            tables.MetricRow(m, "confidence", "mean_confidence", sum(r["confidence"] or 0.0 for r in mine) / n, k=k, details=base),
        ]
        if g != "fine":
            rows += [
                tables.MetricRow(
                    m,
                    "confidence",
                    "confident_share",
                    (r["confident"] or 0) / r["count"],
                    k=k,
                    details={**base, "users": r["count"], "segment": int(r["cluster_id"])},
                )
                for r in sorted(mine, key=lambda r: r["cluster_id"])
            ]
    write_metrics(spark, ctx, rows, families=("confidence",))


def _write_profiles(
    spark: SparkSession,
    ctx: RunContext,
    tree: Tree,
    n: int,
    seed: int,
    cfg: ClusterConfig,
    sizes: dict[int, int],
    leaf_sizes: dict[int, int],
    node_n: dict[str, int],
) -> None:
    """``cluster_profiles`` of the top level (granularity ``coarse``) and of every node below it
    (``leaf``, or ``node`` for a segment split further), from a hash sample of users' sessions."""
    sessions = ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).where("is_modelled")
    stored = ctx.store.read(spark, ctx.tables.clusters, ctx.run_id)
    keep = user_sample(n, cfg.profile_sample, seed)
    sessions = keep(sessions, "user_id")
    if cfg.profile_sample is not None and n > cfg.profile_sample:
        log.info(
            "cluster: profiles from a hash sample of about %d of %d users (cluster.profile_sample); sizes exact", cfg.profile_sample, n
        )

    def assigned(df: DataFrame) -> DataFrame:
        df = keep(df, "entity_id")
        # at most about profile_sample users: a broadcast, no shuffle of sessions
        return F.broadcast(df) if cfg.profile_sample is not None else df

    top = assigned(coarse(stored).select("entity_id", "cluster_id"))
    profiles = cluster_profiles(spark, sessions, top, sizes=sizes)
    leaf_ids = tree.leaf_id
    if tree.is_flat:  # every top segment is its own leaf: the same figures, ids and paths
        profiles = profiles.unionByName(profiles.withColumn("granularity", F.lit("leaf")))
    else:
        leaves = assigned(stored.where(F.col("granularity") == "leaf").select("entity_id", "cluster_id", "segment_path"))
        paths = {int(leaf_ids[i]): tree.paths[i] for i in tree.leaf_nodes}
        profiles = profiles.unionByName(cluster_profiles(spark, sessions, leaves, sizes=leaf_sizes, granularity="leaf", paths=paths))
        inner = [i for i in range(len(tree.paths)) if tree.parent[i] >= 0 and leaf_ids[i] < 0]
        for depth in sorted({tree.paths[i].count(".") + 1 for i in inner}):
            at = {tree.paths[i]: i for i in inner if tree.paths[i].count(".") + 1 == depth}
            prefix = F.array_join(F.slice(F.split("segment_path", r"\."), 1, depth), ".")
            lookup = F.create_map(*[x for p, i in at.items() for x in (F.lit(p), F.lit(i))])
            nodes = leaves.withColumn("cluster_id", F.element_at(lookup, prefix)).where(F.col("cluster_id").isNotNull())
            profiles = profiles.unionByName(
                cluster_profiles(
                    spark,
                    sessions,
                    nodes,
                    sizes={i: node_n[p] for p, i in at.items()},
                    granularity="node",
                    paths={i: p for p, i in at.items()},
                )
            )
    ctx.write(profiles, "cluster_profiles")
    for p in ctx.store.read(spark, ctx.tables.cluster_profiles, ctx.run_id).orderBy("granularity", "cluster_id").collect():
        if p["granularity"] in (None, "coarse") or not tree.is_flat and p["granularity"] == "leaf":
            log.info("cluster %s%s: %s", p["segment_path"], " (leaf)" if p["granularity"] == "leaf" else "", p["description"])


def _write_tree_metrics(spark: SparkSession, ctx: RunContext, tree: Tree) -> None:
    """Every split test of the tree as ``metrics`` rows (family ``hierarchy``, method ``leaf``):
    the sub-k tested, the silhouette and the null's, the gap, the stability and the persistence
    across the halves of users' histories, and whether the segment split (1) or not (0)."""
    rows = []
    for t in tree.tests:
        details = {"segment_path": t.path, "users": t.users, "reason": t.reason, "temporal_users": t.temporal_users}
        figures = {
            "split": 1.0 if t.split else 0.0,
            "split_silhouette": t.silhouette,
            "split_null_silhouette": t.null_silhouette,
            "split_gap": t.gap,
            "split_stability": t.stability,
            "split_temporal_ari": float("nan") if t.temporal_ari is None else t.temporal_ari,
        }
        rows += [
            tables.MetricRow(method="leaf", family="hierarchy", metric=m, value=float(v), k=t.k, details=details)
            for m, v in figures.items()
        ]
    write_metrics(spark, ctx, rows, families=("hierarchy",))


def model_run_tree(spark: SparkSession, ctx: RunContext, run_id: str) -> Tree | None:
    """The segment tree of an earlier run (its ``centroids`` rows of method ``tree``), or None
    for a run written before trees existed."""
    if not ctx.store.exists(ctx.tables.centroids):
        return None
    c = ctx.store.read(spark, ctx.tables.centroids, run_id)
    if "segment_path" not in c.columns:
        return None
    rows = c.where(F.col("method") == "tree").select("segment_path", "centroid").collect()
    return Tree.from_rows([(r["segment_path"], list(r["centroid"])) for r in rows]) if rows else None
