"""The segment tree in Spark: every user placed down it as numpy would, its stored rows."""

from __future__ import annotations

import numpy as np

from seqclust.segment.hierarchy import SplitRule, Tree, grow
from seqclust.segment.leaves import node_sizes, place, tree_rows

RULE = SplitRule(min_users=100, min_child_users=30, k_max=4, min_gap=0.1, null_draws=2, n_init=3, pca_dim=6)


def _nested(rng):
    flat = rng.normal(0, 1.0, (240, 6))
    sub_centres = np.array([[0, 0, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0], [3, 5, 0, 0, 0, 0]], dtype=float)
    y = np.repeat(np.arange(3), 100)
    nested = rng.normal(0, 1.0, (300, 6)) + sub_centres[y] + np.array([0, 0, 40.0, 0, 0, 0])
    X = np.vstack([flat, nested])
    top = np.r_[np.zeros(240, int), np.ones(300, int)]
    return X, top


def test_place_puts_every_user_where_descend_does(spark):
    rng = np.random.default_rng(0)
    X, top = _nested(rng)
    tree = grow(X, top, np.stack([X[top == 0].mean(0), X[top == 1].mean(0)]), RULE, 3)
    assert len(tree.leaf_nodes) == 4  # the nested segment split in three
    users = spark.createDataFrame(
        [(f"u{i:04d}", [float(v) for v in X[i]], int(top[i])) for i in range(len(X))], "entity_id string, emb array<double>, cluster_id int"
    )
    got = place(users, tree).orderBy("entity_id").toPandas()
    node, d2, top_conf, leaf_conf = tree.place(X, top)
    assert list(got["leaf_id"]) == list(tree.leaf_id[node])
    assert np.allclose(got["top_confidence"], top_conf) and np.allclose(got["leaf_confidence"], leaf_conf)
    # the flat segment's users are as sure of their leaf as of their top segment; the split one's less
    flat = (got["cluster_id"] == 0).to_numpy()
    assert np.allclose(got.loc[flat, "leaf_confidence"], got.loc[flat, "top_confidence"])
    assert (got.loc[~flat, "leaf_confidence"] < got.loc[~flat, "top_confidence"]).mean() > 0.9
    assert list(got["segment_path"]) == [tree.paths[i] for i in node]
    assert np.allclose(got["leaf_distance"], np.sqrt(d2))
    assert set(got.loc[got["cluster_id"] == 0, "segment_path"]) == {"0"}
    assert all(p.startswith("1.") for p in got.loc[got["cluster_id"] == 1, "segment_path"])
    assert got["leaf_id"].nunique() == 4  # every user once, in one of the four leaves


def test_the_tree_round_trips_through_its_centroid_rows_with_sizes_summed_up():
    rng = np.random.default_rng(1)
    X, top = _nested(rng)
    tree = grow(X, top, np.stack([X[top == 0].mean(0), X[top == 1].mean(0)]), RULE, 3)
    node, _ = tree.descend(X, top)
    leaf_counts = {int(tree.leaf_id[n]): int((node == n).sum()) for n in tree.leaf_nodes}
    sizes = node_sizes(tree, leaf_counts)
    assert sizes["0"] == 240 and sizes["1"] == 300 and sum(sizes[tree.paths[n]] for n in tree.leaf_nodes) == 540
    rows = tree_rows(tree, sizes)
    assert [r[1] for r in rows] == ["tree"] * len(tree.paths) and [r[0] for r in rows] == list(range(len(tree.paths)))
    back = Tree.from_rows([(r[4], r[2]) for r in rows])
    assert back.paths == tree.paths and list(back.parent) == list(tree.parent) and np.allclose(back.centers, tree.centers)
    assert list(back.descend(X, top)[0]) == list(node)
