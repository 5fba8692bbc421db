"""Drift of the segmentation between two runs of the same source.

Clusters of two runs are first matched: by identity when the new run was assigned with the
old run's model (``seqclust assign``), by centroid alignment (Hungarian matching on squared
distance) when both runs used the same encoder, else by the users they share (Hungarian
matching that maximises overlap). Then, over matched clusters (an unmatched cluster is its own
bin): PSI and Jensen-Shannon divergence (base 2, in [0, 1]) of cluster shares, and the share of
the users present in both runs whose (matched) cluster changed. Only k x k aggregates reach
the driver.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from scipy.optimize import linear_sum_assignment

EPS = 1e-6


def psi(p: Sequence[float], q: Sequence[float]) -> float:
    """Population stability index of distribution ``q`` against ``p`` (shares, clamped at EPS)."""
    a = np.maximum(np.asarray(p, float), EPS)
    b = np.maximum(np.asarray(q, float), EPS)
    return float(np.sum((b - a) * np.log(b / a)))


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint)."""
    a, b = np.asarray(p, float), np.asarray(q, float)
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x: np.ndarray, y: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / y[nz])))

    return 0.5 * kl(a, m) + 0.5 * kl(b, m)


def match_by_centroids(old: Sequence[Sequence[float]], new: Sequence[Sequence[float]]) -> dict[int, int]:
    """old cluster id -> new cluster id, minimising the total squared centroid distance."""
    a, b = np.asarray(old, float), np.asarray(new, float)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    return {int(i): int(j) for i, j in zip(r, c)}


def match_by_overlap(pairs: dict[tuple[int, int], int]) -> dict[int, int]:
    """old -> new maximising the users both clusters share (``pairs``: (old, new) -> users)."""
    olds = sorted({o for o, _ in pairs})
    news = sorted({n for _, n in pairs})
    m = np.zeros((len(olds), len(news)))
    for (o, n), v in pairs.items():
        m[olds.index(o), news.index(n)] = v
    r, c = linear_sum_assignment(-m)
    return {olds[i]: news[j] for i, j in zip(r, c)}


@dataclass(frozen=True)
class Drift:
    psi: float
    js: float
    changed_share: float
    users_compared: int
    alignment: str
    matched: dict[int, int]


def segmentation_drift(
    old_clusters: DataFrame,
    new_clusters: DataFrame,
    alignment: str,
    old_centroids: Sequence[Sequence[float]] | None = None,
    new_centroids: Sequence[Sequence[float]] | None = None,
) -> Drift:
    """Drift between two ``(entity_id, cluster_id)`` assignments.

    Args:
        alignment: ``same_model``, ``centroids`` (needs both centroid lists) or ``user_overlap``.
    """
    old_sizes = {r["cluster_id"]: r["count"] for r in old_clusters.groupBy("cluster_id").count().collect()}
    new_sizes = {r["cluster_id"]: r["count"] for r in new_clusters.groupBy("cluster_id").count().collect()}
    both = old_clusters.select("entity_id", F.col("cluster_id").alias("o")).join(
        new_clusters.select("entity_id", F.col("cluster_id").alias("n")), "entity_id"
    )
    pairs = {(r["o"], r["n"]): r["count"] for r in both.groupBy("o", "n").count().collect()}
    if alignment == "same_model":
        matched = {c: c for c in old_sizes if c in new_sizes}
    elif alignment == "centroids":
        assert old_centroids is not None and new_centroids is not None
        matched = match_by_centroids(old_centroids, new_centroids)
    elif alignment == "user_overlap":
        matched = match_by_overlap(pairs) if pairs else {}
    else:
        raise ValueError(alignment)
    n_old, n_new = sum(old_sizes.values()), sum(new_sizes.values())
    p, q = [], []
    for c, size in sorted(new_sizes.items()):
        prev = [o for o, nn in matched.items() if nn == c]
        p.append(sum(old_sizes.get(o, 0) for o in prev) / n_old)
        q.append(size / n_new)
    for o, size in sorted(old_sizes.items()):
        if o not in matched or matched[o] not in new_sizes:
            p.append(size / n_old)
            q.append(0.0)
    compared = sum(pairs.values())
    same = sum(v for (o, n), v in pairs.items() if matched.get(o) == n)
    changed = (compared - same) / compared if compared else math.nan
    return Drift(psi(p, q), js_divergence(p, q), changed, compared, alignment, matched)
