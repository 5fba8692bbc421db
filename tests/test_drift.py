"""Drift between segmentations: PSI / JS against scipy, cluster matching, changed users."""

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from seqclust.evaluate.drift import js_divergence, match_by_centroids, match_by_overlap, psi, segmentation_drift


def test_psi_and_js_reference_values():
    p, q = [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]
    assert psi(p, q) == pytest.approx(sum((b - a) * np.log(b / a) for a, b in zip(p, q)))
    assert psi(p, p) == 0.0
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)


def test_matching_by_centroids_and_by_overlap():
    old = [[0, 0], [10, 0], [0, 10]]
    new = [[0.1, 9.8], [0.2, -0.1], [9.9, 0.3]]
    assert match_by_centroids(old, new) == {0: 1, 1: 2, 2: 0}
    assert match_by_overlap({(0, 1): 50, (0, 0): 3, (1, 0): 40, (2, 2): 7}) == {0: 1, 1: 0, 2: 2}


def test_segmentation_drift_relabelled_and_moved_users(spark):
    old = spark.createDataFrame([(f"u{i}", i % 3) for i in range(300)], "entity_id string, cluster_id int")
    # same partition with permuted labels, then 30 users (10%) moved to another segment
    perm = {0: 2, 1: 0, 2: 1}
    rows = [(f"u{i}", perm[i % 3] if i >= 30 else perm[(i + 1) % 3]) for i in range(300)]
    new = spark.createDataFrame(rows, "entity_id string, cluster_id int")
    d = segmentation_drift(old, new, "user_overlap")
    assert d.matched == perm and d.users_compared == 300
    assert d.changed_share == pytest.approx(0.1)
    assert d.psi == pytest.approx(0.0, abs=1e-12) and d.js == pytest.approx(0.0, abs=1e-12)  # shares unchanged
    same = segmentation_drift(old, old, "same_model")
    assert (same.changed_share, same.psi) == (0.0, 0.0)


def test_random_reference_changes_one_minus_sum_of_squared_shares(spark):
    """Two independent random draws with shares p move 1 - sum(p^2) of the users (less a
    little that overlap matching wins back): the floor of the drift table's random row."""
    from seqclust.evaluate.baseline import random_assignment

    shares = [0.5, 0.3, 0.2]
    users = spark.range(20000).withColumnRenamed("id", "entity_id").cache()
    a = random_assignment(users, shares, 1, "cluster_id").cache()
    b = random_assignment(users, shares, 2, "cluster_id").cache()
    d = segmentation_drift(a, b, "user_overlap")
    assert d.users_compared == 20000
    assert abs(d.changed_share - (1 - sum(p * p for p in shares))) < 0.02
    assert d.psi < 0.01  # same shares by construction
