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
    own_cluster_fill  own, filled up to N from the segment's list (2N long, so the fill still
                      reaches N once the user's own values are removed)
    own_global_fill   own, filled up to N from the global list (2N long, likewise)

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

from seqclust.core.sampling import hash_uniform
from seqclust.core.tables import MetricRow
from seqclust.evaluate.baseline import random_assignment
from seqclust.evaluate.metrics import external_scores
from seqclust.runtime.store import one_row
from seqclust.segment.cluster import assign_nearest
from seqclust.segment.hierarchy import Tree
from seqclust.segment.leaves import place

log = logging.getLogger(__name__)

STRATEGIES = ("global", "cluster", "own", "own_cluster_fill", "own_global_fill")
MIN_OUTCOME_USERS = 20  # return within N days is measured only with this many users on each side


def split_history(sessions: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(history sessions, target sessions): the target is each user's last session by start
    (ties by id); only users with at least one history session are kept."""
    w = Window.partitionBy("user_id").orderBy(F.desc("start_ts"), F.desc("session_id"))
    ranked = sessions.withColumn("_r", F.row_number().over(w)).withColumn("_n", F.count("*").over(Window.partitionBy("user_id")))
    ranked = ranked.where(F.col("_n") >= 2)
    return ranked.where(F.col("_r") > 1).drop("_r", "_n"), ranked.where(F.col("_r") == 1).drop("_r", "_n")


def nearest_centroid(users: DataFrame, centroids: Sequence[Sequence[float]], vec_col: str = "embedding") -> DataFrame:
    """Add ``cluster_id``: the nearest centroid (squared Euclidean) to ``vec_col`` (array); the
    cluster stage's ``assign_nearest``, without the distance."""
    return assign_nearest(users, centroids, vec_col).drop("distance_to_centroid")


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
    # 2n long: a fill list must still have n values after the user's own are removed
    glob = [r["x"] for r in ev.groupBy("x").agg(F.count("*").alias("cnt")).orderBy(F.desc("cnt"), "x").limit(2 * n).collect()]
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
    clus = _top(ev.groupBy("cluster_id", "x").agg(F.count("*").alias("cnt")), ["cluster_id"], 2 * n).withColumnRenamed(
        "recs", "cluster_recs"
    )
    glob = lists.glob
    g = F.array(*[F.lit(x) for x in glob]) if glob else F.array().cast("array<string>")
    df = lists.target.join(assignment, "user_id").join(F.broadcast(clus), "cluster_id", "left").join(lists.own, "user_id", "left")
    empty = F.array().cast("array<string>")
    recs = {
        "global": F.slice(g, 1, n),
        "cluster": F.slice(F.coalesce("cluster_recs", empty), 1, n),
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


def _auc_and_lift(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """AUC (ties count half) and lift of a per-segment ``score`` from per-segment counts of
    users whose next session converted (``pos``) or not (``neg``). Lift: the conversion rate of
    users in segments scoring above the users' mean score, over everyone's rate."""
    P, N = pos.sum(), neg.sum()
    if P <= 0 or N <= 0:
        return float("nan"), float("nan")
    auc = 0.0
    for v in np.unique(score):
        at = score == v
        auc += pos[at].sum() * (neg[score < v].sum() + 0.5 * neg[at].sum())
    auc /= P * N
    mean = (score * (pos + neg)).sum() / (P + N)
    hi = score > mean
    n_hi = (pos[hi] + neg[hi]).sum()
    lift = (pos[hi].sum() / n_hi) / (P / (P + N)) if n_hi > 0 else float("nan")
    return float(auc), float(lift)


def _segment_rate_rows(
    hist: DataFrame,
    tgt: DataFrame,
    methods: Sequence[tuple[str, DataFrame]],
    seed: int,
    replicates: int,
    prefix: str,
    details: dict,
) -> list[MetricRow]:
    """``<prefix>_auc`` and ``<prefix>_lift`` per method: each segment's score is the mean of
    ``hist.b`` (0/1 per history unit) over its users' units; each user of ``tgt`` has an
    outcome ``y`` (0/1). AUC ranks users by their segment's score (0.5 = no information); lift
    is the outcome rate of users in segments scoring above the users' mean, over everyone's.
    95% intervals from the 1024-bucket user bootstrap (only bucket x segment x outcome counts
    reach the driver)."""
    rows: list[MetricRow] = []
    for method, assign in methods:
        a = assign.select("user_id", "cluster_id")
        rate = {r["cluster_id"]: r["r"] for r in hist.join(a, "user_id").groupBy("cluster_id").agg(F.avg("b").alias("r")).collect()}
        counts = (
            tgt.join(a, "user_id")
            .withColumn("_g", (hash_uniform("user_id", seed=seed) * BOOTSTRAP_BUCKETS).cast("int"))
            .groupBy("_g", "cluster_id")
            .agg(F.sum("y").alias("p"), F.sum(1 - F.col("y")).alias("n"))
            .collect()
        )
        if not counts or not rate:
            continue
        segs = sorted(rate)
        idx = {c: i for i, c in enumerate(segs)}
        score = np.array([rate[c] for c in segs], dtype=np.float64)
        pos = np.zeros((BOOTSTRAP_BUCKETS, len(segs)))
        neg = np.zeros((BOOTSTRAP_BUCKETS, len(segs)))
        for r in counts:
            if r["cluster_id"] in idx:
                pos[r["_g"], idx[r["cluster_id"]]] += r["p"]
                neg[r["_g"], idx[r["cluster_id"]]] += r["n"]
        auc, lift = _auc_and_lift(score, pos.sum(axis=0), neg.sum(axis=0))
        w = np.random.default_rng(seed).poisson(1.0, size=(replicates, BOOTSTRAP_BUCKETS)).astype(np.float64)
        reps = np.array([_auc_and_lift(score, wi @ pos, wi @ neg) for wi in w])
        n_users = int(pos.sum() + neg.sum())
        for j, (name, value) in enumerate(((f"{prefix}_auc", auc), (f"{prefix}_lift", lift))):
            vals = reps[:, j][np.isfinite(reps[:, j])]
            lo, hi = np.percentile(vals, [2.5, 97.5]) if len(vals) else (float("nan"), float("nan"))
            rows.append(
                MetricRow(
                    method=method,
                    family="downstream",
                    metric=name,
                    value=value,
                    ci_low=float(lo),
                    ci_high=float(hi),
                    details={**details, "users": n_users, "bootstrap": replicates},
                )
            )
        log.info("downstream (%s, %s, %d users): AUC %.3f, lift %.2f", prefix, method, n_users, auc, lift)
    return rows


def conversion_rows(
    history: DataFrame, target: DataFrame, methods: Sequence[tuple[str, DataFrame]], seed: int, replicates: int = 200
) -> list[MetricRow]:
    """Does a segment predict who buys next time? Each segment's score is the share of its
    history sessions with a purchase; a user's next session converts or not. Per method:
    ``conversion_auc`` (ranking users by their segment's score; 0.5 = no information) and
    ``conversion_lift`` (next-session conversion of users in segments scoring above the mean,
    over everyone's), with 95% bootstrap intervals over the same 1024 user buckets as the
    other downstream figures (only bucket x segment x outcome counts reach the driver)."""
    bought = F.coalesce(F.col("event_counts")["purchase"], F.lit(0)) > 0
    hist = history.select("user_id", bought.cast("int").alias("b"))
    tgt = target.select("user_id", bought.cast("int").alias("y"))
    if not tgt.where("y = 1").limit(1).count() or not hist.where("b = 1").limit(1).count():
        log.info("downstream: no purchases in history or next sessions; conversion skipped")
        return []
    details = {"target": "next session has a purchase", "score": "segment's history conversion"}
    return _segment_rate_rows(hist, tgt, methods, seed, replicates, "conversion", details)


def return_split(sessions: DataFrame, days: float) -> tuple[DataFrame, DataFrame, DataFrame] | None:
    """The return-within-N-days split at ``cutoff = last session start - days``:
    ``(before, hist, tgt)`` where ``before`` is every session starting before the cutoff (a
    user's segment is made from these alone), ``hist`` is ``(user_id, b)`` per session that
    starts more than ``days`` before the cutoff (``b`` = the same user's next session starts
    within ``days``; fully observed before the cutoff) and ``tgt`` is ``(user_id, y)`` per user
    active before the cutoff (``y`` = a session starts in ``[cutoff, cutoff + days)``). None
    when the log spans less than two windows."""
    secs = days * 86400.0
    ts = F.col("start_ts").cast("double")
    span = sessions.agg(F.min(ts).alias("lo"), F.max(ts).alias("hi")).first()
    if span is None or span["lo"] is None or span["hi"] - span["lo"] < 2 * secs:
        return None
    cutoff = span["hi"] - secs
    before = sessions.where(ts < cutoff)
    nxt = F.lead(ts).over(Window.partitionBy("user_id").orderBy("start_ts", "session_id"))
    hist = (
        before.select("user_id", "session_id", "start_ts")
        .withColumn("_next", nxt)
        .where(ts < cutoff - secs)
        .select("user_id", (F.col("_next").isNotNull() & (F.col("_next") - ts <= secs)).cast("int").alias("b"))
    )
    inside = ((ts >= cutoff) & (ts < cutoff + secs)).cast("int")
    tgt = (
        sessions.groupBy("user_id")
        .agg(F.min(ts).alias("_first"), F.max(inside).alias("y"))
        .where(F.col("_first") < cutoff)
        .select("user_id", "y")
    )
    return before, hist, tgt


def return_rows(
    sessions: DataFrame,
    history_vectors: Callable[[DataFrame], DataFrame],
    centroids: Sequence[Sequence[float]],
    random_shares: Sequence[float],
    seed: int,
    days: float = 7.0,
    replicates: int = 200,
    fine_centroids: Sequence[Sequence[float]] | None = None,
) -> list[MetricRow]:
    """Does a segment predict who comes back? ``return_auc`` / ``return_lift`` (family
    ``downstream``) of the segment's historical return rate (share of its sessions followed by
    the same user's next session within ``days``) for whether a user active before the cutoff
    returns within ``days`` after it (see ``return_split``). Segments come from the sessions
    before the cutoff only; methods: the run's segments, random segments of the same sizes,
    and the fine segments when given."""
    split = return_split(sessions, days)
    if split is None:
        log.info("downstream: the log spans less than 2 x %g days; return-within-%g-days skipped", days, days)
        return []
    # each is read once per method (and tgt once more by the guard): computed once
    before, hist, tgt = (df.persist(StorageLevel.MEMORY_AND_DISK) for df in split)
    users = None
    try:
        if not hist.limit(1).count():
            log.info("downstream: no session is %g days before the cutoff; return skipped", days)
            return []
        # an AUC from a handful of returners (or stayers) is noise that looks like a finding
        # (a log whose last days hold a few stragglers: the demo data's tail)
        outcome = one_row(tgt.agg(F.sum("y").alias("p"), F.count("*").alias("n")))
        pos, neg = int(outcome["p"] or 0), int(outcome["n"] or 0) - int(outcome["p"] or 0)
        need = max(MIN_OUTCOME_USERS, int(0.01 * (pos + neg)))
        if min(pos, neg) < need:
            log.info(
                "downstream: %d users return within %g days of the cutoff and %d do not (fewer than %d on one side); "
                "return skipped (a log with a sparse tail: set evaluate.return_days)",
                pos,
                days,
                neg,
                need,
            )
            return []
        users = history_vectors(before).withColumnRenamed("entity_id", "user_id").persist(StorageLevel.MEMORY_AND_DISK)
        enc = nearest_centroid(users, centroids).select("user_id", "cluster_id")
        methods = [
            ("encoder", enc),
            ("random", random_assignment(users.select("user_id"), random_shares, seed, out_col="cluster_id", key="user_id")),
        ]
        if fine_centroids:
            methods.append(("fine", nearest_centroid(users, fine_centroids).select("user_id", "cluster_id")))
        details = {
            "target": f"returns within {days:g} days of the cutoff",
            "score": f"segment's share of sessions followed within {days:g} days",
        }
        return _segment_rate_rows(hist, tgt, methods, seed, replicates, "return", details)
    finally:
        for df in (before, hist, tgt, users):
            if df is not None:
                df.unpersist()


def temporal_stability_rows(
    sessions: DataFrame,
    history_vectors: Callable[[DataFrame], DataFrame],
    centroids: Sequence[Sequence[float]],
    random_shares: Sequence[float],
    seed: int,
    replicates: int = 200,
    tree: Tree | None = None,
    confident: DataFrame | None = None,
) -> list[MetricRow]:
    """Is a user's segment a trait or a mood? Each user with two or more sessions gets a segment
    from the first half of their sessions and one from the second half (vectors made from
    those sessions alone, nearest of the run's centroids). ``temporal_ari`` is the ARI between
    the two (family ``temporal``), ``temporal_same_segment`` the share of users whose segment
    did not change; the reference is ``random`` (two independent draws of the same sizes:
    ARI about 0). With a segment ``tree`` that splits, the leaves each half reaches too (method
    ``leaf``); with ``confident`` (``user_id`` of the confident members), the top level among
    them alone (method ``confident``). Intervals: the same 1024-bucket bootstrap (bucket x
    segment x segment counts)."""

    w = Window.partitionBy("user_id").orderBy("start_ts", "session_id")
    ranked = sessions.withColumn("_r", F.row_number().over(w)).withColumn("_n", F.count("*").over(Window.partitionBy("user_id")))
    ranked = ranked.where(F.col("_n") >= 2)
    first = ranked.where(F.col("_r") <= F.floor(F.col("_n") / 2)).drop("_r", "_n")
    second = ranked.where(F.col("_r") > F.floor(F.col("_n") / 2)).drop("_r", "_n")
    leaves = tree is not None and not tree.is_flat

    def assigned(half: DataFrame, i: int) -> DataFrame:
        v = nearest_centroid(history_vectors(half), centroids)
        cols = [F.col("entity_id").alias("user_id"), F.col("cluster_id").alias(f"c{i}")]
        if leaves:
            assert tree is not None
            v = place(v, tree, vec_col="embedding", top_col="cluster_id")
            cols.append(F.col("leaf_id").alias(f"l{i}"))
        return v.select(*cols)

    pairs = assigned(first, 1).join(assigned(second, 2), "user_id").persist(StorageLevel.MEMORY_AND_DISK)
    try:
        users = pairs.select("user_id")
        r1 = random_assignment(users, random_shares, seed + 11, "c1", key="user_id")
        r2 = random_assignment(users, random_shares, seed + 12, "c2", key="user_id")
        methods = [("encoder", pairs.select("user_id", "c1", "c2")), ("random", r1.join(r2, "user_id"))]
        if leaves:
            methods.append(("leaf", pairs.select("user_id", F.col("l1").alias("c1"), F.col("l2").alias("c2"))))
        if confident is not None:
            methods.append(("confident", pairs.select("user_id", "c1", "c2").join(confident, "user_id")))
        rows: list[MetricRow] = []
        for method, df in methods:
            counts = (
                df.withColumn("_g", (hash_uniform("user_id", seed=seed) * BOOTSTRAP_BUCKETS).cast("int"))
                .groupBy("_g", "c1", "c2")
                .count()
                .collect()
            )
            if not counts:
                continue
            k = max(max(r["c1"], r["c2"]) for r in counts) + 1
            t = np.zeros((BOOTSTRAP_BUCKETS, k, k))
            for r in counts:
                t[r["_g"], r["c1"], r["c2"]] += r["count"]
            rows += _temporal_rows(method, t, seed, replicates)
        return rows
    finally:
        pairs.unpersist()


def _temporal_rows(method: str, t: np.ndarray, seed: int, replicates: int) -> list[MetricRow]:
    """``temporal_ari`` and ``temporal_same_segment`` of one method from its bucket x first
    half's segment x second half's segment counts ``t``, with bootstrap intervals."""
    total = t.sum(axis=0)
    ari = external_scores(total)["ari"]
    same = float(np.trace(total) / total.sum())
    wts = np.random.default_rng(seed).poisson(1.0, size=(replicates, BOOTSTRAP_BUCKETS)).astype(np.float64)
    reps = [np.tensordot(wi, t, axes=1) for wi in wts]
    rep_ari = np.array([external_scores(m)["ari"] for m in reps if m.sum() > 0])
    rep_same = np.array([np.trace(m) / m.sum() for m in reps if m.sum() > 0])
    n_users = int(total.sum())
    details = {"halves": "first and second half of each user's sessions", "users": n_users, "bootstrap": replicates}
    rows = []
    for name, value, reps_ in (("temporal_ari", ari, rep_ari), ("temporal_same_segment", same, rep_same)):
        lo, hi = np.percentile(reps_, [2.5, 97.5]) if len(reps_) else (float("nan"), float("nan"))
        rows.append(
            MetricRow(
                method=method, family="temporal", metric=name, value=float(value), ci_low=float(lo), ci_high=float(hi), details=details
            )
        )
    log.info("temporal stability (%s, %d users): ARI %.3f, same segment %.1f%%", method, n_users, ari, 100 * same)
    return rows


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
    fine_centroids: Sequence[Sequence[float]] | None = None,
    tree: Tree | None = None,
    confident: DataFrame | None = None,
) -> list[MetricRow]:
    """Metric rows (family ``downstream``) for the encoder's segments and the random baseline
    (and, with ``fine_centroids``, the fine segments as method ``fine``; with a segment
    ``tree`` that splits, its leaves as method ``leaf``; with ``confident``, ``user_id`` of the
    confident members, the top level among them alone as method ``confident``).

    Args:
        sessions: modelled sessions (session_id, user_id, start_ts, and the ``fields`` arrays).
        history_vectors: history sessions -> ``(entity_id, embedding)``, each user's vector from
            their history alone, made the way the run made its user vectors.
        centroids: the run's KMeans centres (on L2-normalised vectors).
        random_shares: cluster size shares of the random baseline (the encoder's).
        baseline_assign: history sessions -> ``(user_id, cluster_id)`` of the bag-of-events
            baseline fitted on history only (its rows get method ``bag_of_events``).

    Long on purpose: the history split, the per-method assignments and the per-field lists
    are persisted once and shared by every method and strategy; the body is the loop over
    them and the unpersisting, which reads best in one place.
    """
    history, target = split_history(sessions)
    history = history.persist(StorageLevel.MEMORY_AND_DISK)
    rows: list[MetricRow] = []
    both: DataFrame | None = None
    try:
        # the history vectors (session vectors pooled, behaviour tokens counted) are computed
        # once: both centroid sets are assigned in the same pass
        users = history_vectors(history).withColumnRenamed("entity_id", "user_id")
        both = nearest_centroid(users, centroids).withColumnRenamed("cluster_id", "_enc")
        if fine_centroids:
            both = nearest_centroid(both, fine_centroids).withColumnRenamed("cluster_id", "_fine")
        leaves = tree is not None and not tree.is_flat
        if leaves:
            assert tree is not None
            both = place(both, tree, vec_col="embedding", top_col="_enc").withColumnRenamed("leaf_id", "_leaf")
            both = both.drop("segment_path", "leaf_distance", "top_confidence", "leaf_confidence")
        both = both.drop("embedding").persist(StorageLevel.MEMORY_AND_DISK)
        n_users = both.count()
        if n_users == 0:
            log.warning("downstream: no user has two sessions; skipped")
            return []
        enc = both.select("user_id", F.col("_enc").alias("cluster_id"))
        rnd = random_assignment(enc.select("user_id"), random_shares, seed, out_col="cluster_id", key="user_id")
        methods = [("encoder", enc), ("random", rnd)]
        log.info("downstream: %d users with history assigned to the encoder's segments", n_users)
        if fine_centroids:
            methods.append(("fine", both.select("user_id", F.col("_fine").alias("cluster_id"))))
        if leaves:
            methods.append(("leaf", both.select("user_id", F.col("_leaf").alias("cluster_id"))))
        if confident is not None:
            methods.append(("confident", enc.join(confident, "user_id")))
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
                        MetricRow(
                            method=method,
                            family="downstream",
                            metric=f"{'hitrate' if m == 'hit' else 'ndcg'}@{n}_{what}_{strat}",
                            value=sc.value,
                            ci_low=sc.low,
                            ci_high=sc.high,
                            details={
                                "target": f"next session {what}",
                                "users": n_scored,
                                "strategy": strat,
                                "history_only": True,
                                "bootstrap": replicates,
                            },
                        )
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
        rows += conversion_rows(history, target, methods, seed, replicates)
        for _, a in methods:
            a.unpersist()
    finally:
        for df in (both, history):
            if df is not None:
                df.unpersist()
    return rows
