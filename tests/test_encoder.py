import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest

from seqclust.core.errors import ArtifactError
from seqclust.represent.encoder import embedding_fn, load_artifact, save_artifact, train, weights_to_npz
from seqclust.represent.features import Vocab, featurize

TRAIN_KW = dict(
    architecture="gru",
    embedding_dim=8,
    token_dim=8,
    hidden=8,
    epochs=2,
    batch_size=32,
    learning_rate=0.01,
    validation_fraction=0.2,
    patience=1,
    mask_prob=0.15,
    seed=3,
)


def _sessions(n=120, seed=0):
    rng = np.random.default_rng(seed)
    types = np.array(["view", "cart", "purchase", "search"])
    cats = np.array(["c1", "c2", "c3"])
    rows = {"session_id": [], "user_id": [], "end_ts": [], "tokens": [], "event_types": [], "categories": [], "prices": [], "gaps_s": []}
    for i in range(n):
        L = int(rng.integers(1, 9))
        et = types[rng.integers(0, 4, L)]
        ct = cats[rng.integers(0, 3, L)]
        rows["session_id"].append(f"s{i}")
        rows["user_id"].append(f"u{i % 17}")
        rows["end_ts"].append(dt.datetime(2026, 10, 1) + dt.timedelta(hours=i))
        rows["tokens"].append([f"{a}:{b}" for a, b in zip(et, ct)])
        rows["event_types"].append(list(et))
        rows["categories"].append(list(ct))
        rows["prices"].append([float(p) if e != "search" else None for p, e in zip(rng.lognormal(3, 1, L), et)])
        rows["gaps_s"].append([0.0] + list(rng.exponential(60, L - 1)))
    return pa.table(rows)


VOCAB = Vocab(
    tokens=tuple(f"{a}:{b}" for a in ("view", "cart", "purchase") for b in ("c1", "c2", "c3")),
    categories=("c1", "c2", "c3"),
    category_median_price=(20.0, 20.0, 20.0),
    global_median_price=20.0,
    price_edges=(-1.0, 0.0, 1.0),
    max_len=6,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    table = _sessions()
    model_cfg, weights, metrics = train(featurize(table, VOCAB), VOCAB, **TRAIN_KW)
    art = save_artifact(tmp_path_factory.mktemp("enc"), model_cfg, VOCAB, weights, metrics)
    return table, art, weights


def test_training_reports_history_and_is_deterministic(trained):
    table, art, weights = trained
    assert [h["epoch"] for h in art.metrics["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["val_loss"]) for h in art.metrics["history"])
    _, again, _ = train(featurize(table, VOCAB), VOCAB, **TRAIN_KW)
    assert all(np.array_equal(a, b) for a, b in zip(weights, again))


def test_artifact_round_trip_gives_identical_outputs(trained):
    table, art, weights = trained
    loaded = load_artifact(art.path)
    assert loaded.encoder_id == art.encoder_id and loaded.vocab == VOCAB
    feats = featurize(table, VOCAB)
    a = embedding_fn(art.model_cfg, weights)(feats)
    b = embedding_fn(loaded.model_cfg, loaded.weights)(feats)
    assert a.dtype == np.float32 and a.shape == (len(table), 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


def test_tampered_or_corrupt_artifact_fails_clearly(trained, tmp_path):
    _, art, weights = trained
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(art.path, bad)
    w = [x.copy() for x in weights]
    w[0][0, 0] += 1.0
    (bad / "weights.npz").write_bytes(weights_to_npz(w))
    with pytest.raises(ArtifactError, match="does not match manifest"):
        load_artifact(bad)
    (bad / "weights.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(bad)
    (bad / "vocab.json").unlink()
    with pytest.raises(ArtifactError, match="missing file vocab.json"):
        load_artifact(bad)
    with pytest.raises(ArtifactError, match="not a directory"):
        load_artifact(tmp_path / "nothing")


def test_weights_from_another_architecture_are_rejected(trained):
    _, art, weights = trained
    cfg = dict(art.model_cfg, hidden=16)
    with pytest.raises(ArtifactError, match="do not fit"):
        embedding_fn(cfg, weights)


def test_transformer_trains_one_epoch():
    kw = dict(TRAIN_KW, architecture="transformer", epochs=1)
    cfg, weights, metrics = train(featurize(_sessions(40), VOCAB), VOCAB, **kw)
    z = embedding_fn(cfg, weights)(featurize(_sessions(5, seed=9), VOCAB))
    assert z.shape == (5, 8) and np.isfinite(z).all()


def test_spark_embeddings_equal_driver_model(spark, trained):
    from seqclust.represent.embed import embed_sessions, pool_users

    table, art, weights = trained
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "16")  # several batches per task
    df = spark.createDataFrame(table.to_pandas()).repartition(3)
    out = {r["session_id"]: np.array(r["embedding"]) for r in embed_sessions(spark, df, art).collect()}
    driver = embedding_fn(art.model_cfg, weights)(featurize(table, VOCAB))
    ids = table.column("session_id").to_pylist()
    assert set(out) == set(ids)
    np.testing.assert_allclose(np.stack([out[i] for i in ids]), driver, atol=1e-5)

    users = {r["entity_id"]: np.array(r["embedding"]) for r in pool_users(embed_sessions(spark, df, art)).collect()}
    uid = np.array(table.column("user_id").to_pylist())
    for u in ("u0", "u5"):
        m = driver[uid == u].mean(axis=0)
        np.testing.assert_allclose(users[u], m / np.linalg.norm(m), atol=1e-5)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10000")


def test_manifest_names_the_content_hash(trained):
    _, art, _ = trained
    assert json.loads((art.path / "manifest.json").read_text())["encoder_id"] == art.path.name == art.encoder_id


def test_contrastive_objective_trains_and_is_deterministic():
    kw = dict(TRAIN_KW, objective="contrastive", epochs=2)
    feats = featurize(_sessions(80), VOCAB)
    cfg, w1, metrics = train(feats, VOCAB, **kw)
    _, w2, _ = train(feats, VOCAB, **kw)
    assert cfg["objective"] == "contrastive"
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2))
    # InfoNCE starts near log(batch size) and goes down on a learnable task
    h = metrics["history"]
    assert h[-1]["loss"] < h[0]["loss"] <= np.log(32) + 0.5


def test_crop_keeps_a_contiguous_window_of_each_session():
    from seqclust.represent.encoder import _crop, _tf

    tf = _tf()
    tok = np.array([[5, 6, 7, 8, 9, 0], [3, 4, 0, 0, 0, 0]], dtype=np.int32)
    x = {f: tf.constant(tok) for f in ("tok", "etype", "gap", "price")}
    for i in range(5):
        out = _crop(tf, x, tf.constant([1, i], tf.int32))["tok"].numpy()
        for row, orig in zip(out, tok):
            kept = row[row > 0]
            n = int((orig > 0).sum())
            assert int(np.ceil(0.6 * n)) <= len(kept) <= n
            start = list(orig).index(kept[0])
            assert list(orig[start : start + len(kept)]) == list(kept)
            assert (row[len(kept) :] == 0).all()


def test_recency_pooling_weighs_recent_sessions_more(spark):
    from seqclust.represent.embed import pool_users

    t = dt.datetime(2026, 10, 31)
    df = spark.createDataFrame(
        [("u", t, [1.0, 0.0]), ("u", t - dt.timedelta(days=14), [0.0, 1.0])],
        "user_id string, end_ts timestamp, embedding array<float>",
    )
    mean = pool_users(df, "mean").first()["embedding"]
    rec = pool_users(df, "recency", half_life_days=14.0).first()["embedding"]
    np.testing.assert_allclose(mean, np.array([1, 1]) / np.sqrt(2), atol=1e-6)
    # weights 1 and 1/2 (one half-life older)
    np.testing.assert_allclose(rec, np.array([1, 0.5]) / np.linalg.norm([1, 0.5]), atol=1e-6)


@pytest.mark.parametrize("architecture", ["gru", "transformer"])
def test_trimmed_length_sorted_embedding_equals_the_full_width_model(trained, architecture):
    """embedding_fn sorts rows by length and cuts each chunk to its longest row; the vectors
    must be those of one full-width call (max_len columns, trailing padding), row for row."""
    import tensorflow as tf

    from seqclust.represent.encoder import build_encoder, seq_lengths
    from seqclust.represent.features import FIELDS

    table, art, weights = trained
    cfg = dict(art.model_cfg, architecture=architecture)
    model = build_encoder(cfg)
    if architecture != "gru":  # fresh seeded weights for the other architecture
        weights = [np.random.default_rng(i).normal(scale=0.3, size=w.shape).astype(np.float32) for i, w in enumerate(model.get_weights())]
    model.set_weights(weights)
    feats = featurize(table, VOCAB)
    lengths = seq_lengths(feats["tok"])
    assert lengths.min() >= 1 and lengths.max() == VOCAB.max_len and len(set(lengths.tolist())) > 3
    full = tf.math.l2_normalize(model({f: tf.constant(feats[f]) for f in FIELDS}, training=False), axis=1).numpy()
    got = embedding_fn(cfg, weights, chunk=16)(feats)  # several chunks of different widths
    np.testing.assert_allclose(got, full, atol=1e-5)


def test_keras_2_is_refused_with_a_clear_message(monkeypatch):
    import keras

    from seqclust.core.errors import ArtifactError
    from seqclust.represent.encoder import build_encoder, require_keras3

    require_keras3()  # the installed Keras 3 passes
    monkeypatch.setattr(keras, "__version__", "2.15.0")
    with pytest.raises(ArtifactError, match=r"needs Keras 3 \(found keras 2\.15\.0"):
        build_encoder({"max_len": 4, "token_dim": 8, "sizes": {}, "architecture": "gru", "hidden": 8, "embedding_dim": 4})


def test_the_worker_model_cache_is_bounded_least_recently_used_out():
    from collections import OrderedDict

    from seqclust.represent.embed import MAX_WORKER_MODELS, _remember

    assert MAX_WORKER_MODELS >= 1
    cache: OrderedDict = OrderedDict()
    for e in ("a", "b"):
        _remember(e, e.upper(), cache, limit=2)
    cache.move_to_end("a")  # "a" used again: "b" is now the least recently used
    _remember("c", "C", cache, limit=2)
    assert list(cache) == ["a", "c"]


@pytest.mark.parametrize(
    "backend, message",
    [
        ("jax", "KERAS_BACKEND='jax' is not supported: seqclust runs on tensorflow or torch"),
        ("torch", "KERAS_BACKEND=torch but torch is not installed"),
    ],
)
def test_an_unusable_keras_backend_is_refused_with_one_line(backend, message):
    """Keras reads KERAS_BACKEND once per process, so each case runs in its own interpreter.
    (torch is absent from the main environment; the torch environment is tested in test_e2e.)"""
    import importlib.util
    import os
    import subprocess
    import sys

    if backend == "torch" and importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    code = "from seqclust.core.errors import ArtifactError\nfrom seqclust.represent.encoder import keras_backend\ntry:\n    keras_backend()\nexcept ArtifactError as e:\n    print(e)\n"
    env = dict(os.environ, KERAS_BACKEND=backend)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert message in r.stdout, r.stdout


def test_a_run_that_trains_is_refused_before_spark_where_keras_runs_on_torch(monkeypatch, tmp_path, capsys):
    """Training needs TensorFlow: on a runtime whose Keras runs on torch, `run` and `train`
    without an encoder stop with one line before Spark starts (no table written); with
    ``--encoder`` they go on (embedding runs on torch)."""
    from seqclust.app.cli import main
    from seqclust.represent.encoder import backend_name, require_training_backend

    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert backend_name() == "torch"
    with pytest.raises(ArtifactError, match="training the encoder needs TensorFlow; Keras runs on torch here"):
        require_training_backend()
    out = tmp_path / "out"
    for command in ("run", "train"):
        assert main([command, "--input", str(tmp_path / "none"), "--output", str(out), "--run-id", "t"]) == 2
        err = capsys.readouterr().err
        assert "training the encoder needs TensorFlow" in err and "Traceback" not in err
    assert not out.exists()
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # not one seqclust runs on: said so, not "embedding works"
    with pytest.raises(ArtifactError, match="KERAS_BACKEND='jax' is not supported"):
        require_training_backend()
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    require_training_backend()


def test_the_chosen_backend_is_written_where_keras_reads_it(monkeypatch):
    """Chosen by what is installed (no KERAS_BACKEND), the backend is set in the environment
    before keras is imported: keras reads KERAS_BACKEND at import and would otherwise start
    TensorFlow (missing on a torch runtime)."""
    import os

    from seqclust.represent.encoder import keras_backend

    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # undone after the test
    monkeypatch.delenv("KERAS_BACKEND")
    assert keras_backend() == "tensorflow" and os.environ["KERAS_BACKEND"] == "tensorflow"


def test_tensorflow_start_up_lines_go_to_the_native_log_not_the_console(tmp_path):
    """absl prints TensorFlow's start-up notices straight to stderr before any log level
    applies; seqclust sends them to a file ($SEQCLUST_NATIVE_LOG) and keeps the console for its
    own lines. The same import with SEQCLUST_NATIVE_LOG=- shows what would have been printed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("tensorflow")
    code = "from seqclust.represent.encoder import keras_backend; keras_backend(); print('backend ready')"
    env = {k: v for k, v in os.environ.items() if k not in ("SEQCLUST_NATIVE_LOG", "KERAS_BACKEND")}

    def start(target: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**env, "SEQCLUST_NATIVE_LOG": target}
        )

    loud = start("-")
    assert loud.returncode == 0 and "backend ready" in loud.stdout, loud.stderr[-2000:]
    log_file = tmp_path / "native.log"
    quiet = start(str(log_file))
    assert quiet.returncode == 0 and "backend ready" in quiet.stdout, quiet.stderr[-2000:]
    assert quiet.stderr.strip() == "", quiet.stderr[-2000:]
    if loud.stderr.strip():  # this TensorFlow build prints start-up lines: they are in the file
        assert loud.stderr.strip().splitlines()[0] in log_file.read_text()
