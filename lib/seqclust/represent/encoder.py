"""The sequence encoder: Keras model, self-supervised training, artifact save/load.

TensorFlow is imported inside the functions here, so importing this module is cheap and the
driver's light paths never load it.

Artifact layout (a directory; nothing pickled):
    config.json    architecture and sizes (enough to rebuild the model)
    vocab.json     the featurisation (features.Vocab)
    weights.npz    the model's weights, in build order, loaded with allow_pickle=False
    metrics.json   training history
    manifest.json  encoder_id = sha256 of config + vocab + weight arrays, checked on load
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqclust.core.console import native_stderr_to_log
from seqclust.core.errors import ArtifactError
from seqclust.represent.features import FIELDS, PAD, Vocab

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


BACKENDS = ("tensorflow", "torch")


def backend_name() -> str:
    """The Keras backend ``keras_backend`` will start, found without importing anything:
    ``KERAS_BACKEND`` when set, else TensorFlow where installed, else PyTorch."""
    import importlib.util

    name = os.environ.get("KERAS_BACKEND")
    if name:
        if name not in BACKENDS:
            raise ArtifactError(f"KERAS_BACKEND={name!r} is not supported: seqclust runs on {' or '.join(BACKENDS)}")
        return name
    for candidate in BACKENDS:
        if importlib.util.find_spec(candidate) is not None:
            return candidate
    raise ArtifactError(
        "neither TensorFlow nor PyTorch is installed: install seqclust[ml] (TensorFlow), "
        "or torch for embedding with an encoder trained elsewhere"
    )


def require_training_backend() -> None:
    """Training needs TensorFlow (its loop uses tf.function and GradientTape): checked before a
    run starts Spark, so a runtime without it (Databricks ML 19) is told at once, not after its
    ingest and sessionize stages."""
    name = backend_name()
    if name != "tensorflow":
        raise ArtifactError(_no_training(name))


def _no_training(name: str) -> str:
    return (
        f"training the encoder needs TensorFlow; Keras runs on {name} here (embedding and assign work): "
        "train where TensorFlow is installed and pass that encoder here with --encoder PATH or --model RUN_ID"
    )


def keras_backend(threads: int | None = None) -> str:
    """Choose and start the Keras backend, before ``keras`` is imported: ``KERAS_BACKEND`` when
    set (``tensorflow`` or ``torch``), else TensorFlow where it is installed, else PyTorch (a
    runtime that ships no TensorFlow, such as Databricks ML 19). Training needs TensorFlow;
    embedding (``embedding_fn``) runs on either with the same weights: the model code uses
    ``keras.ops`` only. ``threads`` caps the backend's intra-op threads (executors)."""
    import importlib.util

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    name = backend_name()
    if not os.environ.get("KERAS_BACKEND"):
        if name == "torch":
            log.info("TensorFlow is not installed: Keras runs on PyTorch (embedding only; training needs TensorFlow)")
        os.environ["KERAS_BACKEND"] = name  # read by keras when it is imported
    if importlib.util.find_spec(name) is None:
        other = [b for b in BACKENDS if b != name and importlib.util.find_spec(b) is not None]
        hint = f"set KERAS_BACKEND={other[0]} or unset it" if other else "install seqclust[ml] (TensorFlow)"
        raise ArtifactError(f"KERAS_BACKEND={name} but {name} is not installed: {hint}")
    import sys

    loaded = sys.modules.get("keras")
    if loaded is not None and hasattr(loaded, "backend") and hasattr(loaded.backend, "backend"):
        active = loaded.backend.backend()
        if active != name:
            raise ArtifactError(
                f"keras was already imported with the {active} backend in this process; KERAS_BACKEND={name} comes too late"
            )
    if name == "tensorflow":
        with native_stderr_to_log():
            import tensorflow as tf

        if threads:
            try:  # only possible before TensorFlow's runtime has started in this process
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:
                pass
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
    return name


def _tf(threads: int | None = None) -> Any:
    """TensorFlow, for training (its loop uses tf.function and GradientTape): a clear error
    where Keras runs on another backend."""
    name = keras_backend(threads)
    if name != "tensorflow":
        raise ArtifactError(_no_training(name))
    import tensorflow as tf

    return tf


def require_keras3() -> None:
    """Keras 3 is the contract (``keras.ops``, the ``.keras`` format, safe-mode loading). A
    runtime whose ``keras`` is the Keras 2 line (``tf.keras`` legacy, TensorFlow <= 2.15) gets
    a clear error instead of a failure deep inside a layer."""
    import keras

    version = str(getattr(keras, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < 3:
        raise ArtifactError(
            f"seqclust needs Keras 3 (found keras {version}, the Keras 2 / tf.keras line): "
            "install keras>=3 (pip install 'keras>=3,<4') next to TensorFlow 2.16 or later"
        )


def _position_layer() -> Any:
    import keras
    from keras import ops

    class AddPosition(keras.layers.Layer):
        """Adds a learned embedding of each position (0 = oldest kept event). The table has
        ``max_len`` rows; a narrower input (a batch trimmed to its longest session) uses the
        first rows, so trimming trailing padding changes nothing but the work done."""

        def __init__(self, max_len: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.max_len = int(max_len)

        def build(self, input_shape: Any) -> None:
            self.pos = self.add_weight(shape=(self.max_len, input_shape[-1]), initializer="random_uniform", name="pos")

        def call(self, x: Any) -> Any:
            return x + self.pos[: ops.shape(x)[1]]

        def compute_output_shape(self, input_shape: Any) -> Any:
            # stated, not traced: the torch backend traces with a made-up width that may
            # exceed max_len
            return input_shape

    return AddPosition


def build_encoder(model_cfg: dict[str, Any]) -> Any:
    """Build the Keras encoder: dict of int32 [batch, width] inputs -> [batch, embedding_dim],
    width <= max_len (sessions are left-aligned, padding trails; see ``trim``).

    The output is not normalised; ``embedding_fn`` L2-normalises it.
    """
    keras_backend()
    require_keras3()
    import keras
    from keras import layers, ops

    _AddPosition = _position_layer()
    L = model_cfg["max_len"]
    d = model_cfg["token_dim"]
    sizes = model_cfg["sizes"]
    inputs = {f: keras.Input(shape=(None,), dtype="int32", name=f) for f in FIELDS}
    x = None
    for f in FIELDS:
        e = layers.Embedding(sizes[f], d, name=f"emb_{f}")(inputs[f])
        x = e if x is None else layers.Add(name=f"add_{f}")([x, e])
    x = _AddPosition(L, name="emb_pos")(x)
    mask = ops.not_equal(inputs["tok"], PAD)
    arch = model_cfg["architecture"]
    if arch == "gru":
        h = layers.GRU(model_cfg["hidden"], name="gru")(x, mask=mask)
    elif arch == "transformer":
        heads = max(1, d // 16)
        att = layers.MultiHeadAttention(num_heads=heads, key_dim=d // heads, name="mha")(
            x, x, attention_mask=ops.logical_and(ops.expand_dims(mask, 1), ops.expand_dims(mask, 2))
        )
        x = layers.LayerNormalization(name="ln1")(x + att)
        ff = layers.Dense(model_cfg["hidden"], activation="gelu", name="ff1")(x)
        ff = layers.Dense(d, name="ff2")(ff)
        x = layers.LayerNormalization(name="ln2")(x + ff)
        m = ops.expand_dims(ops.cast(mask, "float32"), -1)
        h = ops.sum(x * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)
    else:
        raise ArtifactError(f"unknown architecture {arch!r}")
    z = layers.Dense(model_cfg["embedding_dim"], name="embedding")(h)
    return keras.Model(inputs=inputs, outputs=z, name="seqclust_encoder")


@dataclass
class Artifact:
    """A loaded encoder artifact."""

    path: Path
    encoder_id: str
    model_cfg: dict[str, Any]
    vocab: Vocab
    weights: list[np.ndarray]
    metrics: dict[str, Any]
    token_model: Any = None  # behaviour.TokenModel, when the artifact carries one

    def payload(self) -> tuple[str, str, bytes]:
        """What is broadcast to executors: config JSON, vocab JSON, weights as npz bytes."""
        return (json.dumps(self.model_cfg, sort_keys=True), self.vocab.to_json(), weights_to_npz(self.weights))


def content_hash(model_cfg: dict[str, Any], vocab: Vocab, weights: list[np.ndarray], token_model: Any = None) -> str:
    """sha256 of everything that decides a vector: config, vocabulary, weights and, when
    present, the behaviour-token model (an artifact without one hashes as before)."""
    h = hashlib.sha256()
    h.update(json.dumps(model_cfg, sort_keys=True).encode())
    h.update(vocab.to_json().encode())
    arrays = list(weights)
    if token_model is not None:
        h.update(token_model.to_json().encode())
        arrays += [token_model.idf, token_model.components]
    for w in arrays:
        a = np.ascontiguousarray(w)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def weights_to_npz(weights: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    arrays: dict[str, Any] = {f"w{i:04d}": w for i, w in enumerate(weights)}
    np.savez(buf, **arrays)
    return buf.getvalue()


def weights_from_npz(data: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return [z[k] for k in sorted(z.files)]


def save_artifact(
    root: Path, model_cfg: dict[str, Any], vocab: Vocab, weights: list[np.ndarray], metrics: dict[str, Any], token_model: Any = None
) -> Artifact:
    """Write the artifact under ``root/<encoder_id>/`` (atomically: temp dir, then rename);
    a behaviour-token model goes beside the weights as ``tokens.json`` + ``tokens.npz``."""
    encoder_id = content_hash(model_cfg, vocab, weights, token_model)
    final = Path(root) / encoder_id
    if final.is_dir():
        return load_artifact(final)
    tmp = Path(root) / f".tmp-{encoder_id}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(model_cfg, sort_keys=True, indent=1))
    (tmp / "vocab.json").write_text(vocab.to_json())
    (tmp / "weights.npz").write_bytes(weights_to_npz(weights))
    (tmp / "metrics.json").write_text(json.dumps(metrics, sort_keys=True, indent=1))
    if token_model is not None:
        (tmp / "tokens.json").write_text(token_model.to_json())
        (tmp / "tokens.npz").write_bytes(token_model.arrays_npz())
    (tmp / "manifest.json").write_text(json.dumps({"encoder_id": encoder_id, "format_version": FORMAT_VERSION}))
    os.replace(tmp, final)
    return Artifact(final, encoder_id, model_cfg, vocab, weights, metrics, token_model)


def load_artifact(path: str | Path) -> Artifact:
    """Load and verify an artifact directory; raise ArtifactError with the reason if unusable."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"encoder artifact {p}: not a directory")
    try:
        manifest = json.loads((p / "manifest.json").read_text())
        model_cfg = json.loads((p / "config.json").read_text())
        vocab = Vocab.from_json((p / "vocab.json").read_text())
        weights = weights_from_npz((p / "weights.npz").read_bytes())
        metrics = json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").exists() else {}
        token_model = None
        if (p / "tokens.json").exists():
            from seqclust.represent.behaviour import TokenModel

            token_model = TokenModel.load((p / "tokens.json").read_text(), (p / "tokens.npz").read_bytes())
    except FileNotFoundError as e:
        raise ArtifactError(f"encoder artifact {p}: missing file {Path(e.filename).name}") from None
    except (ValueError, TypeError, OSError, KeyError) as e:
        raise ArtifactError(f"encoder artifact {p}: corrupt ({type(e).__name__}: {str(e)[:120]})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"encoder artifact {p}: format version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    actual = content_hash(model_cfg, vocab, weights, token_model)
    if actual != manifest.get("encoder_id"):
        raise ArtifactError(
            f"encoder artifact {p}: content hash {actual} does not match manifest {manifest.get('encoder_id')} (tampered or corrupt)"
        )
    return Artifact(p, actual, model_cfg, vocab, weights, metrics, token_model)


def seq_lengths(tok: np.ndarray) -> np.ndarray:
    """Kept events per row of a left-aligned ``[rows, max_len]`` token matrix (the model masks
    positions whose token is PAD, so columns past a row's last real token do nothing)."""
    nz = tok != PAD
    return np.where(nz.any(axis=1), tok.shape[1] - np.argmax(nz[:, ::-1], axis=1), 0)


def trim(features: dict[str, np.ndarray], rows: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """``rows`` of every field, cut to the longest of those rows (at least one column): the
    encoder's output is the same, the recurrent/attention work shrinks with the width."""
    width = max(1, int(lengths[rows].max())) if len(rows) else 1
    return {f: features[f][rows, :width] for f in FIELDS}


EMBED_CHUNK = 1024  # rows per model call when embedding: sorted by length, each cut to its longest


def embedding_fn(
    model_cfg: dict[str, Any], weights: list[np.ndarray], threads: int | None = None, chunk: int = EMBED_CHUNK
) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Build the model once and return ``predict(features) -> float32 [n, dim]``, L2-normalised.

    Rows are embedded in chunks of similar length (sorted by kept events, each chunk cut to
    its longest row), so a batch of mostly short sessions does not pay for ``max_len`` steps;
    the output is in the input's row order.
    """
    backend = keras_backend(threads)
    model = build_encoder(model_cfg)
    try:
        model.set_weights(weights)
    except ValueError as e:
        raise ArtifactError(f"encoder weights do not fit the architecture: {str(e)[:200]}") from None
    dim = model_cfg["embedding_dim"]
    if backend == "tensorflow":
        import tensorflow as tf

        spec = {f: tf.TensorSpec([None, None], tf.int32, name=f) for f in FIELDS}

        @tf.function(input_signature=[spec], reduce_retracing=True)
        def _tf_predict(x: dict[str, Any]) -> Any:
            z = model(x, training=False)
            return tf.math.l2_normalize(z, axis=1)

        def _predict(x: dict[str, np.ndarray]) -> np.ndarray:
            return _tf_predict({f: tf.constant(x[f]) for f in FIELDS}).numpy()

    else:  # torch: the same layers through keras.ops; normalised as tf.math.l2_normalize does
        import keras
        import torch

        def _predict(x: dict[str, np.ndarray]) -> np.ndarray:
            with torch.no_grad():
                z = keras.ops.convert_to_numpy(model({f: torch.from_numpy(np.ascontiguousarray(x[f])) for f in FIELDS}, training=False))
            z = z.astype(np.float32)
            return z / np.sqrt(np.maximum((z * z).sum(axis=1, keepdims=True), 1e-12))

    def predict(features: dict[str, np.ndarray]) -> np.ndarray:
        n = len(features["tok"])
        out = np.zeros((n, dim), dtype=np.float32)
        if n == 0:
            return out
        lengths = seq_lengths(features["tok"])
        order = np.argsort(lengths, kind="stable")
        for b in range(0, n, chunk):
            rows = order[b : b + chunk]
            x = trim(features, rows, lengths)
            if first[0]:
                with native_stderr_to_log():
                    out[rows] = _predict(x)
                first[0] = False
            else:
                out[rows] = _predict(x)
        return out

    first = [True]  # the model's first call, with TensorFlow's one-time notices
    return predict


# ---------------------------------------------------------------------------------------
# Training


def _augment(tf: Any, x: dict[str, Any], mask_prob: float, mask_ids: dict[str, int], seed: Any) -> dict[str, Any]:
    """Mask random non-pad positions in every field (same positions across fields)."""
    valid = tf.not_equal(x["tok"], PAD)
    r = tf.random.stateless_uniform(tf.shape(x["tok"]), seed=seed)
    hide = tf.logical_and(valid, r < mask_prob)
    return {f: tf.where(hide, tf.cast(mask_ids[f], tf.int32), x[f]) for f in FIELDS}


def _crop(tf: Any, x: dict[str, Any], seed: Any, min_ratio: float = 0.6) -> dict[str, Any]:
    """Keep a random contiguous window of each session (at least ``min_ratio`` of it)."""
    lens = tf.reduce_sum(tf.cast(tf.not_equal(x["tok"], PAD), tf.int32), axis=1)
    u = tf.random.stateless_uniform(tf.shape(lens), seed=seed)
    want = tf.math.ceil(tf.cast(lens, tf.float32) * (min_ratio + (1.0 - min_ratio) * u))
    crop_len = tf.minimum(tf.maximum(tf.cast(want, tf.int32), 1), tf.maximum(lens, 1))
    u2 = tf.random.stateless_uniform(tf.shape(lens), seed=seed + tf.constant([0, 7919], tf.int32))
    start = tf.cast(tf.floor(u2 * tf.cast(lens - crop_len + 1, tf.float32)), tf.int32)
    length = tf.shape(x["tok"])[1]
    pos = tf.range(length)[None, :]
    idx = tf.minimum(start[:, None] + pos, length - 1)
    keep = pos < crop_len[:, None]
    return {f: tf.where(keep, tf.gather(x[f], idx, batch_dims=1), tf.zeros_like(x[f])) for f in FIELDS}


def _head(keras: Any, objective: str, embedding_dim: int, vocab: Vocab) -> Any:
    """The training head on top of the encoder's session vector: one softmax per field (the
    bag to reconstruct) or the contrastive projection (two dense layers)."""
    z_in = keras.Input(shape=(embedding_dim,))
    if objective == "bag_reconstruction":
        act = keras.layers.Activation("gelu")(z_in)
        return keras.Model(z_in, {f: keras.layers.Dense(vocab.sizes[f], name=f"head_{f}")(act) for f in FIELDS})
    proj = keras.layers.Dense(embedding_dim, activation="gelu", name="proj1")(z_in)
    return keras.Model(z_in, keras.layers.Dense(embedding_dim, name="proj2")(proj))


def _loss(tf: Any, objective: str, encoder: Any, head_model: Any, mask_prob: float, mask_ids: dict[str, int]) -> Callable[..., Any]:
    """``loss(x, seed, training)`` of a batch for ``objective`` (see ``train``)."""
    temperature = 0.1

    def sub_seed(s: Any, i: int) -> Any:
        return tf.stack([s[0], s[1] * 8 + i])

    def loss_fn(x: dict[str, Any], s: Any, training: bool) -> Any:
        if objective == "bag_reconstruction":
            view = _augment(tf, x, mask_prob, mask_ids, s)
            logits = head_model(encoder(view, training=training), training=training)
            valid = tf.cast(tf.not_equal(x["tok"], PAD), tf.float32)
            count = tf.maximum(tf.reduce_sum(valid, axis=1), 1.0)
            total = 0.0
            for f in FIELDS:
                logp = tf.nn.log_softmax(logits[f], axis=-1)
                picked = tf.gather(logp, x[f], batch_dims=1)  # [B, L]
                total += tf.reduce_mean(-tf.reduce_sum(picked * valid, axis=1) / count)
            return total
        views = [_augment(tf, _crop(tf, x, sub_seed(s, 2 * i)), mask_prob, mask_ids, sub_seed(s, 2 * i + 1)) for i in range(2)]
        p1, p2 = (tf.math.l2_normalize(head_model(encoder(v, training=training), training=training), axis=1) for v in views)
        logits = tf.matmul(p1, p2, transpose_b=True) / temperature
        labels = tf.range(tf.shape(logits)[0])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits
        return 0.5 * (tf.reduce_mean(ce(labels, logits)) + tf.reduce_mean(ce(labels, tf.transpose(logits))))

    return loss_fn


def _fit(
    tf: Any,
    encoder: Any,
    steps: tuple[Any, Any],
    batches: Callable[[np.ndarray], Any],
    split: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    seed: int,
    epochs: int,
    patience: int,
) -> tuple[list[dict[str, Any]], float, list[np.ndarray] | None]:
    """The epochs with early stopping on the validation loss: (history, best validation loss,
    the encoder's weights at it, or None when no epoch improved)."""
    train_step, eval_step = steps
    val_idx, tr_idx = split
    n_val = len(val_idx)
    history = []
    best, best_weights, bad_epochs = float("inf"), None, 0
    step = 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        perm = tr_idx[rng.permutation(len(tr_idx))]
        losses = []
        for _, xb in batches(perm):
            step += 1
            losses.append(float(train_step(xb, tf.constant([seed, step], tf.int32))))
        tr_loss = float(np.mean(losses)) if losses else float("nan")
        if n_val:
            vl = [float(eval_step(xb, tf.constant([seed + 1, b], tf.int32))) * len(xb["tok"]) for b, xb in batches(val_idx)]
            val_loss = float(np.sum(vl) / n_val)
        else:
            val_loss = tr_loss
        dt = time.perf_counter() - t0
        history.append({"epoch": epoch, "loss": tr_loss, "val_loss": val_loss, "seconds": dt})
        log.info("train: epoch %d/%d loss %.4f val_loss %.4f (%.1fs)", epoch, epochs, tr_loss, val_loss, dt)
        if val_loss < best - 1e-4:
            best, best_weights, bad_epochs = val_loss, [w.copy() for w in encoder.get_weights()], 0
        else:
            bad_epochs += 1
            if bad_epochs > patience:
                log.info("train: early stop after epoch %d (best val_loss %.4f)", epoch, best)
                break
    return history, best, best_weights


def train(
    features: dict[str, np.ndarray],
    vocab: Vocab,
    *,
    architecture: str,
    embedding_dim: int,
    token_dim: int,
    hidden: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    validation_fraction: float,
    patience: int,
    mask_prob: float,
    seed: int,
    objective: str = "bag_reconstruction",
) -> tuple[dict[str, Any], list[np.ndarray], dict[str, Any]]:
    """Train the encoder self-supervised on featurised sessions. Seeding, the validation split,
    the model, the head and the loop happen in this order, so a seeded run is reproducible.

    Objectives:
        ``bag_reconstruction``: from a view of the session with random positions masked,
        predict the session's full distribution of tokens, event types, pace buckets and price
        bands (a denoising set autoencoder). The embedding must summarise what a session is
        about, how the user acts, how fast and at what price.
        ``contrastive``: InfoNCE between two augmented views (random crop + mask, as in
        CL4SRec) of each session, the other sessions of the batch as negatives, through a
        projection head (SimCLR); temperature 0.1.

    Returns:
        (model config, weights, training metrics with per-epoch history).
    """
    tf = _tf()
    import keras

    keras.utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # pragma: no cover - older TF
        pass
    if objective not in ("bag_reconstruction", "contrastive"):
        raise ValueError(f"unknown objective {objective!r}")
    model_cfg = {
        "architecture": architecture,
        "objective": objective,
        "embedding_dim": embedding_dim,
        "token_dim": token_dim,
        "hidden": hidden,
        "max_len": vocab.max_len,
        "sizes": vocab.sizes,
        "format_version": FORMAT_VERSION,
    }
    encoder = build_encoder(model_cfg)
    head_model = _head(keras, objective, embedding_dim, vocab)
    optimizer = keras.optimizers.Adam(learning_rate)

    n = len(features["tok"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = int(round(n * validation_fraction)) if n >= 20 else 0
    val_idx, tr_idx = order[:n_val], order[n_val:]
    train_vars = encoder.trainable_variables + head_model.trainable_variables
    loss_fn = _loss(tf, objective, encoder, head_model, mask_prob, vocab.mask_ids)
    spec = {f: tf.TensorSpec([None, None], tf.int32) for f in FIELDS}  # batches are cut to their longest session

    @tf.function(input_signature=[spec, tf.TensorSpec([2], tf.int32)])
    def train_step(x: dict[str, Any], s: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(x, s, True)
        grads = tape.gradient(loss, train_vars)
        optimizer.apply_gradients(zip(grads, train_vars))
        return loss

    @tf.function(input_signature=[spec, tf.TensorSpec([2], tf.int32)])
    def eval_step(x: dict[str, Any], s: Any) -> Any:
        return loss_fn(x, s, False)

    lengths = seq_lengths(features["tok"])

    def batches(idx: np.ndarray):
        for b in range(0, len(idx), batch_size):
            x = trim(features, idx[b : b + batch_size], lengths)
            yield b, {f: tf.constant(x[f]) for f in FIELDS}

    def first_quiet(step: Callable[..., Any]) -> Callable[..., Any]:
        calls = [0]

        def run(*a: Any) -> Any:
            calls[0] += 1
            if calls[0] > 1:
                return step(*a)
            with native_stderr_to_log():  # TensorFlow's one-time notices at the first step
                return step(*a)

        return run

    steps = (first_quiet(train_step), first_quiet(eval_step))
    history, best, best_weights = _fit(tf, encoder, steps, batches, (val_idx, tr_idx), rng, seed, epochs, patience)
    weights = best_weights if best_weights is not None else encoder.get_weights()
    metrics = {
        "history": history,
        "best_val_loss": best,
        "train_sessions": int(len(tr_idx)),
        "val_sessions": int(n_val),
        "params": int(encoder.count_params()),
        "seed": seed,
    }
    return model_cfg, [np.asarray(w) for w in weights], metrics
