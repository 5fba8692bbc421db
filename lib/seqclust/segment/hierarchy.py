"""Segments within segments: every top-level segment is tested for sub-structure and split
where the evidence supports it, recursively (bounded depth and size).

A flat k rule reports the strongest split of the users as if it were the whole story: when a few
groups stand far apart and one of them holds several audiences closer together, the best
silhouette is reached at the number of groups, and the audiences inside stay one segment. The
tree keeps the top level the k rule chose and asks of each segment, on its own members and in
its own principal components, whether it holds groups of its own (docs/EVALUATION.md):

1. **Sub-sweep.** k-means++ (best of ``sweep_n_init`` starts) at each sub-k from 2 to
   ``split_k_max``, and the silhouette of each.
2. **Null reference** (the gap statistic's idea, Tibshirani, Walther & Hastie 2001, with the
   single-Gaussian null of SigClust, Liu et al. 2008, which Kimes et al. 2017 apply down a
   hierarchy): the silhouette k-means reaches on Gaussian data of the same size and the same
   covariance as the members (``split_null_draws`` draws). A segment that is one blob, however
   elongated, reaches about the null's silhouette; the gap is how far above it the data are.
   The candidate sub-k is the one with the best silhouette (the top level's own rule);
   choosing the largest gap instead favours many small sub-segments on flat data, where the
   null's silhouette falls faster with k than the data's.
3. **Stability** of the candidate split: ARI between the split and refits on subsamples (as the
   top level's sweep).
4. **Persistence across time**: each member with two or more sessions has a vector from the
   first half of their sessions and one from the second half; both are placed in the candidate
   sub-segments, and the ARI between the two placements says whether the split is a trait of
   the users or a mood of their sessions.

A segment splits when the gap, the stability and the persistence all pass their thresholds
(``cluster.split_min_gap``, ``split_min_stability``, ``split_min_temporal``); every test's
figures are kept (``SplitTest``) for the metrics and the report, split or not.

Everything here is numpy on a bounded sample in the driver (the members of the top level's
sweep sample); placing every user down the tree is ``descend`` (per Arrow batch in Spark).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from seqclust.core.config import ClusterConfig
from seqclust.segment.scores import local_kmeans, silhouette_sq

log = logging.getLogger(__name__)

# the members' vectors from the first and the second half of their sessions, or a function
# that makes them when first needed
Halves = tuple[np.ndarray, np.ndarray] | Callable[[], "tuple[np.ndarray, np.ndarray] | None"]


@dataclass(frozen=True)
class SplitRule:
    """The thresholds and budget of the split test (from ``ClusterConfig``)."""

    max_depth: int = 3  # levels in all, the top one included (1: no split)
    min_users: int = 200  # a segment with fewer fitted members is not tested
    min_child_users: int = 50  # no sub-segment may be smaller
    k_max: int = 6
    min_gap: float = 0.15
    min_stability: float = 0.8
    min_temporal: float = 0.5
    null_draws: int = 3
    pca_dim: int = 16
    n_init: int = 5
    max_iter: int = 40
    stability_runs: int = 3
    stability_fraction: float = 0.8

    @staticmethod
    def from_config(cfg: ClusterConfig) -> SplitRule:
        return SplitRule(
            max_depth=cfg.split_max_depth,
            min_users=cfg.split_min_users,
            min_child_users=cfg.split_min_child_users,
            k_max=cfg.split_k_max,
            min_gap=cfg.split_min_gap,
            min_stability=cfg.split_min_stability,
            min_temporal=cfg.split_min_temporal,
            n_init=min(cfg.sweep_n_init, 5),
            max_iter=cfg.max_iter,
            stability_runs=max(cfg.stability_runs, 2),
            stability_fraction=cfg.stability_fraction,
        )


@dataclass(frozen=True)
class SplitTest:
    """The evidence for splitting the segment at ``path``: its best sub-k (best silhouette), that split's silhouette and the null's, its stability, its persistence across the
    halves of users' histories (None when too few members have two halves), and the verdict."""

    path: str
    users: int
    k: int
    silhouette: float
    null_silhouette: float
    stability: float
    temporal_ari: float | None
    temporal_users: int
    split: bool
    reason: str

    @property
    def gap(self) -> float:
        return self.silhouette - self.null_silhouette

    def summary(self) -> str:
        if np.isnan(self.silhouette):
            return f"segment {self.path} ({self.users} users): {self.reason}"
        t = "n/a" if self.temporal_ari is None else f"{self.temporal_ari:.2f} ({self.temporal_users} users)"
        return (
            f"segment {self.path} ({self.users} users): best sub-k {self.k}, silhouette {self.silhouette:.3f} vs "
            f"{self.null_silhouette:.3f} for one Gaussian blob (gap {self.gap:+.3f}), stability {self.stability:.2f}, "
            f"same sub-segment across the halves of users' histories ARI {t}: {self.reason}"
        )


@dataclass
class Node:
    """A segment of the tree: ``path`` (``'2'``, ``'2.1'``), its centre in the stored vector
    space (the mean vector of its fitted members), the test it went through and its children."""

    path: str
    center: np.ndarray
    test: SplitTest | None = None
    children: list[Node] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return self.path.count(".") + 1


def path_key(path: str) -> tuple[int, ...]:
    """Sort key of a segment path: ``'2.10'`` after ``'2.9'``."""
    return tuple(int(p) for p in path.split("."))


@dataclass(frozen=True)
class Tree:
    """The segment tree, flattened: ``paths`` in depth-first path order, ``parent`` (index of
    the parent node, -1 at the top), ``centers`` [nodes, dim] and the split tests made.
    Leaves are the nodes without children, numbered in path order (``leaf_id``, -1 for inner
    nodes); the top nodes are numbered by their top-level cluster id (the first path part)."""

    paths: tuple[str, ...]
    parent: np.ndarray
    centers: np.ndarray
    tests: tuple[SplitTest, ...] = ()

    @staticmethod
    def from_nodes(top: list[Node]) -> Tree:
        flat: list[tuple[Node, int]] = []

        def walk(n: Node, parent: int) -> None:
            flat.append((n, parent))
            me = len(flat) - 1
            for c in sorted(n.children, key=lambda c: path_key(c.path)):
                walk(c, me)

        for n in sorted(top, key=lambda n: path_key(n.path)):
            walk(n, -1)
        tests = tuple(n.test for n, _ in flat if n.test is not None)
        return Tree(
            tuple(n.path for n, _ in flat),
            np.array([p for _, p in flat], dtype=np.int64),
            np.stack([np.asarray(n.center, dtype=np.float64) for n, _ in flat]),
            tests,
        )

    @staticmethod
    def flat(centers: np.ndarray) -> Tree:
        """The tree of a flat segmentation: every top segment a leaf."""
        k = len(centers)
        return Tree(tuple(str(i) for i in range(k)), np.full(k, -1, dtype=np.int64), np.asarray(centers, dtype=np.float64))

    @staticmethod
    def from_rows(rows: list[tuple[str, list[float]]]) -> Tree:
        """From stored ``(segment_path, centre)`` rows of every node (``centroids``)."""
        rows = sorted(rows, key=lambda r: path_key(r[0]))
        paths = tuple(r[0] for r in rows)
        index = {p: i for i, p in enumerate(paths)}
        parents = [p.rsplit(".", 1)[0] if "." in p else None for p in paths]
        if any(q is not None and q not in index for q in parents):
            raise ValueError("segment tree rows: a node's parent is missing")
        parent = np.array([-1 if q is None else index[q] for q in parents], dtype=np.int64)
        return Tree(paths, parent, np.asarray([r[1] for r in rows], dtype=np.float64))

    @property
    def is_flat(self) -> bool:
        return bool((self.parent < 0).all())

    def children(self, i: int) -> np.ndarray:
        return np.nonzero(self.parent == i)[0]

    @property
    def leaf_nodes(self) -> np.ndarray:
        """Node indices of the leaves, in path order."""
        has_child = np.zeros(len(self.paths), dtype=bool)
        has_child[self.parent[self.parent >= 0]] = True
        return np.nonzero(~has_child)[0]

    @property
    def leaf_id(self) -> np.ndarray:
        out = np.full(len(self.paths), -1, dtype=np.int64)
        leaves = self.leaf_nodes
        out[leaves] = np.arange(len(leaves))
        return out

    def descend(self, X: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(node index, squared distance to that node's centre)`` of the leaf each row of ``X``
        reaches from its top segment ``top`` (a cluster id), taking the nearest child centre at
        each level."""
        node, d2, _, _ = self.place(X, top)
        return node, d2

    def place(self, X: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``descend`` with each row's confidence at the top level and at its leaf:
        ``(node, squared distance, top confidence, leaf confidence)``. A confidence is the
        margin of a placement (``margin``): at the top, the row's own top segment against the
        nearest other top centre; at the leaf, the smallest margin met on the way down (the top
        one and the choice among the children at every split), so a leaf is never surer than
        its ancestors. Equal at both levels when nothing splits."""
        X = np.asarray(X, dtype=np.float64)
        top_idx = np.nonzero(self.parent < 0)[0]
        tops = {int(self.paths[i]): j for j, i in enumerate(top_idx)}
        col = np.array([tops[int(t)] for t in top], dtype=np.int64) if len(top) else np.zeros(0, dtype=np.int64)
        node = top_idx[col] if len(col) else np.zeros(0, dtype=np.int64)
        top_conf = own_margin(_sq_dist(X, self.centers[top_idx]), col) if len(node) else np.zeros(0)
        leaf_conf = top_conf.copy()
        kids = {i: self.children(i) for i in range(len(self.paths))}
        while True:
            inner = np.array([len(kids[n]) > 0 for n in node], dtype=bool)
            if not inner.any():
                break
            for n in np.unique(node[inner]):
                rows = np.nonzero(node == n)[0]
                ch = kids[int(n)]
                d = _sq_dist(X[rows], self.centers[ch])
                pick = d.argmin(axis=1)
                node[rows] = ch[pick]
                leaf_conf[rows] = np.minimum(leaf_conf[rows], own_margin(d, pick))
        dist = ((X - self.centers[node]) ** 2).sum(axis=1) if len(node) else np.zeros(0)
        return node, dist, top_conf, leaf_conf


def margin(own_d2: np.ndarray, other_d2: np.ndarray) -> np.ndarray:
    """How surely each row belongs to its own centre rather than the nearest other one: the
    simplified silhouette ``(b - a) / max(a, b)`` of Euclidean distances ``a`` (own centre) and
    ``b`` (nearest other centre), clipped at 0. 1 on its own centre, 0 halfway to the other
    (or nearer to it: refined segments are chosen by token likelihood, not always the nearest
    centre); 0 where both distances are 0. ``own_margin`` gives 1 where there is no other centre."""
    a = np.sqrt(np.maximum(own_d2, 0.0))
    b = np.sqrt(np.maximum(other_d2, 0.0))
    top = np.maximum(a, b)
    m = (b - a) / np.where(top > 0, top, 1.0)
    return np.clip(m, 0.0, 1.0)


def own_margin(d2: np.ndarray, own: np.ndarray) -> np.ndarray:
    """``margin`` of each row of the squared distances ``d2`` [n, k] for its own column ``own``."""
    rows = np.arange(len(own))
    a = d2[rows, own]
    if d2.shape[1] < 2:
        return np.ones(len(own))
    other = d2.copy()
    other[rows, own] = np.inf
    return margin(a, other.min(axis=1))


def _sq_dist(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    return np.maximum((X * X).sum(axis=1)[:, None] + (C * C).sum(axis=1)[None, :] - 2.0 * X @ C.T, 0.0)


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


def split_test(
    path: str,
    X: np.ndarray,
    rule: SplitRule,
    seed: int,
    halves: Halves | None = None,
) -> tuple[SplitTest, np.ndarray | None]:
    """The evidence for splitting the members ``X`` [n, dim] of segment ``path``, and their
    sub-segment labels when they split (None otherwise). ``halves``: the same members' vectors
    from the first and the second half of their sessions (rows of NaN where a member has fewer
    than two sessions), or a function that makes them: it is called only when the split passes
    the gap, stability and size tests (the halves cost Spark jobs; a flat segment needs none)."""
    n = len(X)
    ks = [k for k in range(2, rule.k_max + 1) if k * rule.min_child_users <= n]
    if n < rule.min_users or not ks:
        nan = float("nan")  # not measured (the metrics table gets nulls, not zeros)
        return SplitTest(path, n, 1, nan, nan, nan, None, 0, False, f"too few users to test (fewer than {rule.min_users})"), None
    mu = X.mean(axis=0)
    _, s, vt = np.linalg.svd(X - mu, full_matrices=False)
    d = int(min(rule.pca_dim, n - 1, len(s)))
    V = vt[:d]
    P = (X - mu) @ V.T
    sd = s[:d] / np.sqrt(max(n - 1, 1))
    rng = np.random.default_rng(seed)
    best: tuple[float, int, object, float, float] | None = None
    for k in ks:
        km = local_kmeans(P, k, seed, rule.n_init, rule.max_iter)
        sil = silhouette_sq(P, km.labels_)
        null = [
            silhouette_sq(R, local_kmeans(R, k, seed + b, 1, rule.max_iter).labels_)
            for b in range(rule.null_draws)
            for R in [rng.normal(size=P.shape) * sd]
        ]
        gap = sil - float(np.mean(null))
        if best is None or sil > best[3]:
            best = (gap, k, km, sil, float(np.mean(null)))
    assert best is not None
    gap, k, km, sil, null_sil = best
    labels = np.asarray(km.labels_)  # type: ignore[attr-defined]
    stab = []
    for b in range(rule.stability_runs):
        sub = np.random.default_rng(seed + 7919 * (b + 1)).random(n) < rule.stability_fraction
        # refits with as many starts as the split: a single start can merge two true groups
        refit = local_kmeans(P[sub], k, seed + 1009 * (b + 1), rule.n_init, rule.max_iter)
        stab.append(_ari(labels, refit.predict(P)))
    stability = float(np.mean(stab)) if stab else 1.0
    sizes = np.bincount(labels, minlength=k)
    fails = []
    if gap < rule.min_gap:
        fails.append(f"gap {gap:+.3f} below {rule.min_gap}")
    if stability < rule.min_stability:
        fails.append(f"stability {stability:.3f} below {rule.min_stability}")
    if sizes.min() < rule.min_child_users:
        fails.append(f"a sub-segment of {int(sizes.min())} users (fewer than {rule.min_child_users})")
    temporal, t_users = None, 0
    h = (halves() if callable(halves) else halves) if halves is not None and not fails else None
    if h is not None:
        A, B = h
        ok = ~(np.isnan(A).any(axis=1) | np.isnan(B).any(axis=1))
        t_users = int(ok.sum())
        if t_users >= max(2 * k, 20):
            C = km.cluster_centers_  # type: ignore[attr-defined]
            a = _sq_dist((A[ok] - mu) @ V.T, C).argmin(axis=1)
            b_ = _sq_dist((B[ok] - mu) @ V.T, C).argmin(axis=1)
            temporal = _ari(a, b_)
            if temporal < rule.min_temporal:
                fails.append(f"persistence across time {temporal:.3f} below {rule.min_temporal}")
    split = not fails
    reason = f"split in {k}" if split else "not split: " + "; ".join(fails)
    test = SplitTest(path, n, k, sil, null_sil, stability, temporal, t_users, split, reason)
    return test, (labels if split else None)


def grow(
    X: np.ndarray,
    top: np.ndarray,
    centers: np.ndarray,
    rule: SplitRule,
    seed: int,
    halves: Halves | None = None,
) -> Tree:
    """The segment tree over the top-level segments ``top`` (cluster ids of the rows of ``X``,
    the sample's vectors) with top centres ``centers``: every segment tested (``split_test``)
    and split where it passes, down to ``rule.max_depth`` levels. Sub-segment centres are their
    members' mean vectors. ``halves`` (arrays aligned with ``X``, or a function that makes
    them) is asked for once, when a first segment passes the other tests."""
    X = np.asarray(X, dtype=np.float64)
    top = np.asarray(top)
    cache: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}

    def halves_of(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        if "all" not in cache:
            cache["all"] = halves() if callable(halves) else halves
        h = cache["all"]
        return None if h is None else (h[0][rows], h[1][rows])

    def node(path: str, rows: np.ndarray, center: np.ndarray) -> Node:
        me = Node(path, np.asarray(center, dtype=np.float64))
        if me.depth >= rule.max_depth:
            return me
        lazy = None if halves is None else (lambda: halves_of(rows))
        test, labels = split_test(path, X[rows], rule, seed + 31 * len(path), lazy)
        me.test = test
        log.info("cluster: %s", test.summary())
        if labels is not None:
            for c in range(int(labels.max()) + 1):
                sub = rows[labels == c]
                me.children.append(node(f"{path}.{c}", sub, X[sub].mean(axis=0)))
        return me

    nodes = [node(str(c), np.nonzero(top == c)[0], centers[c]) for c in range(len(centers))]
    return Tree.from_nodes(nodes)
