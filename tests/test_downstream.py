"""Downstream metrics: exact HitRate/NDCG@N against a plain-Python oracle."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest

from seqclust.evaluate.downstream import STRATEGIES, bootstrap_means, nearest_centroid, split_history, user_scores

T0 = dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc)


def _mean_vectors(s):
    """A user's vector: the mean of their sessions' 2-d ``v`` (the history_vectors contract)."""
    from pyspark.sql import functions as F

    return (
        s.groupBy("user_id")
        .agg(F.array(F.avg(F.col("v")[0]), F.avg(F.col("v")[1])).alias("embedding"))
        .withColumnRenamed("user_id", "entity_id")
    )


def _oracle(recs, target, n):
    top = recs[:n]
    hit = float(any(x in target for x in top))
    dcg = sum(1 / math.log2(i + 2) for i, x in enumerate(top) if x in target)
    idcg = sum(1 / math.log2(i + 2) for i in range(min(len(target), n)))
    return hit, (dcg / idcg if idcg else 0.0)


def test_user_scores_match_a_python_oracle(spark):
    rng = np.random.default_rng(3)
    cats = [f"c{i}" for i in range(12)]
    rows, assign = [], {}
    for u in range(30):
        assign[f"u{u}"] = u % 3
        for s in range(int(rng.integers(1, 5))):
            # users prefer categories near their cluster's block: segments carry signal
            pool = cats[(u % 3) * 4 : (u % 3) * 4 + 5]
            seq = [str(x) for x in rng.choice(pool + cats, size=int(rng.integers(1, 6)))]
            rows.append((f"s{u}-{s}", f"u{u}", T0 + dt.timedelta(days=s, hours=u), seq))
    sessions = spark.createDataFrame(rows, "session_id string, user_id string, start_ts timestamp, categories array<string>")
    history, target = split_history(sessions)
    a = spark.createDataFrame(list(assign.items()), "user_id string, cluster_id int")
    n = 3
    got = {r["user_id"]: r for r in user_scores(history, target, a, "categories", n).collect()}

    # oracle
    by_user = {}
    for sid, u, ts, seq in rows:
        by_user.setdefault(u, []).append((ts, sid, seq))
    hist, tgt = {}, {}
    for u, ss in by_user.items():
        if len(ss) < 2:
            continue
        ss.sort(key=lambda x: (x[0], x[1]))
        tgt[u] = set(ss[-1][2])
        hist[u] = [c for _, _, seq in ss[:-1] for c in seq]

    def top(counter_items, m=n):
        return [x for x, _ in sorted(counter_items, key=lambda kv: (-kv[1], kv[0]))][:m]

    from collections import Counter

    # fill lists are 2n long, so a fill reaches n even when the user's own values come first
    glob = top(Counter(c for h in hist.values() for c in h).items(), 2 * n)
    clus = {k: top(Counter(c for u, h in hist.items() if assign[u] == k for c in h).items(), 2 * n) for k in range(3)}
    assert set(got) == set(hist)
    for u in hist:
        own = top(Counter(hist[u]).items())
        lists = {
            "global": glob[:n],
            "cluster": clus[assign[u]][:n],
            "own": own,
            "own_cluster_fill": list(dict.fromkeys(own + clus[assign[u]]))[:n],
            "own_global_fill": list(dict.fromkeys(own + glob))[:n],
        }
        for s in STRATEGIES:
            hit, ndcg = _oracle(lists[s], tgt[u], n)
            assert got[u][f"hit_{s}"] == hit, (u, s)
            assert got[u][f"ndcg_{s}"] == pytest.approx(ndcg, abs=1e-12), (u, s)


def test_nearest_centroid_and_bootstrap(spark):
    df = spark.createDataFrame([("a", [0.9, 0.1]), ("b", [0.1, 0.95]), ("c", [-1.0, 0.0])], "user_id string, embedding array<double>")
    got = {r["user_id"]: r["cluster_id"] for r in nearest_centroid(df, [[0.0, 1.0], [1.0, 0.0], [-1.0, 0.1]]).collect()}
    assert got == {"a": 1, "b": 0, "c": 2}

    for n in (1000, 20000):  # fewer users than buckets, and many users per bucket
        vals = np.r_[np.ones(3 * n // 10), np.zeros(7 * n // 10)]
        scores = spark.createDataFrame([(f"u{i}", float(v)) for i, v in enumerate(vals)], "user_id string, x double")
        res_all, n_rows = bootstrap_means(scores, ["x"], seed=1, replicates=400)
        res = res_all["x"]
        assert n_rows == n
        se = math.sqrt(0.3 * 0.7 / n)
        assert res.value == pytest.approx(0.3)
        assert res.low < 0.3 < res.high
        assert 3.0 * se < res.high - res.low < 4.8 * se, n  # 2 x 1.96 standard errors = 3.92 se
        # a function of the data and the seed: the same interval on another partitioning
        again = bootstrap_means(scores.repartition(5), ["x"], seed=1, replicates=400)[0]["x"]
        assert (again.low, again.high) == pytest.approx((res.low, res.high), abs=1e-12)


def test_conversion_auc_and_lift_match_scikit_learn_and_a_python_oracle(spark):
    from sklearn.metrics import roc_auc_score

    from seqclust.evaluate.downstream import _auc_and_lift, conversion_rows

    rng = np.random.default_rng(3)
    users = [f"u{i}" for i in range(400)]
    seg = {u: int(rng.integers(0, 4)) for u in users}
    t0 = dt.datetime(2026, 10, 1)
    rows = []
    for u in users:
        p = 0.1 + 0.2 * seg[u]  # segments differ in how often they buy
        for j in range(int(rng.integers(2, 5))):
            buys = int(rng.random() < p)
            rows.append((u, f"{u}-{j}", t0 + dt.timedelta(days=j), {"view": 3, "purchase": buys}))
    sessions = spark.createDataFrame(rows, "user_id string, session_id string, start_ts timestamp, event_counts map<string,int>")
    history, target = split_history(sessions)
    assign = spark.createDataFrame([(u, seg[u]) for u in users], "user_id string, cluster_id int")
    out = {r.metric: r for r in conversion_rows(history, target, [("encoder", assign)], seed=1, replicates=50)}
    # oracle: the segment's history conversion per session, each user's next session
    last = {}
    for u, sid, ts, ec in rows:
        if u not in last or ts > last[u][0]:
            last[u] = (ts, ec["purchase"] > 0, sid)
    rate_n, rate_d = np.zeros(4), np.zeros(4)
    for u, sid, _ts, ec in rows:
        if sid != last[u][2]:
            rate_n[seg[u]] += ec["purchase"] > 0
            rate_d[seg[u]] += 1
    rate = rate_n / rate_d
    y = np.array([last[u][1] for u in users], dtype=int)
    score = np.array([rate[seg[u]] for u in users])
    assert out["conversion_auc"].value == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    above = score > score.mean()
    assert out["conversion_lift"].value == pytest.approx(y[above].mean() / y.mean(), rel=1e-9)
    assert out["conversion_auc"].ci_low < out["conversion_auc"].value < out["conversion_auc"].ci_high
    assert out["conversion_auc"].value > 0.6  # the planted difference is found
    # ties inside and across segments, checked against scikit-learn directly
    s, pos, neg = np.array([0.2, 0.2, 0.5]), np.array([3.0, 1.0, 4.0]), np.array([5.0, 2.0, 1.0])
    yy = np.repeat([1, 0, 1, 0, 1, 0], [3, 5, 1, 2, 4, 1])
    ss = np.repeat([0.2, 0.2, 0.2, 0.2, 0.5, 0.5], [3, 5, 1, 2, 4, 1])
    assert _auc_and_lift(s, pos, neg)[0] == pytest.approx(roc_auc_score(yy, ss))


def test_temporal_stability_against_a_python_oracle(spark):
    from sklearn.metrics import adjusted_rand_score

    from seqclust.evaluate.downstream import temporal_stability_rows

    rng = np.random.default_rng(4)
    centroids = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]
    rows, first_seg, second_seg = [], {}, {}
    t0 = dt.datetime(2026, 10, 1)
    for i in range(300):
        u = f"u{i}"
        home = int(rng.integers(0, 3))
        moved = rng.random() < 0.2  # a fifth of the users change segment half-way
        late = (home + 1) % 3 if moved else home
        n = int(rng.integers(2, 7))
        for j in range(n):
            c = home if j < n // 2 else late
            rows.append((u, f"{u}-{j}", t0 + dt.timedelta(days=j), [centroids[c][0] + rng.normal(), centroids[c][1] + rng.normal()]))
        first_seg[u], second_seg[u] = home, late
    sessions = spark.createDataFrame(rows, "user_id string, session_id string, start_ts timestamp, v array<double>")

    out = {(r.method, r.metric): r for r in temporal_stability_rows(sessions, _mean_vectors, centroids, [1 / 3] * 3, seed=2, replicates=50)}
    users = sorted(first_seg)
    want = adjusted_rand_score([first_seg[u] for u in users], [second_seg[u] for u in users])
    assert out[("encoder", "temporal_ari")].value == pytest.approx(want, abs=1e-9)
    assert out[("encoder", "temporal_same_segment")].value == pytest.approx(np.mean([first_seg[u] == second_seg[u] for u in users]))
    assert abs(out[("random", "temporal_ari")].value) < 0.05
    r = out[("encoder", "temporal_ari")]
    assert r.ci_low < r.value < r.ci_high and r.ci_low > out[("random", "temporal_ari")].ci_high


def test_return_within_n_days_against_a_python_oracle(spark):
    """Segments whose users come back often get a high return rate from history; the AUC of
    that rate for 'returns within 7 days after the cutoff' matches scikit-learn on a plain
    Python computation of the same split, and the random segments do not find it."""
    from pyspark.sql import functions as F
    from sklearn.metrics import roc_auc_score

    from seqclust.evaluate.downstream import return_rows

    rng = np.random.default_rng(5)
    centroids = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]
    mean_gap = [1.5, 6.0, 20.0]  # days between sessions: frequent, weekly, rare
    t0 = dt.datetime(2026, 8, 1)
    rows, seg = [], {}
    for i in range(450):
        u, c = f"u{i}", i % 3
        seg[u] = c
        t = t0 + dt.timedelta(days=float(rng.uniform(0, 20)))
        j = 0
        while t < t0 + dt.timedelta(days=70):
            rows.append((u, f"{u}-{j}", t, [centroids[c][0] + rng.normal(), centroids[c][1] + rng.normal()]))
            t += dt.timedelta(days=float(rng.exponential(mean_gap[c])) + 0.01)
            j += 1
    sessions = spark.createDataFrame(rows, "user_id string, session_id string, start_ts timestamp, v array<double>")

    out = {(r.method, r.metric): r for r in return_rows(sessions, _mean_vectors, centroids, [1 / 3] * 3, seed=3, days=7, replicates=50)}
    # oracle: the same split in plain Python (Spark timestamps are session-local; compare as epoch seconds)
    ts = {sid: t for _u, sid, t, _v in rows}
    epoch = {
        sid: r["s"]
        for sid, r in ((r["session_id"], r) for r in sessions.select("session_id", F.col("start_ts").cast("double").alias("s")).collect())
    }
    assert len(epoch) == len(ts)
    by_user: dict[str, list[float]] = {}
    for u, sid, _t, _v in rows:
        by_user.setdefault(u, []).append(epoch[sid])
    week = 7 * 86400.0
    cutoff = max(epoch.values()) - week
    num, den = np.zeros(3), np.zeros(3)
    users, y = [], []
    for u, starts in by_user.items():
        starts = sorted(starts)
        before = [s for s in starts if s < cutoff]
        if not before:
            continue
        for a, b in zip(before, before[1:] + [None]):
            if a < cutoff - week:
                num[seg[u]] += b is not None and b - a <= week
                den[seg[u]] += 1
        users.append(u)
        y.append(int(any(cutoff <= s < cutoff + week for s in starts)))
    rate = num / den
    score = np.array([rate[seg[u]] for u in users])
    y = np.array(y)
    r = out[("encoder", "return_auc")]
    assert r.value == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    above = score > score.mean()
    assert out[("encoder", "return_lift")].value == pytest.approx(y[above].mean() / y.mean(), rel=1e-9)
    assert r.value > 0.7 and r.ci_low > out[("random", "return_auc")].ci_high
    assert abs(out[("random", "return_auc")].value - 0.5) < 0.1
    # a handful of returners is not measured: only sessions of a few users after the cutoff
    few = sorted(by_user, key=lambda u: max(by_user[u]))[-5:]  # the last five users to be seen
    thin = sessions.where((F.col("start_ts").cast("double") < cutoff - week) | F.col("user_id").isin(*few))
    assert return_rows(thin, _mean_vectors, centroids, [1 / 3] * 3, seed=3, days=7) == []
    # a log shorter than two windows is skipped, not mis-measured
    short = sessions.where(F.col("start_ts") < F.lit(t0 + dt.timedelta(days=10)))
    assert return_rows(short, _mean_vectors, centroids, [1 / 3] * 3, seed=3, days=7) == []


def test_fine_segments_are_assigned_in_the_same_pass_and_scored_like_the_personas(spark):
    """With the same centres as fine segments, method ``fine`` must read exactly what method
    ``encoder`` reads (both are now assigned in one pass over the history vectors)."""
    from seqclust.evaluate.downstream import evaluate_downstream

    rng = np.random.default_rng(8)
    centroids = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]
    rows = []
    for i in range(90):
        home = i % 3
        for j in range(3):
            v = [centroids[home][0] + rng.normal(), centroids[home][1] + rng.normal()]
            rows.append((f"u{i}", f"u{i}-{j}", T0 + dt.timedelta(days=j), v, [f"c{home}{int(rng.integers(0, 4))}"], {"view": 1}))
    sessions = spark.createDataFrame(
        rows,
        "user_id string, session_id string, start_ts timestamp, v array<double>, categories array<string>, event_counts map<string,int>",
    )
    out = evaluate_downstream(
        sessions, _mean_vectors, centroids, [1 / 3] * 3, seed=1, fields=("categories",), replicates=20, fine_centroids=centroids
    )
    by = {(r.method, r.metric): r.value for r in out}
    fine = {m: v for (meth, m), v in by.items() if meth == "fine"}
    assert fine and all(by[("encoder", m)] == v for m, v in fine.items())
    assert by[("encoder", "hitrate@10_categories_cluster")] > by[("random", "hitrate@10_categories_cluster")]
