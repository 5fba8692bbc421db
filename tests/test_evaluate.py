import numpy as np
import pytest
from pyspark.sql import functions as F
from sklearn import metrics as skm
from sklearn.datasets import make_blobs

from seqclust.core.sampling import bootstrap_ci
from seqclust.evaluate.baseline import random_assignment
from seqclust.evaluate.metrics import contingency, external_scores
from seqclust.evaluate.stage import internal_scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_external_scores_match_sklearn(spark, seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 5, 400)
    pred = np.where(rng.random(400) < 0.7, truth, rng.integers(0, 7, 400))
    df = spark.createDataFrame([(f"l{t}", int(p)) for t, p in zip(truth, pred)], "label string, cluster_id int")
    got = external_scores(contingency(df, "label", "cluster_id"))
    expected = {
        "ari": skm.adjusted_rand_score(truth, pred),
        "nmi": skm.normalized_mutual_info_score(truth, pred),
        "homogeneity": skm.homogeneity_score(truth, pred),
        "completeness": skm.completeness_score(truth, pred),
        "v_measure": skm.v_measure_score(truth, pred),
    }
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_contingencies_of_several_columns_from_one_job_equal_each_contingency(spark):
    from seqclust.evaluate.metrics import contingencies

    rng = np.random.default_rng(5)
    rows = [
        (f"l{rng.integers(0, 4)}", int(rng.integers(0, 3)), int(rng.integers(0, 5)), None if i % 7 == 0 else int(rng.integers(0, 2)))
        for i in range(300)
    ]
    df = spark.createDataFrame(rows, "label string, a int, b int, c int")
    got = contingencies(df, "label", ["a", "b", "c"])
    assert set(got) == {"a", "b", "c"}
    from sklearn.metrics.cluster import contingency_matrix

    for i, col in enumerate(("a", "b", "c"), start=1):
        kept = [r for r in rows if r[i] is not None]  # nulls do not count for their column
        want = contingency_matrix([r[0] for r in kept], [r[i] for r in kept])  # rows: sorted labels, columns: sorted clusters
        assert np.array_equal(got[col], want), col
        assert np.array_equal(contingency(df.where(F.col(col).isNotNull()), "label", col), want), col
    assert got["c"].sum() == sum(1 for r in rows if r[3] is not None) and got["a"].sum() == 300


def test_evaluation_sample_keeps_the_same_users_in_every_table_and_leaves_the_baseline_draws_alone(spark):
    from seqclust.core.sampling import user_sample

    users = spark.range(20000).select(F.concat(F.lit("u"), F.col("id").cast("string")).alias("entity_id"))
    sessions = users.select(F.col("entity_id").alias("user_id")).crossJoin(spark.range(2).select(F.col("id").alias("s")))
    assert user_sample(20000, 25000, 3)(users, "entity_id") is users  # below the limit: everyone
    keep = user_sample(20000, 4000, 3)
    kept = {r["entity_id"] for r in keep(users, "entity_id").collect()}
    assert 3600 < len(kept) < 4400
    assert {r["user_id"] for r in keep(sessions, "user_id").collect()} == kept  # the same users, any table
    # the sample hashes on its own stream: the random baseline drawn with the run's seed still
    # fills every segment in its shares among the kept users (the same stream would put them all in one)
    counts = {
        r["random_id"]: r["count"]
        for r in random_assignment(keep(users, "entity_id"), [0.5, 0.5], seed=3).groupBy("random_id").count().collect()
    }
    assert set(counts) == {0, 1} and counts[0] / len(kept) == pytest.approx(0.5, abs=0.04)


def test_external_scores_degenerate_cases():
    assert external_scores(np.array([[5]]))["ari"] == 1.0
    assert external_scores(np.array([[5]]))["nmi"] == 1.0
    one_cluster = external_scores(np.array([[3], [4]]))
    assert one_cluster["ari"] == pytest.approx(skm.adjusted_rand_score([0] * 3 + [1] * 4, [0] * 7))
    assert one_cluster["homogeneity"] == pytest.approx(0.0)


def test_internal_scores_match_sklearn(spark):
    X, _ = make_blobs(n_samples=600, centers=4, n_features=5, random_state=1)
    labels = np.random.default_rng(0).integers(0, 4, 600)
    labels[:300] = _[:300]  # half true, half noise: not a trivial clustering
    df = spark.createDataFrame([(x.tolist(), int(c)) for x, c in zip(X, labels)], "emb array<double>, cluster_id int")
    got = internal_scores(df)
    assert got["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(X, labels), rel=1e-9)
    assert got["calinski_harabasz"] == pytest.approx(skm.calinski_harabasz_score(X, labels), rel=1e-9)
    # Spark's silhouette uses squared Euclidean distance (sklearn's default is Euclidean)
    assert got["silhouette"] == pytest.approx(skm.silhouette_score(X, labels, metric="sqeuclidean"), abs=1e-6)
    assert got["silhouette_cosine"] == pytest.approx(skm.silhouette_score(X, labels, metric="cosine"), abs=1e-6)
    centroids = np.stack([X[labels == c].mean(axis=0) for c in range(4)])
    assert got["inertia"] == pytest.approx(((X - centroids[labels]) ** 2).sum(), rel=1e-9)


def test_random_assignment_keeps_the_size_distribution_on_any_partitioning(spark):
    df = spark.range(20000).select(F.col("id").cast("string").alias("entity_id"))
    counts = {r["random_id"]: r["count"] for r in random_assignment(df, [0.5, 0.3, 0.2], seed=1).groupBy("random_id").count().collect()}
    assert set(counts) == {0, 1, 2}
    assert counts[0] / 20000 == pytest.approx(0.5, abs=0.02)
    assert counts[2] / 20000 == pytest.approx(0.2, abs=0.02)

    def assign(d):
        return {r["entity_id"]: r["random_id"] for r in random_assignment(d, [0.5, 0.3, 0.2], seed=1).collect()}

    assert assign(df.repartition(1)) == assign(df.repartition(7).orderBy(F.desc("entity_id")))
    other_seed = {r["entity_id"]: r["random_id"] for r in random_assignment(df, [0.5, 0.3, 0.2], seed=2).collect()}
    assert sum(other_seed[u] == c for u, c in assign(df).items()) < 0.5 * 20000  # seeds give independent draws


def test_bag_of_events_vocabulary_and_vectors_do_not_depend_on_partitioning(spark):
    from seqclust.evaluate.baseline import _vocabulary, bag_of_events

    rng = np.random.default_rng(1)
    toks = [f"view:c{i}" for i in range(30)]
    rows = [(f"u{i}", list(rng.choice(toks, 5))) for i in range(200)]
    sessions = spark.createDataFrame(rows, "user_id string, tokens array<string>")
    # ties in count are broken by token, so the cut at vocab_size is well defined
    users = sessions.groupBy("user_id").agg(F.flatten(F.collect_list("tokens")).alias("tokens"))
    vocab = _vocabulary(users, 12, 1)
    counts = {}
    for _, t in rows:
        for x in t:
            counts[x] = counts.get(x, 0) + 1
    assert vocab == sorted(counts, key=lambda x: (-counts[x], x))[:12]

    def vecs(d):
        return {r["entity_id"]: np.array(r["emb"]) for r in bag_of_events(d, vocab_size=12, min_df=1, pca_dim=4).collect()}

    a, b = vecs(sessions.repartition(1)), vecs(sessions.repartition(5).orderBy(F.rand(3)))
    assert a.keys() == b.keys() and max(np.abs(a[u] - b[u]).max() for u in a) < 1e-9


def test_bag_of_events_is_tfidf_l2_per_user(spark):
    from seqclust.evaluate.baseline import bag_of_events

    sessions = spark.createDataFrame(
        [("u1", ["view:a", "view:a", "cart:b"]), ("u1", ["view:a"]), ("u2", ["cart:b", "view:c"]), ("u3", ["view:c", "view:a"])],
        "user_id string, tokens array<string>",
    )
    out = {r["entity_id"]: np.array(r["emb"]) for r in bag_of_events(sessions, vocab_size=10, min_df=1).collect()}
    assert set(out) == {"u1", "u2", "u3"}
    for v in out.values():
        assert np.linalg.norm(v) == pytest.approx(1.0)
    # u1: 3 x view:a and 1 x cart:b; idf(t) = ln((n + 1) / (df(t) + 1)) with n = 3 users
    idf_a, idf_b = np.log(4 / 3), np.log(4 / 3)
    expected = np.array([3 * idf_a, 1 * idf_b])
    expected /= np.linalg.norm(expected)
    assert sorted(out["u1"][out["u1"] > 0]) == pytest.approx(sorted(expected))


def test_bag_of_events_with_pca_is_reduced_and_normalised(spark):
    from seqclust.evaluate.baseline import bag_of_events

    rng = np.random.default_rng(0)
    toks = [f"view:c{i}" for i in range(12)]
    rows = [(f"u{i}", list(rng.choice(toks, 6))) for i in range(40)]
    out = bag_of_events(spark.createDataFrame(rows, "user_id string, tokens array<string>"), vocab_size=12, min_df=1, pca_dim=3).collect()
    assert len(out) == 40
    for r in out:
        assert len(r["emb"]) == 3 and np.linalg.norm(r["emb"]) == pytest.approx(1.0)


def test_bootstrap_ci_brackets_the_mean():
    mean, lo, hi = bootstrap_ci([0.8, 0.9, 1.0, 0.7], seed=1)
    assert mean == pytest.approx(0.85) and lo < mean < hi and 0.7 <= lo and hi <= 1.0
    assert bootstrap_ci([0.5]) == (0.5, 0.5, 0.5)


def test_choose_k_rule():
    from seqclust.segment.cluster import choose_k

    sweep = [
        {"k": 2, "silhouette": 0.40, "stability": 0.95},
        {"k": 3, "silhouette": 0.30, "stability": 0.99},  # most stable but far below the best silhouette
        {"k": 4, "silhouette": 0.37, "stability": 0.97},  # within 10% and more stable than k=2
        {"k": 5, "silhouette": 0.41, "stability": 0.60},
    ]
    assert choose_k(sweep, "silhouette", 0.1)[0] == 5
    k, rule = choose_k(sweep, "stability", 0.1)
    assert k == 4 and "within 10%" in rule
    assert choose_k(sweep, "stability", 0.0)[0] == 5
    # parsimonious: the smallest k within the tolerance (2 here: 0.40 >= 0.41 * 0.9)
    assert choose_k(sweep, "parsimonious", 0.1)[0] == 2


def curve(peaks: dict[int, float], ks=range(2, 13), base: float = 0.10) -> list[dict]:
    """A synthetic sweep: silhouette ``base`` plus the given bumps."""
    return [{"k": k, "silhouette": base + peaks.get(k, 0.0), "stability": 0.9} for k in ks]


@pytest.mark.parametrize(
    "peaks, want, runner_up",
    [
        ({6: 0.15, 5: 0.08, 7: 0.09}, 6, None),  # a clear peak
        ({2: 0.05, 7: 0.20}, 7, None),  # a low k=2 bump does not win against a clear peak
        ({4: 0.140, 5: 0.145}, 4, None),  # adjacent near-ties: the smaller, and not uncertain
        ({8: 0.150, 9: 0.148, 10: 0.151}, 8, 10),  # a plateau: its smallest k, the far end reported
    ],
)
def test_parsimonious_k_rule_on_curves_with_known_answers(peaks, want, runner_up):
    from seqclust.segment.cluster import select_k

    c = select_k(curve(peaks), "parsimonious", 0.05)
    assert c.k == want and c.uncertain == (runner_up is not None) and c.runner_up == runner_up


def test_flat_or_two_peaked_curves_report_k_uncertain_with_the_runner_up():
    from seqclust.segment.cluster import select_k

    flat = select_k(curve({}, base=0.2), "parsimonious", 0.05)
    assert flat.k == 2 and flat.uncertain and flat.runner_up is not None and "k uncertain" in flat.rule
    two = select_k(curve({3: 0.150, 9: 0.152}), "parsimonious", 0.05)
    assert two.k == 3 and two.uncertain and two.runner_up == 9
    # every rule reports its runner-up
    assert select_k(curve({3: 0.150, 9: 0.152}), "silhouette", 0.05).runner_up == 3


def test_stability_is_high_for_separated_blobs_and_lower_for_noise():
    from seqclust.core.config import ClusterConfig
    from seqclust.segment.cluster import stability
    from seqclust.segment.scores import local_kmeans

    cfg = ClusterConfig(stability_runs=3, max_iter=20)
    X, _ = make_blobs(n_samples=400, centers=3, n_features=4, cluster_std=0.3, random_state=0)
    noise = np.random.default_rng(0).normal(size=(400, 4))
    scores = {}
    for name, data in (("blobs", X), ("noise", noise)):
        labels = local_kmeans(data, 3, 1, 1, cfg.max_iter).labels_
        scores[name] = np.mean(stability(data, labels, 3, 1, cfg))
    assert scores["blobs"] > 0.99
    assert scores["noise"] < 0.9 * scores["blobs"]


def test_driver_silhouette_matches_sklearn_and_spark(spark):
    """The sweep's O(n·k) silhouette is the exact squared-Euclidean silhouette: equal to
    scikit-learn's O(n^2) one and to Spark's ClusteringEvaluator, singletons included."""
    from pyspark.ml.functions import array_to_vector
    from sklearn.metrics import silhouette_score

    from seqclust.segment.cluster import silhouette
    from seqclust.segment.scores import silhouette_sq

    X, _ = make_blobs(n_samples=300, centers=4, n_features=5, cluster_std=1.5, random_state=3)
    labels = np.random.default_rng(1).integers(0, 4, 300)
    labels[7] = 9  # a singleton cluster
    want = silhouette_score(X, labels, metric="sqeuclidean")
    assert silhouette_sq(X, labels) == pytest.approx(want, abs=1e-9)
    df = spark.createDataFrame([(x.tolist(), int(c)) for x, c in zip(X, labels)], "emb array<double>, cluster_id int")
    assert silhouette(df.withColumn("features", array_to_vector("emb"))) == pytest.approx(want, abs=1e-6)
    good = silhouette_sq(X, _blob_labels(X))
    assert good > silhouette_sq(X, labels) + 0.3  # and it can tell a real clustering from noise


def _blob_labels(X):
    from seqclust.segment.scores import local_kmeans

    return local_kmeans(X, 4, 0, 2, 50).labels_


def test_proxy_labels(spark):
    from seqclust.evaluate.stage import proxy_labels

    sessions = spark.createDataFrame(
        [("u1", {"view": 2, "purchase": 1}, ["b", "a", "a"]), ("u1", {"view": 1}, ["b"]), ("u2", {"view": 2}, ["c", "d"])],
        "user_id string, event_counts map<string,int>, categories array<string>",
    )
    got = {r["entity_id"]: (r["buyer"], r["dominant_category"]) for r in proxy_labels(sessions).collect()}
    # u1: a x2, b x2 -> tie to the smaller name; u2: c/d tie -> c
    assert got == {"u1": ("buyer", "a"), "u2": ("non_buyer", "c")}


def test_k_sweep_on_a_user_sample_then_the_chosen_k_fitted_on_all(spark):
    from pyspark.ml.functions import array_to_vector

    from seqclust.core.config import ClusterConfig
    from seqclust.segment.cluster import sample_vectors, sweep_and_fit

    X, _ = make_blobs(n_samples=900, centers=3, n_features=4, cluster_std=0.4, random_state=2)
    df = spark.createDataFrame([(f"u{i}", x.tolist()) for i, x in enumerate(X)], "entity_id string, emb array<double>")
    users = df.withColumn("features", array_to_vector("emb")).cache()
    cfg = ClusterConfig(stability_runs=1, max_iter=20, sweep_sample=300)
    fit = sweep_and_fit(users, 900, [2, 3, 4], 1, cfg)
    assert fit.k == 3 and "refitted on all 900" in fit.rule and not fit.choice.uncertain
    n_sweep = fit.sweep[0]["sweep_users"]
    assert 240 < n_sweep < 360 and all(r["sweep_users"] == n_sweep for r in fit.sweep)
    # the segments' inertia is over every user, and no worse than MLlib's own fit
    from seqclust.segment.cluster import fit_best, inertia

    assert fit.inertia == pytest.approx(inertia(users, fit.centers), rel=1e-6)
    assert fit.inertia <= fit_best(users, 3, 1, cfg).summary.trainingCost * (1 + 1e-6)
    # the sample is a function of the ids, not of the partitioning, and comes back sorted
    ids1, X1 = sample_vectors(users.repartition(5), 900, 300, 1)
    ids2, X2 = sample_vectors(users.coalesce(1), 900, 300, 1)
    assert list(ids1) == list(ids2) == sorted(ids1) and np.array_equal(X1, X2) and len(ids1) == n_sweep
    # up to sweep_sample users the sweep sees everyone and picks the same k
    fit_all = sweep_and_fit(users, 900, [2, 3, 4], 1, ClusterConfig(stability_runs=1, max_iter=20, sweep_sample=900))
    assert fit_all.k == 3 and fit_all.sweep[0]["sweep_users"] == 900 and "sampled" not in fit_all.rule


def test_assign_nearest_and_inertia_match_numpy(spark):
    from seqclust.segment.cluster import assign_nearest, inertia

    rng = np.random.default_rng(0)
    X, C = rng.normal(size=(50, 3)), rng.normal(size=(4, 3))
    df = spark.createDataFrame([(f"u{i}", x.tolist()) for i, x in enumerate(X)], "entity_id string, emb array<double>")
    got = {r["entity_id"]: (r["cluster_id"], r["distance_to_centroid"]) for r in assign_nearest(df, C.tolist()).collect()}
    d2 = ((X[:, None, :] - C[None]) ** 2).sum(axis=2)
    for i in range(len(X)):
        assert got[f"u{i}"][0] == int(d2[i].argmin()) and got[f"u{i}"][1] == pytest.approx(np.sqrt(d2[i].min()))
    assert inertia(df, C.tolist()) == pytest.approx(d2.min(axis=1).sum())


def test_fit_best_keeps_the_lowest_inertia_of_its_seeded_starts(spark):
    from pyspark.ml.functions import array_to_vector

    from seqclust.core.config import ClusterConfig
    from seqclust.segment.cluster import fit_best, fit_kmeans

    # many overlapping blobs and one k-means|| round: single starts end in different optima
    X, _ = make_blobs(n_samples=600, centers=12, n_features=3, cluster_std=1.0, random_state=4)
    df = spark.createDataFrame([(f"u{i}", x.tolist()) for i, x in enumerate(X)], "entity_id string, emb array<double>")
    users = df.withColumn("features", array_to_vector("emb")).cache()
    cfg = ClusterConfig(init_steps=1, n_init=4, max_iter=20)
    costs = [fit_kmeans(users, 8, 5 + i, cfg).summary.trainingCost for i in range(4)]
    assert max(costs) > min(costs) * 1.001, costs  # the starts really differ
    best = fit_best(users, 8, 5, cfg).summary.trainingCost
    assert best == pytest.approx(min(costs), rel=1e-9)


def test_user_partitions_follow_the_data_not_the_cores():
    from seqclust.core.config import ClusterConfig
    from seqclust.segment.cluster import user_partitions

    cfg = ClusterConfig(rows_per_partition=100_000)
    assert [user_partitions(n, cfg) for n in (1, 21_052, 100_000, 100_001, 2_000_000)] == [1, 1, 1, 2, 20]


def test_personas_fitted_on_multi_session_users_in_principal_components_then_lifted(spark):
    """The fit population is the users with 2+ sessions (20 per k or more), the sweep runs on
    the top principal components, and the segments' centres are the mean stored vector of the
    users nearest each projected centre (a numpy oracle), so every user is assigned in the
    stored space; a population too small to fit on falls back to every user."""
    from pyspark.ml.functions import array_to_vector
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score

    from seqclust.core.config import ClusterConfig
    from seqclust.segment.cluster import Projection, assign_nearest, fit_population, sweep_and_fit

    rng = np.random.default_rng(8)
    k, dim, n = 5, 40, 1500
    centres = np.zeros((k, dim))
    centres[np.arange(k), np.arange(k)] = 4.0  # five personas along five of the 40 axes
    y = rng.integers(0, k, n)
    n_sess = np.where(rng.random(n) < 0.4, 1, rng.integers(2, 6, n))
    noise = np.where(n_sess[:, None] == 1, 1.2, 0.4)
    X = centres[y] + rng.normal(0, 1, (n, dim)) * noise
    df = spark.createDataFrame(
        [(f"u{i:04d}", X[i].tolist(), int(n_sess[i])) for i in range(n)], "entity_id string, emb array<double>, n_sessions long"
    )
    users = df.withColumn("features", array_to_vector("emb")).cache()
    cfg = ClusterConfig(stability_runs=0, max_iter=30, sweep_pca_dim=8, k_max=8)
    ks = list(range(2, 9))
    rich, n_rich, note = fit_population(users, n, ks, cfg)
    assert n_rich == int((n_sess >= 2).sum()) and "users with 2+ sessions" in note
    assert set(r["entity_id"] for r in rich.select("entity_id").collect()) == {f"u{i:04d}" for i in range(n) if n_sess[i] >= 2}
    # too few rich users for the sweep's largest k (20 per k): every user
    assert fit_population(users, n, list(range(2, 60)), cfg)[1] == n
    assert fit_population(users, n, ks, ClusterConfig(fit_min_sessions=1))[1] == n

    fit = sweep_and_fit(rich, n_rich, ks, 3, cfg)
    assert fit.k == k and "principal components" in fit.rule and "lifted" in fit.how
    assert fit.centers.shape == (k, dim)
    # oracle: the same projection and assignment in numpy, then each segment's mean vector
    sel = n_sess >= 2
    comps = PCA(8, random_state=3, svd_solver="full").fit(X[sel]).components_
    proj = Projection(comps)
    P = X[sel] @ comps.T
    # the projected centres are the lifted centres' preimage: recover them from the fit's lift
    lab = assign_nearest(rich.select("entity_id", "emb"), fit.centers.tolist()).select("entity_id", "cluster_id").collect()
    got = {r["entity_id"]: r["cluster_id"] for r in lab}
    ids = [f"u{i:04d}" for i in range(n) if sel[i]]
    z = np.array([got[i] for i in ids])
    assert adjusted_rand_score(y[sel], z) > 0.95
    for c in range(k):  # each lifted centre is close to the mean of its members (assignment in full space agrees)
        assert np.linalg.norm(X[sel][z == c].mean(axis=0) - fit.centers[c]) < 0.1
    # the projection as Spark applies it (a pandas UDF per Arrow batch) is the numpy oracle's
    sp = {r["entity_id"]: r["pemb"] for r in proj.spark(rich.select("entity_id", "emb")).select("entity_id", "pemb").collect()}
    assert np.allclose(np.array([sp[i] for i in ids]), P)
    # every user, one-session ones included, assigned by the lifted centres
    every = assign_nearest(users.select("entity_id", "emb"), fit.centers.tolist()).collect()
    pred = np.array([r["cluster_id"] for r in sorted(every, key=lambda r: r["entity_id"])])
    assert adjusted_rand_score(y, pred) > 0.8
    # the Spark projection equals the numpy one
    sp = {r["entity_id"]: r["pemb"] for r in proj.spark(rich.select("entity_id", "emb")).select("entity_id", "pemb").collect()}
    assert np.allclose(np.array([sp[i] for i in ids]), P, atol=1e-9)


def test_nearest_centre_in_numpy_breaks_ties_to_the_lower_id_and_measures_the_own_centre():
    """The batch kernel behind assign_nearest/distance_to_own (a pandas UDF): scikit-learn's
    pairwise distances as the oracle, exact ties to the lower id, chunks of 1,024 rows."""
    from sklearn.metrics import pairwise_distances

    from seqclust.segment.cluster import nearest_np

    rng = np.random.default_rng(3)
    X, C = rng.normal(size=(2500, 7)), rng.normal(size=(5, 7))
    ids, dist = nearest_np(X, C)
    D = pairwise_distances(X, C)
    assert (ids == D.argmin(axis=1)).all() and np.allclose(dist, D.min(axis=1), rtol=1e-12)
    own = rng.integers(0, 5, size=2500)
    _, d_own = nearest_np(X, C, own)
    assert np.allclose(d_own, D[np.arange(2500), own], rtol=1e-12)
    tie = np.array([[0.0, 0.0]])
    ids, dist = nearest_np(tie, np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
    assert ids.tolist() == [0] and dist.tolist() == [1.0]
