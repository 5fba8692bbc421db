"""Segments refined by token likelihood: the per-segment distributions against scikit-learn's
multinomial naive Bayes, the Spark passes against the in-memory oracle, recovery of a planted
mixture from a damaged start, and the stored segments reproducing the assignment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse
from sklearn.metrics import adjusted_rand_score

from seqclust.segment import refine

TOKENS = tuple(
    [f"t:{a}" for a in "abcdef"] + [f"t:{a}>{b}" for a in "ab" for b in "abc"] + [f"s:L{i}" for i in range(4)] + ["s:Ob", "s:On"]
)


def planted(users: int, k: int, seed: int, short: float = 0.4):
    """Users of ``k`` personas, each a multinomial per token field; ``short`` of them have
    only a few tokens (the users k-means on vectors gets wrong most)."""
    rng = np.random.default_rng(seed)
    fields = refine.field_ids(TOKENS)
    y = rng.integers(0, k, users)
    probs = np.zeros((k, len(TOKENS)))
    for f in np.unique(fields):
        m = np.nonzero(fields == f)[0]
        probs[:, m] = rng.dirichlet(np.full(len(m), 0.7), size=k)
    X = np.zeros((users, len(TOKENS)))
    for u in range(users):
        n = 3 if rng.random() < short else 25
        for f in np.unique(fields):
            m = np.nonzero(fields == f)[0]
            X[u, m] = rng.multinomial(n, probs[y[u], m])
    return sparse.csr_matrix(X), y, fields


def damaged(y: np.ndarray, k: int, share: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = y.copy()
    hit = rng.random(len(y)) < share
    out[hit] = rng.integers(0, k, int(hit.sum()))
    return out


def test_a_token_field_is_its_prefix_and_ngram_order():
    assert refine.field_of("t:view") == "t:0"
    assert refine.field_of("t:view>cart>view") == "t:2"
    assert refine.field_of("j:view:p1:g2>cart:p1:g3") == "j:1"
    assert refine.field_of("s:L2") == "s:L" and refine.field_of("s:Ob3") == "s:O"
    ids = refine.field_ids(["t:a", "t:a>b", "t:b", "s:L1", "s:W0"])
    assert list(ids) == [0, 1, 0, 2, 3]


def test_segment_distributions_equal_multinomial_naive_bayes_per_field():
    from sklearn.naive_bayes import MultinomialNB

    X, y, fields = planted(300, 3, seed=1)
    segs = refine._segments_of(X, y, 3, fields, alpha=0.7)
    for f in np.unique(fields):
        m = fields == f
        nb = MultinomialNB(alpha=0.7).fit(X[:, m], y)
        np.testing.assert_allclose(segs.logp[:, m], nb.feature_log_prob_, rtol=1e-12)
        np.testing.assert_allclose(np.exp(segs.logp[:, m]).sum(axis=1), 1.0)
    np.testing.assert_allclose(segs.log_prior, nb.class_log_prior_, rtol=1e-12)


def test_an_empty_segment_is_never_chosen_and_survives_the_round_trip():
    X, y, fields = planted(200, 3, seed=2)
    y = np.where(y == 2, 0, y)  # segment 2 empty
    segs = refine._segments_of(X, y, 3, fields, alpha=1.0)
    assert segs.log_prior[2] == -np.inf
    back = refine.TokenSegments.from_rows([r[2] for r in segs.rows(np.bincount(y, minlength=3))])
    assert back.log_prior[2] == -np.inf
    np.testing.assert_allclose(back.logp, segs.logp)
    coo = X.tocoo()
    best, _ = refine.score(coo.col, coo.data, coo.row, X.shape[0], back)
    assert 2 not in set(best)


def test_refinement_recovers_a_planted_mixture_from_damaged_segments():
    X, y, fields = planted(900, 4, seed=3)
    start = damaged(y, 4, 0.35, seed=4)
    labels, _, passes = refine.fit_local(X, start, 4, fields)
    assert adjusted_rand_score(y, start) < 0.6
    assert adjusted_rand_score(y, labels) > 0.9, adjusted_rand_score(y, labels)
    assert 1 <= passes <= 10


def test_spark_refinement_equals_the_in_memory_oracle_and_assign_reproduces_it(spark):
    X, y, fields = planted(700, 3, seed=5)
    start = damaged(y, 3, 0.3, seed=6)
    X = X.tolil()
    X[0, :] = 0  # a user without tokens keeps the k-means segment
    X = X.tocsr()
    ids = [f"u{i:04d}" for i in range(X.shape[0])]
    coo = X.tocoo()
    per_user: dict[str, tuple[list, list]] = {}
    for r, c, v in zip(coo.row, coo.col, coo.data):
        per_user.setdefault(ids[r], ([], []))
        per_user[ids[r]][0].append(TOKENS[c])
        per_user[ids[r]][1].append(int(v))
    per_user[ids[1]][0].append("zz:not-in-the-vocabulary")  # dropped
    per_user[ids[1]][1].append(3)
    counts = spark.createDataFrame(
        [(u, t, n) for u, (t, n) in per_user.items()], "user_id string, tokens array<string>, n array<long>"
    ).repartition(3)
    labels0 = spark.createDataFrame([(u, int(c)) for u, c in zip(ids, start)], "entity_id string, cluster_id int").repartition(2)
    lists = refine.token_lists(counts, TOKENS)
    got = refine.refine(labels0, lists, 3, TOKENS, alpha=1.0, max_iter=10, tol=0.001)
    spark_labels = dict(got.labels.select("entity_id", "cluster_id").collect())
    want, want_segs, passes = refine.fit_local(X, start, 3, fields, alpha=1.0, max_iter=10, tol=0.001)
    assert [spark_labels[u] for u in ids] == list(want)
    assert got.passes == passes
    np.testing.assert_allclose(got.segments.logp, want_segs.logp, rtol=1e-12)
    assert spark_labels[ids[0]] == start[0]
    assert got.moved == int((want != start).sum()) > 0
    assert adjusted_rand_score(y, want) > adjusted_rand_score(y, start) + 0.2
    # the stored rows (centroids, method tokens) assign the same users the same way
    rows = got.segments.rows(np.bincount(want, minlength=3))
    stored = refine.TokenSegments.from_rows([r[2] for r in rows])
    again = dict(refine.assign(refine.with_tokens(labels0, lists), stored).select("entity_id", "cluster_id").collect())
    assert again == spark_labels


def test_an_unknown_refine_setting_is_refused():
    from seqclust.core.config import ClusterConfig
    from seqclust.core.errors import ConfigError

    with pytest.raises(ConfigError, match="refine"):
        ClusterConfig(refine="em")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="refine_alpha"):
        ClusterConfig(refine_alpha=0)
