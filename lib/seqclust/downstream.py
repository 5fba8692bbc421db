"""Downstream usefulness: do the segments help predict what a user does next?

Time split per user: each user's last modelled session is the *target*; the earlier ones are
the *history*. A user's segment is computed from history only (history session vectors,
mean-pooled and L2-normalised, assigned to the nearest centroid of the run's KMeans), and
every popularity list is counted on history sessions only. Each strategy ranks N
categories (or items) for the user; the target session's distinct values are the relevant
set. Exact HitRate@N and NDCG@N (binary relevance, no sampled negatives), averaged over
users, with percentile bootstrap CIs (users resampled in 1024 hash buckets, see ``bootstrap_means``).
The segment baselines are the random segmentation (same sizes) and the bag-of-events
clustering refitted on history only.

Strategies:
    global            the N most frequent values in all history
    cluster           the N most frequent in the history of the user's segment
    own               the user's own history, most frequent first (may be shorter than N)
    own_cluster_fill  own, filled up to N from the segment's list
    own_global_fill   own, filled up to N from the global list

``own_cluster_fill`` vs ``own_global_fill`` is the honest question: once a user has
history, does the segment add anything?
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from seqclust.metrics import hash_uniform

log = logging.getLogger(__name__)

STRATEGIES = ("global", "cluster", "own", "own_cluster_fill", "own_global_fill")


def split_history(sessions: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(history sessions, target sessions): the target is each user's last session by start
    (ties by id); only users with at least one history session are kept."""
    w = Window.partitionBy("user_id").orderBy(F.desc("start_ts"), F.desc("session_id"))
    ranked = sessions.withColumn("_r", F.row_number().over(w)).withColumn("_n", F.count("*").over(Window.partitionBy("user_id")))
    ranked = ranked.where(F.col("_n") >= 2)
    return ranked.where(F.col("_r") > 1).drop("_r", "_n"), ranked.where(F.col("_r") == 1).drop("_r", "_n")


def nearest_centroid(users: DataFrame, centroids: Sequence[Sequence[float]], vec_col: str = "embedding") -> DataFrame:
    """Add ``cluster_id``: the nearest centroid (squared Euclidean) to ``vec_col`` (array)."""
    c = F.array(*[F.array(*[F.lit(float(v)) for v in cen]) for cen in centroids])
    dists = F.transform(
        c, lambda cen: F.aggregate(F.zip_with(cen, F.col(vec_col), lambda a, b: (a - b) * (a - b)), F.lit(0.0), lambda s, x: s + x)
    )
    return users.withColumn("_d", dists).withColumn("cluster_id", F.array_position("_d", F.array_min("_d")).cast("int") - 1).drop("_d")


def _top(counts: DataFrame, group: list[str], n: int) -> DataFrame:
    """Per group, the ``n`` most frequent values (ties by value) as an ordered array ``recs``."""
    w = Window.partitionBy(*group).orderBy(F.desc("cnt"), "x")
    ranked = counts.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= n)
    return (
        ranked.groupBy(*group)
        .agg(F.sort_array(F.collect_list(F.struct("_r", "x"))).alias("_s"))
        .select(*group, F.transform("_s", lambda s: s["x"]).alias("recs"))
    )


def hit_and_ndcg(recs: F.Column, target: F.Column, n: int) -> tuple[F.Column, F.Column]:
    """HitRate@n and NDCG@n of a ranked array against a set (array) of relevant values."""
    top = F.slice(recs, 1, n)
    gains = F.transform(top, lambda x, i: F.when(F.array_contains(target, x), 1.0 / F.log2(i + 2.0)).otherwise(0.0))
    dcg = F.aggregate(gains, F.lit(0.0), lambda s, x: s + x)
    ideal = F.least(F.size(target), F.lit(n))
    idcg_table = F.array(*[F.lit(sum(1.0 / math.log2(i + 2) for i in range(m))) for m in range(n + 1)])
    idcg = F.element_at(idcg_table, ideal + 1)
    hit = (F.size(F.array_intersect(top, target)) > 0).cast("double")
    return hit, F.when(idcg > 0, dcg / idcg).otherwise(0.0)


@dataclass
class FieldLists:
    """What the strategies of one field share whatever the segmentation: the history values
    ``ev`` (user_id, x), the ``glob`` list, each user's ``own`` list and the ``target`` sets."""

    ev: DataFrame
    glob: list[str]
    own: DataFrame
    target: DataFrame

    def unpersist(self) -> None:
        for df in (self.ev, self.own, self.target):
            df.unpersist()


def field_lists(
    history: DataFrame, target: DataFrame, field: str, n: int, users: DataFrame | None = None, persist: bool = False
) -> FieldLists:
    """The method-independent lists of ``field`` (computed once, shared by every method's
    scores); ``users`` (user_id) restricts them to the scored users; ``persist`` caches them."""
    ev = history.select("user_id", F.explode(field).alias("x")).where(F.col("x").isNotNull() & (F.col("x") != ""))
    if users is not None:
        ev = ev.join(users.select("user_id"), "user_id")
    if persist:
        ev = ev.persist(StorageLevel.MEMORY_AND_DISK)
    glob = [r["x"] for r in ev.groupBy("x").agg(F.count("*").alias("cnt")).orderBy(F.desc("cnt"), "x").limit(n).collect()]
    own = _top(ev.groupBy("user_id", "x").agg(F.count("*").alias("cnt")), ["user_id"], n).withColumnRenamed("recs", "own_recs")
    tgt = target.select("user_id", F.array_distinct(F.filter(field, lambda x: x.isNotNull() & (x != ""))).alias("target")).where(
        F.size("target") > 0
    )
    if persist:
        own, tgt = own.persist(StorageLevel.MEMORY_AND_DISK), tgt.persist(StorageLevel.MEMORY_AND_DISK)
    return FieldLists(ev, glob, own, tgt)


def user_scores(
    history: DataFrame, target: DataFrame, assignment: DataFrame, field: str, n: int, lists: FieldLists | None = None
) -> DataFrame:
    """One row per scored user: ``hit_<strategy>`` and ``ndcg_<strategy>`` for STRATEGIES.

    Args:
        history, target: sessions (``user_id`` and the array column ``field``).
        assignment: ``(user_id, cluster_id)`` from history only.
        lists: ``field_lists`` of the same history, target and users (else computed here).
    """
    lists = lists or field_lists(history, target, field, n, users=assignment)
    ev = lists.ev.join(assignment, "user_id")
    clus = _top(ev.groupBy("cluster_id", "x").agg(F.count("*").alias("cnt")), ["cluster_id"], n).withColumnRenamed("recs", "cluster_recs")
    glob = lists.glob
    g = F.array(*[F.lit(x) for x in glob]) if glob else F.array().cast("array<string>")
    df = lists.target.join(assignment, "user_id").join(F.broadcast(clus), "cluster_id", "left").join(lists.own, "user_id", "left")
    empty = F.array().cast("array<string>")
    recs = {
        "global": g,
        "cluster": F.coalesce("cluster_recs", empty),
        "own": F.coalesce("own_recs", empty),
        "own_cluster_fill": F.slice(F.array_distinct(F.concat(F.coalesce("own_recs", empty), F.coalesce("cluster_recs", empty))), 1, n),
        "own_global_fill": F.slice(F.array_distinct(F.concat(F.coalesce("own_recs", empty), g)), 1, n),
    }
    cols = []
    for name, r in recs.items():
        hit, ndcg = hit_and_ndcg(r, F.col("target"), n)
        cols += [hit.alias(f"hit_{name}"), ndcg.alias(f"ndcg_{name}")]
    return df.select("user_id", *cols)


@dataclass(frozen=True)
class Score:
    value: float
    low: float
    high: float


BOOTSTRAP_BUCKETS = 1024


def bootstrap_means(
    scores: DataFrame, columns: Sequence[str], seed: int, replicates: int = 200, key: str = "user_id", buckets: int = BOOTSTRAP_BUCKETS
) -> tuple[dict[str, Score], int]:
    """Mean of each column over users with a 95% percentile bootstrap interval, and the number
    of users: ``({column: Score}, n)`` from one Spark job (the means are the bucket sums over
    the bucket counts, exactly the mean over rows).

    Users are spread over ``buckets`` groups by a seeded hash of ``key``; Spark reduces each
    group to its count and sums (one pass, at most ``buckets`` rows reach the driver), and the
    replicates resample the groups with Poisson(1) weights in numpy. Random groups of users are
    exchangeable, so this is the users' bootstrap of the mean (exactly so when there are fewer
    users than buckets, the variance estimate within ~sqrt(2/buckets) otherwise) without a
    users x replicates cross join. Same result on any partitioning.
    """
    groups = (
        scores.withColumn("_g", (hash_uniform(key, seed=seed) * buckets).cast("int"))
        .groupBy("_g")
        .agg(F.count("*").alias("_n"), *[F.sum(c).alias(c) for c in columns])
        .orderBy("_g")
        .collect()
    )
    n = np.array([r["_n"] for r in groups], dtype=np.float64)
    total = float(n.sum())
    w = np.random.default_rng(seed).poisson(1.0, size=(replicates, len(groups))).astype(np.float64)
    wn = w @ n
    ok = wn > 0
    out = {}
    for c in columns:
        sums = np.array([r[c] or 0.0 for r in groups], dtype=np.float64)
        vals = (w @ sums)[ok] / wn[ok]
        lo, hi = np.percentile(vals, [2.5, 97.5]) if len(vals) else (float("nan"), float("nan"))
        mean = float(sums.sum() / total) if total else float("nan")
        out[c] = Score(mean, float(lo), float(hi))
    return out, int(total)


def evaluate_downstream(
    sessions: DataFrame,
    history_vectors: Callable[[DataFrame], DataFrame],
    centroids: Sequence[Sequence[float]],
    random_shares: Sequence[float],
    seed: int,
    n: int = 10,
    fields: Sequence[str] = ("categories", "items"),
    replicates: int = 200,
    baseline_assign: Callable[[DataFrame], DataFrame] | None = None,
) -> list[dict]:
    """Metric rows (family ``downstream``) for the encoder's segments and the random baseline.

    Args:
        sessions: modelled sessions (session_id, user_id, start_ts, and the ``fields`` arrays).
        history_vectors: history sessions -> ``(entity_id, embedding)``, each user's vector from
            their history alone, made the way the run made its user vectors.
        centroids: the run's KMeans centres (on L2-normalised vectors).
        random_shares: cluster size shares of the random baseline (the encoder's).
        baseline_assign: history sessions -> ``(user_id, cluster_id)`` of the bag-of-events
            baseline fitted on history only (its rows get method ``bag_of_events``).
    """
    from seqclust.evaluate import random_assignment

    history, target = split_history(sessions)
    history = history.persist(StorageLevel.MEMORY_AND_DISK)
    rows: list[dict] = []
    try:
        users = history_vectors(history).withColumnRenamed("entity_id", "user_id")
        enc = nearest_centroid(users, centroids).select("user_id", "cluster_id").persist(StorageLevel.MEMORY_AND_DISK)
        n_users = enc.count()
        if n_users == 0:
            log.warning("downstream: no user has two sessions; skipped")
            return []
        rnd = random_assignment(enc.select("user_id"), random_shares, seed, out_col="cluster_id", key="user_id")
        methods = [("encoder", enc), ("random", rnd)]
        log.info("downstream: %d users with history assigned to the encoder's segments", n_users)
        if baseline_assign is not None:
            boe = baseline_assign(history).persist(StorageLevel.MEMORY_AND_DISK)
            methods.append(("bag_of_events", boe))
            log.info("downstream: bag-of-events baseline refitted on history")
        for field in fields:
            nonempty = history.where(F.exists(field, lambda x: x.isNotNull() & (x != ""))).limit(1).count()
            if not nonempty:
                continue
            what = "categories" if field == "categories" else "items"
            lists = field_lists(history, target, field, n, users=enc, persist=True)
            for method, assign in methods:
                scores = user_scores(history, target, assign, field, n, lists=lists)
                cols = [f"{m}_{s}" for s in STRATEGIES for m in ("hit", "ndcg")]
                res, n_scored = bootstrap_means(scores, cols, seed, replicates)
                for c, sc in res.items():
                    m, strat = c.split("_", 1)
                    rows.append(
                        {
                            "method": method,
                            "family": "downstream",
                            "metric": f"{'hitrate' if m == 'hit' else 'ndcg'}@{n}_{what}_{strat}",
                            "value": sc.value,
                            "ci_low": sc.low,
                            "ci_high": sc.high,
                            "details": (
                                f'{{"target": "next session {what}", "users": {n_scored}, "strategy": "{strat}", '
                                f'"history_only": true, "bootstrap": {replicates}}}'
                            ),
                        }
                    )
                log.info(
                    "downstream (%s, %s, %d users): hitrate@%d global %.3f, cluster %.3f, own %.3f, own+cluster %.3f, own+global %.3f",
                    what,
                    method,
                    n_scored,
                    n,
                    res["hit_global"].value,
                    res["hit_cluster"].value,
                    res["hit_own"].value,
                    res["hit_own_cluster_fill"].value,
                    res["hit_own_global_fill"].value,
                )
            lists.unpersist()
        for _, a in methods:
            a.unpersist()
    finally:
        history.unpersist()
    return rows
