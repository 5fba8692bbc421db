"""The segment tree's split test on data with known answers, and the tree's bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from seqclust.segment.hierarchy import SplitRule, Tree, grow, margin, path_key, split_test

RULE = SplitRule(min_users=100, min_child_users=30, k_max=5, min_gap=0.1, null_draws=2, n_init=3, pca_dim=8)


def _blobs(rng, centers, n_each, sd, dim):
    centers = np.asarray(centers, dtype=float)
    y = np.repeat(np.arange(len(centers)), n_each)
    X = rng.normal(0, sd, (len(y), dim))
    X[:, : centers.shape[1]] += centers[y]
    return X, y


def _halves(rng, X, noise):
    """Two noisy views of each row, as vectors from two halves of a user's sessions."""
    return X + rng.normal(0, noise, X.shape), X + rng.normal(0, noise, X.shape)


def test_one_isotropic_blob_is_not_split():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 12))
    test, labels = split_test("0", X, RULE, 1, _halves(rng, X, 0.3))
    assert not test.split and labels is None
    assert test.gap < RULE.min_gap and "gap" in test.reason


def test_an_elongated_blob_is_not_split_however_stable():
    # one Gaussian stretched along one axis: k-means cuts it the same way every time (stable,
    # and a user keeps their side across time), but it is one group: the null explains it
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 12)) * np.r_[6.0, np.ones(11)]
    test, _ = split_test("0", X, RULE, 1, _halves(rng, X, 0.3))
    assert test.stability > 0.8
    assert not test.split and abs(test.gap) < RULE.min_gap


def test_blobs_within_a_blob_are_split_in_the_right_number():
    rng = np.random.default_rng(2)
    X, y = _blobs(rng, [[0, 0], [4, 0], [2, 3.5]], 200, 1.0, 10)
    test, labels = split_test("1", X, RULE, 3, _halves(rng, X, 0.3))
    assert test.split and test.k == 3, test.summary()
    assert adjusted_rand_score(y, labels) > 0.9
    assert test.gap >= RULE.min_gap and test.stability >= RULE.min_stability and test.temporal_ari >= RULE.min_temporal


def test_a_split_seen_in_one_half_of_the_histories_only_is_not_reported():
    # the whole-history vectors show two groups; but a user's two halves land on either side at
    # random (the groups are moods of sessions, not traits of users)
    rng = np.random.default_rng(3)
    X, y = _blobs(rng, [[0, 0], [5, 0]], 300, 1.0, 10)
    A = X + rng.normal(0, 0.3, X.shape)
    B = A.copy()
    flip = rng.random(len(X)) < 0.5
    B[flip, 0] = 5.0 - B[flip, 0]  # the other group's side for half of the users
    test, labels = split_test("0", X, RULE, 4, (A, B))
    assert test.gap >= RULE.min_gap and test.stability >= RULE.min_stability  # the split is there in the vectors
    assert test.temporal_ari is not None and test.temporal_ari < RULE.min_temporal
    assert not test.split and labels is None and "persistence" in test.reason


def test_members_without_two_halves_are_left_out_of_the_persistence_figure():
    rng = np.random.default_rng(5)
    X, _ = _blobs(rng, [[0, 0], [6, 0]], 150, 1.0, 6)
    A, B = _halves(rng, X, 0.2)
    A[:100] = np.nan
    test, _ = split_test("0", X, RULE, 1, (A, B))
    assert test.temporal_users == len(X) - 100 and test.temporal_ari > 0.9


def test_a_segment_too_small_to_test_is_a_leaf():
    rng = np.random.default_rng(6)
    test, labels = split_test("4", rng.normal(size=(50, 5)), RULE, 1)
    assert not test.split and labels is None and "too few" in test.reason
    assert np.isnan(test.silhouette) and np.isnan(test.stability) and np.isnan(test.gap)  # not measured, not zero


def test_grow_splits_only_the_nested_segment_and_descend_reaches_its_leaves():
    rng = np.random.default_rng(7)
    # segment 0: one blob; segment 1: three blobs closer together, far from segment 0
    X0 = rng.normal(0, 1.0, (300, 8))
    X1, y1 = _blobs(rng, [[0, 0], [5, 0], [2.5, 4.5]], 150, 1.0, 8)
    X1[:, 2] += 30.0
    X = np.vstack([X0, X1])
    top = np.r_[np.zeros(300, int), np.ones(450, int)]
    centers = np.stack([X0.mean(0), X1.mean(0)])
    tree = grow(X, top, centers, RULE, 11, _halves(rng, X, 0.3))
    assert tree.paths == ("0", "1", "1.0", "1.1", "1.2")
    assert list(tree.parent) == [-1, -1, 1, 1, 1]
    assert [t.path for t in tree.tests] == ["0", "1", "1.0", "1.1", "1.2"]  # each child tested too
    assert [t.split for t in tree.tests] == [False, True, False, False, False]
    leaves = tree.leaf_nodes
    assert [tree.paths[i] for i in leaves] == ["0", "1.0", "1.1", "1.2"]
    assert list(tree.leaf_id) == [0, -1, 1, 2, 3]
    node, dist = tree.descend(X, top)
    assert set(node[:300]) == {0}  # the flat segment is its own leaf
    assert adjusted_rand_score(y1, node[300:]) > 0.9
    assert np.allclose(dist, ((X - tree.centers[node]) ** 2).sum(axis=1))


def test_depth_one_is_the_flat_tree():
    rng = np.random.default_rng(8)
    X, y = _blobs(rng, [[0, 0], [4, 0], [2, 3.5]], 150, 1.0, 8)
    from dataclasses import replace

    tree = grow(X, np.zeros(len(X), int), X.mean(0)[None], replace(RULE, max_depth=1), 1)
    assert tree.paths == ("0",) and tree.is_flat and tree.tests == ()


def test_a_tree_round_trips_through_its_rows_and_refuses_an_orphan():
    t = Tree.from_rows([("1.1", [0.0, 1.0]), ("0", [1.0, 1.0]), ("1", [0.0, 0.5]), ("1.0", [0.0, 0.0]), ("1.10", [0.0, 2.0])])
    assert t.paths == ("0", "1", "1.0", "1.1", "1.10")
    assert list(t.parent) == [-1, -1, 1, 1, 1]
    assert [t.paths[i] for i in t.leaf_nodes] == ["0", "1.0", "1.1", "1.10"]
    node, _ = t.descend(np.array([[0.0, 1.9], [5.0, 5.0]]), np.array([1, 0]))
    assert [t.paths[i] for i in node] == ["1.10", "0"]
    with pytest.raises(ValueError, match="parent is missing"):
        Tree.from_rows([("0", [0.0]), ("2.1", [1.0])])
    assert sorted(["2.10", "2.9", "10", "2"], key=path_key) == ["2", "2.9", "2.10", "10"]


def test_the_flat_tree_puts_everyone_in_their_top_segment():
    t = Tree.flat(np.eye(3))
    node, dist = t.descend(np.eye(3)[[2, 0]], np.array([2, 0]))
    assert list(node) == [2, 0] and np.allclose(dist, 0) and list(t.leaf_id) == [0, 1, 2]


def test_the_halves_are_made_only_for_a_split_that_passes_the_other_tests():
    rng = np.random.default_rng(9)
    calls: list[int] = []
    X = rng.normal(size=(600, 12))
    test, _ = split_test("0", X, RULE, 1, lambda: calls.append(1) or _halves(rng, X, 0.3))
    assert calls == [] and test.temporal_ari is None and not test.split
    Y, _ = _blobs(rng, [[0, 0], [6, 0]], 200, 1.0, 8)
    test, _ = split_test("0", Y, RULE, 1, lambda: calls.append(1) or _halves(rng, Y, 0.3))
    assert calls == [1] and test.split and test.temporal_ari > 0.9


def test_the_margin_is_one_on_the_own_centre_zero_halfway_and_never_negative():
    own = np.array([0.0, 1.0, 4.0, 9.0, 1.0])
    other = np.array([4.0, 1.0, 16.0, 4.0, 0.0])
    # a = 0, 1, 2, 3, 1; b = 2, 1, 4, 2, 0: (b - a) / max(a, b)
    assert np.allclose(margin(own, other), [1.0, 0.0, 0.5, 0.0, 0.0])


def test_confidence_on_a_known_tree_and_a_leaf_never_surer_than_its_top():
    # top 0 at (0, 0), top 1 at (10, 0) with children 1.0 at (10, -1) and 1.1 at (10, 1)
    t = Tree.from_rows([("0", [0.0, 0.0]), ("1", [10.0, 0.0]), ("1.0", [10.0, -1.0]), ("1.1", [10.0, 1.0])])
    X = np.array([[0.0, 0.0], [10.0, 0.8], [10.0, 0.0], [4.0, 0.0]])
    node, _, top_conf, leaf_conf = t.place(X, np.array([0, 1, 1, 0]))
    assert [t.paths[i] for i in node] == ["0", "1.1", "1.0", "0"]
    # row 0 on its top centre: sure at both levels (no split below)
    assert top_conf[0] == pytest.approx(1.0) and leaf_conf[0] == pytest.approx(1.0)
    # row 1: top a = 0.8, b = sqrt(100.64); leaf a = 0.2, b = 1.8
    b = np.sqrt(100.64)
    assert top_conf[1] == pytest.approx((b - 0.8) / b)
    assert leaf_conf[1] == pytest.approx(min((b - 0.8) / b, (1.8 - 0.2) / 1.8))
    # row 2 halfway between the two children: sure of its top segment, not of its leaf
    assert top_conf[2] == pytest.approx(1.0) and leaf_conf[2] == pytest.approx(0.0)
    # row 3: a = 4, b = 6 at the top
    assert top_conf[3] == pytest.approx(2.0 / 6.0) and leaf_conf[3] == pytest.approx(2.0 / 6.0)
    assert (leaf_conf <= top_conf + 1e-12).all()


def test_on_a_flat_tree_the_leaf_confidence_is_the_top_one_and_matches_nearest_centre():
    from seqclust.segment.cluster import nearest_margin_np

    rng = np.random.default_rng(3)
    C = rng.normal(size=(4, 5))
    X = rng.normal(size=(300, 5))
    ids, _, conf = nearest_margin_np(X, C)
    _, _, top_conf, leaf_conf = Tree.flat(C).place(X, ids)
    assert np.allclose(top_conf, conf) and np.array_equal(top_conf, leaf_conf)
    assert (conf >= 0).all() and (conf <= 1).all() and conf.std() > 0.05
    # a user placed against geometry (as token likelihood may) has no confidence
    far = (ids + 1) % 4
    assert np.all(nearest_margin_np(X, C, far)[2][np.linalg.norm(X - C[far], axis=1) > np.linalg.norm(X - C[ids], axis=1) + 1e-9] == 0)
