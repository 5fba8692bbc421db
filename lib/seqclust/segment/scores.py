"""In-memory k-means and its silhouette, on a bounded sample in the driver (the k sweep and the
segment tree's split tests)."""

from __future__ import annotations

import warnings

import numpy as np


def silhouette_sq(X: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with squared Euclidean distance, Spark's ``ClusteringEvaluator``
    definition (scikit-learn's ``silhouette_score(metric="sqeuclidean")``), in O(n·k): the mean
    squared distance from a point to a cluster follows from the cluster's count, vector sum and
    sum of squared norms. Points of singleton clusters score 0."""
    labels = np.asarray(labels)
    ks = np.unique(labels)
    if len(ks) < 2:
        return 0.0
    idx = np.searchsorted(ks, labels)
    sq = (X * X).sum(axis=1)
    counts = np.bincount(idx, minlength=len(ks)).astype(np.float64)
    sums = np.zeros((len(ks), X.shape[1]))
    np.add.at(sums, idx, X)
    psi = np.bincount(idx, weights=sq, minlength=len(ks))
    mean_d = (sq[:, None] * counts[None, :] + psi[None, :] - 2.0 * X @ sums.T) / counts[None, :]
    mean_d = np.maximum(mean_d, 0.0)
    rows = np.arange(len(X))
    own_n = counts[idx]
    a = np.where(own_n > 1, mean_d[rows, idx] * own_n / np.maximum(own_n - 1, 1), 0.0)
    mean_d[rows, idx] = np.inf
    b = mean_d.min(axis=1)
    s = np.where(a < b, 1.0 - a / np.where(b > 0, b, 1.0), np.where(a > b, b / np.where(a > 0, a, 1.0) - 1.0, 0.0))
    s[own_n == 1] = 0.0
    return float(s.mean())


def local_kmeans(X: np.ndarray, k: int, seed: int, n_init: int, max_iter: int):
    """scikit-learn k-means++ (best of ``n_init`` seeded starts) on an in-memory sample."""
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # "fewer distinct points than clusters" on tiny samples
        return SkKMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed).fit(X)
