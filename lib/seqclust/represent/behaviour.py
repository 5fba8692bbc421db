"""Behaviour tokens: a user as the TF-IDF of what their sessions do, reduced by a truncated SVD.

One token field (event type x category) let interest drown everything else. Here each aspect
of behaviour gets tokens of its own, so order, pace, price level, interest, session shape
and time of day all reach the user vector:

- ``t:`` event-type unigrams, bigrams and trigrams within a session (what follows what);
- ``j:`` event type x price band x pace bucket, unigrams and bigrams (how fast, how dear);
- ``c:`` the category of each event, or ``i:`` the item where the source has no category
  (interest; revisits count twice);
- ``s:`` one set per session: length bucket, pace bucket, outcome (bought / carted /
  neither, alone and with the length), whether an item was seen twice, start hour (4-hour
  bins, UTC) and weekend.

A user's token counts (over their modelled sessions) become a sublinear TF-IDF vector
(idf from every user, the ``vocab_size`` tokens used by most users), L2-normalised, projected
on the top ``dim`` right singular vectors fitted on a seeded user sample, and L2-normalised
again. Everything is counted on the executors from Arrow batches; only the vocabulary, its
document frequencies and one bounded sample reach the driver.

Measured on the persona family (bench/quality.py, docs/EVALUATION.md), this beat the
bag-of-events baseline on every generator where persona is more than interest.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.compat import to_arrow
from seqclust.represent.features import Vocab, event_parts, list_parts

log = logging.getLogger(__name__)

SESSION_COLUMNS = ("user_id", "start_ts", "event_types", "categories", "items", "prices", "gaps_s")
LEN_EDGES = (1, 3, 7, 15)  # events per session: 1 | 2-3 | 4-7 | 8-15 | 16+
PACE_EDGES = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)  # seconds per event within a session
INTERESTS = ("category", "item", "none")
USER_COUNTS_SCHEMA = T.StructType(
    [
        T.StructField("user_id", T.StringType()),
        T.StructField("tokens", T.ArrayType(T.StringType(), False)),
        T.StructField("n", T.ArrayType(T.LongType(), False)),
    ]
)


@dataclass(frozen=True)
class TokenModel:
    """The fitted representation: vocabulary, idf weights and SVD projection."""

    tokens: tuple[str, ...]
    idf: np.ndarray  # [V]
    components: np.ndarray  # [dim, V]
    interest: str  # category | item | none
    users: int  # users the idf was counted on

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def to_json(self) -> str:
        return json.dumps({"tokens": list(self.tokens), "interest": self.interest, "users": self.users}, sort_keys=True)

    def arrays_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, idf=self.idf.astype(np.float64), components=self.components.astype(np.float32))
        return buf.getvalue()

    @staticmethod
    def load(meta_json: str, npz: bytes) -> TokenModel:
        d = json.loads(meta_json)
        with np.load(io.BytesIO(npz), allow_pickle=False) as z:
            idf, comp = z["idf"], z["components"]
        if comp.ndim != 2 or comp.shape[1] != len(d["tokens"]) or idf.shape != (len(d["tokens"]),):
            raise ValueError("token model arrays do not match its vocabulary")
        if d["interest"] not in INTERESTS:
            raise ValueError(f"unknown interest field {d['interest']!r}")
        return TokenModel(tuple(d["tokens"]), idf, comp, d["interest"], int(d["users"]))


def _cat(*cols: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*[pa.scalar(c) if isinstance(c, str) else c for c in cols], "")


def session_tokens(batch: pa.RecordBatch | pa.Table, vocab: Vocab, interest: str) -> tuple[np.ndarray, pa.Array]:
    """Flat behaviour tokens of a batch of sessions (``SESSION_COLUMNS``): ``(row of the
    session each token belongs to, token strings)``. ``vocab`` gives price bands and pace
    buckets exactly as the encoder sees them."""
    parts = event_parts(batch, vocab)
    offsets = parts.offsets
    lens = np.diff(offsets)
    n_rows = len(lens)
    n = int(offsets[-1])
    sess = np.repeat(np.arange(n_rows), lens)
    pos = np.arange(n) - offsets[:-1][sess]
    et = pc.fill_null(parts.event_type.cast(pa.string()), "")
    joint = _cat(et, ":p", pa.array(parts.band).cast(pa.string()), ":g", pa.array(parts.gap).cast(pa.string()))
    rows: list[np.ndarray] = []
    toks: list[pa.Array] = []

    def add(idx: np.ndarray, arr: pa.Array) -> None:
        if len(idx):
            rows.append(sess[idx])
            toks.append(arr)

    every = np.arange(n)
    i1 = np.nonzero(pos >= 1)[0]
    i2 = np.nonzero(pos >= 2)[0]
    add(every, _cat("t:", et))
    add(i1, _cat("t:", et.take(pa.array(i1 - 1)), ">", et.take(pa.array(i1))))
    add(i2, _cat("t:", et.take(pa.array(i2 - 2)), ">", et.take(pa.array(i2 - 1)), ">", et.take(pa.array(i2))))
    add(every, _cat("j:", joint))
    add(i1, _cat("j:", joint.take(pa.array(i1 - 1)), ">", joint.take(pa.array(i1))))
    if interest != "none":
        vals = parts.category if interest == "category" else parts.item
        if vals is not None:
            vals = vals.cast(pa.string())
            ok = pc.and_(pc.is_valid(vals), pc.not_equal(pc.fill_null(vals, ""), "")).to_numpy(zero_copy_only=False)
            idx = np.nonzero(ok)[0]
            add(idx, _cat("c:" if interest == "category" else "i:", vals.take(pa.array(idx))))
    # one set of session tokens per non-empty session
    live = np.nonzero(lens > 0)[0]
    if len(live):
        _, gap_flat = list_parts(batch.column("gaps_s"))
        gaps = pc.fill_null(gap_flat.cast(pa.float64()), 0.0).to_numpy().copy()
        gaps[offsets[:-1][live]] = 0.0
        dur = np.add.reduceat(gaps, offsets[:-1][live]) if n else np.zeros(len(live))
        pace = dur / np.maximum(lens[live] - 1, 1)
        lb = np.searchsorted(np.asarray(LEN_EDGES), lens[live], side="left")
        pb = np.where(lens[live] > 1, np.searchsorted(np.asarray(PACE_EDGES), pace, side="right") + 1, 0)
        etype = parts.etype  # ids: 1 view .. 5 purchase
        bought = np.bincount(sess, weights=(etype == 5), minlength=n_rows)[live] > 0
        carted = np.bincount(sess, weights=(etype == 3), minlength=n_rows)[live] > 0
        outcome = np.where(bought, "b", np.where(carted, "c", "n"))
        revisit = np.zeros(len(live), dtype=bool)
        if parts.item is not None:
            codes = pc.dictionary_encode(parts.item.cast(pa.string())).indices.to_numpy(zero_copy_only=False)
            valid = pc.is_valid(parts.item).to_numpy(zero_copy_only=False)
            if valid.any():
                key = sess[valid].astype(np.int64) * (int(codes[valid].max()) + 1) + codes[valid].astype(np.int64)
                uniq, counts = np.unique(key, return_counts=True)
                dup_sess = np.unique(uniq[counts > 1] // (int(codes[valid].max()) + 1))
                revisit = np.isin(live, dup_sess)
        start = batch.column("start_ts")
        start = start.combine_chunks() if isinstance(start, pa.ChunkedArray) else start
        micros = pc.cast(start.cast(pa.timestamp("us", tz="UTC")), pa.int64()).to_numpy(zero_copy_only=False)[live]
        hour = (micros // 3_600_000_000) % 24
        weekend = ((micros // 86_400_000_000) + 3) % 7 >= 5  # 1970-01-01 was a Thursday
        s_vals = [
            np.char.add("s:L", lb.astype(str)),
            np.char.add("s:S", pb.astype(str)),
            np.char.add("s:O", outcome),
            np.char.add(np.char.add("s:O", outcome), lb.astype(str)),
            np.char.add("s:R", revisit.astype(int).astype(str)),
            np.char.add("s:H", (hour // 4).astype(str)),
            np.char.add("s:W", weekend.astype(int).astype(str)),
        ]
        for v in s_vals:
            rows.append(live)
            toks.append(pa.array(v, pa.string()))
    if not toks:
        return np.zeros(0, dtype=np.int64), pa.array([], pa.string())
    return np.concatenate(rows), pa.concat_arrays([t.cast(pa.string()) for t in toks])


def interest_field(sessions: DataFrame) -> str:
    """``category`` where the sessions carry categories, else ``item`` where they carry items,
    else ``none`` (one small job: the first session with a non-empty value)."""
    for field, col in (("category", "categories"), ("item", "items")):
        if col in sessions.columns and sessions.where(F.exists(col, lambda x: x.isNotNull() & (x != ""))).limit(1).count():
            return field
    return "none"


def group_by_user(users: pa.Array, tokens: pa.Array, n: pa.Array | None = None) -> pa.RecordBatch:
    """``(user_id, tokens, n)`` with one row per user of ``users`` (aligned with ``tokens`` and
    their counts ``n``, 1 each when None): each user's distinct tokens and their summed counts."""
    t = pa.table({"u": users, "t": tokens, "n": n if n is not None else pa.array(np.ones(len(tokens), np.int64))})
    g = t.group_by(["u", "t"], use_threads=False).aggregate([("n", "sum")])
    codes = pc.dictionary_encode(g.column("u").combine_chunks())
    idx = codes.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(idx, kind="stable")
    first = np.r_[0, np.flatnonzero(np.diff(idx[order])) + 1, len(order)].astype(np.int32)
    take = pa.array(order)
    toks = g.column("t").combine_chunks().take(take)
    sums = g.column("n_sum").combine_chunks().take(take).cast(pa.int64())
    offs = pa.array(first)
    return pa.RecordBatch.from_arrays(
        [
            codes.dictionary.take(pa.array(idx[order][first[:-1]])).cast(pa.string()),
            pa.ListArray.from_arrays(offs, toks),
            pa.ListArray.from_arrays(offs, sums),
        ],
        names=["user_id", "tokens", "n"],
    )


def token_counts(sessions: DataFrame, vocab: Vocab, interest: str) -> DataFrame:
    """``(user_id, tokens array<string>, n array<long>)``: one row per user with their distinct
    behaviour tokens over ``sessions`` and how often each occurs (``long_counts`` gives them a
    row per token). Counted per Arrow batch on the executors; only users whose sessions span
    batches are merged in Spark, so the shuffle carries one row per user and batch, not one
    per token (at 100M events: 2.1M rows instead of 250M, see docs/SCALING.md)."""
    per_batch = token_count_parts(sessions, vocab, interest)
    # a user counted in several batches: the parts summed token by token (in SQL, not a second
    # Python pass: a mapInArrow over these nested lists hung once at 10M events, not reproduced)
    parts = per_batch.groupBy("user_id").agg(F.collect_list(F.struct("tokens", "n")).alias("parts"))
    summed = F.aggregate(
        "parts",
        F.create_map().cast(T.MapType(T.StringType(), T.LongType(), False)),
        lambda acc, p: F.map_zip_with(
            acc, F.map_from_arrays(p["tokens"], p["n"]), lambda _k, a, b: F.coalesce(a, F.lit(0)) + F.coalesce(b, F.lit(0))
        ),
    )
    one = F.col("parts")[0]
    merged = parts.select("user_id", "parts", F.when(F.size("parts") > 1, summed).alias("_m"))
    return merged.select(
        "user_id",
        F.when(F.col("_m").isNull(), one["tokens"]).otherwise(F.map_keys("_m")).alias("tokens"),
        F.when(F.col("_m").isNull(), one["n"]).otherwise(F.map_values("_m")).alias("n"),
    )


def token_count_parts(sessions: DataFrame, vocab: Vocab, interest: str) -> DataFrame:
    """``token_counts`` before its merge: a row per user and Arrow batch of ``sessions`` (a user
    whose sessions span batches has several rows, to be summed)."""
    cols = [c for c in SESSION_COLUMNS if c in sessions.columns]
    vocab_json = vocab.to_json()

    def count(batches):
        v = Vocab.from_json(vocab_json)
        for b in batches:
            if b.num_rows == 0:
                continue
            row, tok = session_tokens(b, v, interest)
            if len(tok) == 0:
                continue
            yield group_by_user(b.column("user_id").take(pa.array(row)), tok)

    return sessions.select(*cols).mapInArrow(count, USER_COUNTS_SCHEMA)


def long_counts(counts: DataFrame) -> DataFrame:
    """``(user_id, token, n)``: ``token_counts`` with a row per user and token."""
    return counts.select("user_id", F.explode(F.arrays_zip("tokens", "n")).alias("e")).select(
        "user_id", F.col("e.tokens").alias("token"), F.col("e.n").alias("n")
    )


def _weights(counts: np.ndarray, idf: np.ndarray) -> np.ndarray:
    return (1.0 + np.log(np.maximum(counts, 1.0))) * idf


def project(rows: np.ndarray, cols: np.ndarray, counts: np.ndarray, n_users: int, model: TokenModel) -> np.ndarray:
    """User vectors ``[n_users, dim]`` from COO token counts (rows = user index, cols = token
    index): sublinear TF-IDF, L2, SVD projection, L2. Users without known tokens get zeros."""
    from scipy import sparse

    w = _weights(counts.astype(np.float64), model.idf[cols])
    X = sparse.csr_matrix((w, (rows, cols)), shape=(n_users, len(model.tokens)))
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    X = sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ X
    Z = np.asarray(X @ model.components.T.astype(np.float64))
    zn = np.linalg.norm(Z, axis=1, keepdims=True)
    return (Z / np.maximum(zn, 1e-12)).astype(np.float32)


def fit(counts: DataFrame, vocab_size: int, min_df: int, dim: int, fit_users: int, seed: int, interest: str) -> TokenModel:
    """Vocabulary (the ``vocab_size`` tokens used by most users, at least ``min_df``), idf over
    every user, and the SVD fitted on a seeded hash sample of about ``fit_users`` users."""
    from scipy import sparse
    from sklearn.decomposition import TruncatedSVD

    from seqclust.core.sampling import user_sample

    n_users = counts.count()  # a row per user
    ranked = (
        counts.select(F.explode("tokens").alias("token"))
        .groupBy("token")
        .agg(F.count("*").alias("df"))
        .where(F.col("df") >= min_df)
        .orderBy(F.desc("df"), "token")
        .limit(vocab_size)
        .collect()
    )
    if not ranked:
        raise ValueError(f"behaviour tokens: no token is used by {min_df} or more users")
    tokens = tuple(r["token"] for r in ranked)
    df = np.array([r["df"] for r in ranked], dtype=np.float64)
    idf = np.log((1.0 + n_users) / (1.0 + df)) + 1.0  # scikit-learn's smooth idf
    spark = counts.sparkSession
    vdf = spark.createDataFrame([(t, i) for i, t in enumerate(tokens)], "token string, col int")
    sample = (
        long_counts(user_sample(n_users, fit_users, seed)(counts, "user_id")).join(F.broadcast(vdf), "token").select("user_id", "col", "n")
    )
    # sorted: the matrix, so the SVD and the artifact's hash, must not depend on partitioning
    t = to_arrow(sample).sort_by([("user_id", "ascending"), ("col", "ascending")])
    uid = pc.dictionary_encode(t.column("user_id").combine_chunks())
    rows = uid.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_sample = len(uid.dictionary)
    cols = t.column("col").to_numpy().astype(np.int64)
    cnt = t.column("n").to_numpy().astype(np.float64)
    X = sparse.csr_matrix((_weights(cnt, idf[cols]), (rows, cols)), shape=(n_sample, len(tokens)))
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
    X = sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ X
    k = min(dim, len(tokens) - 1, n_sample - 1)
    if k >= 1:
        comp = TruncatedSVD(k, random_state=seed, n_iter=7).fit(X).components_
    else:  # one token (a view-only log without items): the vector is that token
        comp = np.eye(len(tokens))
    log.info(
        "behaviour tokens: %d tokens (interest: %s) over %d users, SVD to %d dimensions on %d sampled users",
        len(tokens),
        interest,
        n_users,
        comp.shape[0],
        n_sample,
    )
    return TokenModel(tokens, idf, np.asarray(comp, dtype=np.float32), interest, int(n_users))


def vocab_coo(b: pa.RecordBatch, value_set: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, vocabulary index, count) of each token of a batch of ``token_counts`` rows that
    ``value_set`` (the vocabulary) holds; other tokens dropped."""
    offs, toks = list_parts(b.column("tokens"))
    _, ns = list_parts(b.column("n"))
    found = pc.index_in(toks, value_set=value_set)
    ok = pc.is_valid(found).to_numpy(zero_copy_only=False)
    idx = pc.fill_null(found, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(b.num_rows), np.diff(offs))
    return rows[ok], idx[ok], ns.to_numpy(zero_copy_only=False).astype(np.float64)[ok]


def user_vectors(counts: DataFrame, model: TokenModel) -> DataFrame:
    """``(user_id, tokens_vec array<float>)`` for every user of ``counts`` (on the executors;
    the model's arrays are shipped once per task as npz bytes, nothing pickled)."""
    meta, npz = model.to_json(), model.arrays_npz()
    out = T.StructType([T.StructField("user_id", T.StringType()), T.StructField("tokens_vec", T.ArrayType(T.FloatType(), False))])

    def vectors(batches):
        m = TokenModel.load(meta, npz)
        value_set = pa.array(m.tokens, pa.string())
        for b in batches:
            if b.num_rows == 0:
                continue
            rows, idx, counts_ = vocab_coo(b, value_set)
            Z = project(rows, idx, counts_, b.num_rows, m)
            d = Z.shape[1]
            vec = pa.ListArray.from_arrays(
                pa.array(np.arange(0, b.num_rows * d + 1, d, dtype=np.int32)), pa.array(Z.reshape(-1), pa.float32())
            )
            yield pa.RecordBatch.from_arrays([b.column("user_id"), vec], names=["user_id", "tokens_vec"])

    return counts.select("user_id", "tokens", "n").mapInArrow(vectors, out)
