"""Behaviour tokens: the tokens against a plain-Python oracle, the Spark TF-IDF against
scikit-learn's, the artifact round trip."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from seqclust.represent import behaviour
from seqclust.represent.features import EVENT_TYPES, GAP_EDGES, Vocab

VOCAB = Vocab(
    tokens=("view:c1",),
    categories=("c1", "c2"),
    category_median_price=(10.0, 100.0),
    global_median_price=20.0,
    price_edges=(-0.5, 0.0, 0.5),
    max_len=50,
)


def random_sessions(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in behaviour.SESSION_COLUMNS}
    types = ["view", "search", "cart", "fav", "purchase"]
    for i in range(n):
        m = int(rng.integers(0, 9))
        rows["user_id"].append(f"u{i % 7}")
        rows["start_ts"].append(dt.datetime(2026, 10, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=int(rng.integers(0, 24 * 30))))
        rows["event_types"].append([types[j] for j in rng.integers(0, 5, m)])
        rows["categories"].append([None if rng.random() < 0.2 else f"c{int(x)}" for x in rng.integers(1, 4, m)])
        rows["items"].append([None if rng.random() < 0.1 else f"i{int(x)}" for x in rng.integers(0, 4, m)])
        rows["prices"].append([None if rng.random() < 0.2 else float(x) for x in rng.lognormal(3, 1, m)])
        rows["gaps_s"].append([None] + [float(x) for x in rng.exponential(100, max(m - 1, 0))] if m else [])
    return pa.table({**rows, "start_ts": pa.array(rows["start_ts"], pa.timestamp("us", tz="UTC"))})


def oracle_tokens(t: pa.Table, vocab: Vocab, interest: str) -> list[Counter]:
    """Each session's tokens, event by event in plain Python (the definition in the docstring)."""
    med = dict(zip(vocab.categories, vocab.category_median_price))
    out = []
    for r in t.to_pylist():
        c: Counter = Counter()
        ets, n = r["event_types"], len(r["event_types"])
        joint = []
        for i in range(n):
            p = r["prices"][i]
            if p is None or p <= 0:
                band = 1
            else:
                band = (
                    int(np.searchsorted(vocab.price_edges, np.log(p / med.get(r["categories"][i], vocab.global_median_price)), "right")) + 2
                )
            gap = 1 if i == 0 else int(np.searchsorted(GAP_EDGES, r["gaps_s"][i] or 0.0, "right")) + 2
            joint.append(f"{ets[i]}:p{band}:g{gap}")
            c[f"t:{ets[i]}"] += 1
            c[f"j:{joint[i]}"] += 1
            if i >= 1:
                c[f"t:{ets[i - 1]}>{ets[i]}"] += 1
                c[f"j:{joint[i - 1]}>{joint[i]}"] += 1
            if i >= 2:
                c[f"t:{ets[i - 2]}>{ets[i - 1]}>{ets[i]}"] += 1
            v = r["categories"][i] if interest == "category" else r["items"][i]
            if interest != "none" and v:
                c[("c:" if interest == "category" else "i:") + v] += 1
        if n:
            lb = sum(n > e for e in behaviour.LEN_EDGES)
            pace = sum(g or 0.0 for g in r["gaps_s"][1:]) / max(n - 1, 1)
            pb = 0 if n == 1 else sum(pace >= e for e in behaviour.PACE_EDGES) + 1
            o = "b" if "purchase" in ets else ("c" if "cart" in ets else "n")
            items = [x for x in r["items"] if x is not None]
            rv = int(len(items) != len(set(items)))
            ts = r["start_ts"]
            for tok in (f"L{lb}", f"S{pb}", f"O{o}", f"O{o}{lb}", f"R{rv}", f"H{ts.hour // 4}", f"W{int(ts.weekday() >= 5)}"):
                c["s:" + tok] += 1
        out.append(c)
    return out


@pytest.mark.parametrize("interest", ["category", "item", "none"])
def test_session_tokens_match_the_plain_python_definition(interest):
    t = random_sessions(60, seed=3)
    rows, toks = behaviour.session_tokens(t, VOCAB, interest)
    got = [Counter() for _ in range(t.num_rows)]
    for r, tok in zip(rows.tolist(), toks.to_pylist()):
        got[r][tok] += 1
    assert got == oracle_tokens(t, VOCAB, interest)
    assert set(EVENT_TYPES) >= {"view", "cart"}


def test_token_counts_are_one_row_per_user_whatever_the_batches(spark):
    """A user's sessions spread over Arrow batches and partitions (3 rows a batch, 4 shuffled
    partitions) are merged into one row whose counts are the plain-Python oracle's sums."""
    t = random_sessions(120, seed=11)
    df = spark.createDataFrame(t.to_pandas()).repartition(4)
    oracle: dict[str, Counter] = {}
    for u, c in zip(t.column("user_id").to_pylist(), oracle_tokens(t, VOCAB, "item")):
        oracle.setdefault(u, Counter()).update(c)
    old = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "3")
    try:
        rows = behaviour.token_counts(df, VOCAB, "item").collect()
        long = {(r["user_id"], r["token"]): r["n"] for r in behaviour.long_counts(behaviour.token_counts(df, VOCAB, "item")).collect()}
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", old)
    assert sorted(r["user_id"] for r in rows) == sorted(oracle)  # one row per user
    for r in rows:
        assert len(r["tokens"]) == len(set(r["tokens"]))
        assert dict(zip(r["tokens"], r["n"])) == dict(oracle[r["user_id"]])
    assert long == {(u, tok): n for u, c in oracle.items() for tok, n in c.items()}


def test_tfidf_and_projection_match_scikit_learn(spark):
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    t = random_sessions(300, seed=5)
    df = spark.createDataFrame(t.to_pandas())
    counts = behaviour.token_counts(df, VOCAB, "category").persist()
    model = behaviour.fit(counts, vocab_size=200, min_df=2, dim=4, fit_users=100, seed=1, interest="category")
    assert model.users == 7 and model.dim == 4 and len(model.tokens) <= 200
    got = {r["user_id"]: np.array(r["tokens_vec"]) for r in behaviour.user_vectors(counts, model).collect()}
    # oracle: each user's tokens as one document through scikit-learn, same vocabulary
    rows, toks = behaviour.session_tokens(t, VOCAB, "category")
    users = np.asarray(t.column("user_id").to_pylist())[rows]
    docs = {u: [] for u in sorted(set(users))}
    for u, tok in zip(users, toks.to_pylist()):
        docs[u].append(tok)
    vec = TfidfVectorizer(analyzer=lambda d: d, vocabulary=list(model.tokens), sublinear_tf=True, lowercase=False)
    X = vec.fit_transform([docs[u] for u in docs])
    np.testing.assert_allclose(vec.idf_, model.idf, rtol=1e-9)
    want = normalize(np.asarray(sparse.csr_matrix(X) @ model.components.T.astype(np.float64)))
    for i, u in enumerate(docs):
        np.testing.assert_allclose(got[u], want[i], atol=1e-5)
    counts.unpersist()


def test_token_model_round_trips_through_the_artifact(tmp_path):
    from seqclust.represent.encoder import load_artifact, save_artifact

    tm = behaviour.TokenModel(("t:view", "t:cart"), np.array([1.0, 2.0]), np.eye(2, dtype=np.float32), "item", 5)
    art = save_artifact(tmp_path, {"embedding_dim": 4}, VOCAB, [np.ones((2, 2), np.float32)], {}, tm)
    back = load_artifact(art.path)
    assert back.encoder_id == art.encoder_id and back.token_model.tokens == tm.tokens and back.token_model.interest == "item"
    np.testing.assert_array_equal(back.token_model.components, tm.components)
    plain = save_artifact(tmp_path, {"embedding_dim": 4}, VOCAB, [np.ones((2, 2), np.float32)], {})
    assert plain.encoder_id != art.encoder_id and load_artifact(plain.path).token_model is None
    (art.path / "tokens.npz").write_bytes(behaviour.TokenModel(("a", "b"), np.array([1.0, 3.0]), np.eye(2), "item", 5).arrays_npz())
    from seqclust.core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="content hash"):
        load_artifact(art.path)


def test_the_fitted_model_does_not_depend_on_partitioning(spark):
    """The artifact's hash covers the token model, so a cluster and a laptop must fit the same
    arrays from the same data (found by the two-worker cluster test)."""
    t = random_sessions(400, seed=8)
    t = t.set_column(0, "user_id", pa.array([f"u{i % 60}" for i in range(t.num_rows)]))
    df = spark.createDataFrame(t.to_pandas())
    counts = behaviour.token_counts(df, VOCAB, "item")
    a = behaviour.fit(counts.repartition(5), 300, 1, 3, 1000, 2, "item")
    b = behaviour.fit(counts.coalesce(1), 300, 1, 3, 1000, 2, "item")
    assert a.tokens == b.tokens and np.array_equal(a.idf, b.idf) and np.array_equal(a.components, b.components)


@pytest.mark.spark
def test_a_run_counts_the_behaviour_tokens_once_for_train_embed_and_cluster(spark, tmp_path, monkeypatch):
    """The train stage's token counts are kept for the embed and cluster stages of the same
    process (at 100M events each count was ~10 minutes); a single-stage process counts its own."""
    from pathlib import Path

    from seqclust.app.cli import main
    from seqclust.datasets.generated import write_dataset

    repo = Path(__file__).resolve().parents[1]
    write_dataset(tmp_path / "gen", users=60, seed=3)
    calls = []
    real = behaviour.token_counts
    monkeypatch.setattr(behaviour, "token_counts", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = ["encoder.epochs=2", "encoder.train_sample=500", "encoder.embedding_dim=8", "encoder.hidden=16", "cluster.k=3"]
    small += ["cluster.n_init=1", "cluster.fine_k=null", "evaluate.downstream=false", "spark.shuffle_partitions=2"]
    common = ["--conf", str(repo / "conf" / "local.yaml"), "--output", str(tmp_path / "out"), *[x for s in small for x in ("--set", s)]]

    def cached():
        rdds = spark.sparkContext._jsc.getPersistentRDDs()
        return sorted(str(rdds.get(k).name()) for k in rdds.keySet().toArray() if "Delta" not in str(rdds.get(k).name()))

    before = cached()
    assert main(["run", "--input", str(tmp_path / "gen" / "events"), "--run-id", "once", *common]) == 0
    assert len(calls) == 1
    assert cached() == before  # the kept counts are released at the end of the run
    assert main(["cluster", "--run-id", "once", *common]) == 0
    assert len(calls) == 2  # the cluster stage alone counts them itself
