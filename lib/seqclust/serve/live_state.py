"""A live user's state and segment: each micro-batch adds its closed sessions to the pooling state
of their users (``live_user_state``: the sum and count of the session vectors, the
behaviour-token counts, the latest session — the sufficient statistics of ``embed``'s mean
pooling and token vector) and places the user made from it as ``seqclust assign --model``
does (nearest centre, the model run's token segments, down the segment tree).

A state row keeps the state before the batch that wrote it (``prev_*``): a re-run of that batch
(a crash after the MERGE, before Spark's commit) starts from it again, so a batch counts once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.config import EmbedConfig
from seqclust.represent import behaviour
from seqclust.represent.features import list_parts
from seqclust.segment.hierarchy import Tree
from seqclust.serve.placement import Model, placer

_STR, _LONG, _TS = T.StringType(), T.LongType(), T.TimestampType()
_VEC, _TOKS, _NS = T.ArrayType(T.DoubleType()), T.ArrayType(T.StringType()), T.ArrayType(T.LongType())
_STATE_COLS = (
    ("sessions", _LONG),
    ("vector_sum", _VEC),
    ("tokens", _TOKS),
    ("n", _NS),
    ("last_end_ts", _TS),
    ("last_session_id", _STR),
)
# a user's placement, as the updater computes it and live_segments stores it
PLACEMENT = ("cluster_id", "distance_to_centroid", "confidence", "leaf_id", "segment_path", "leaf_confidence")
UPDATED = T.StructType(
    [
        T.StructField("user_id", _STR),
        *[T.StructField(c, t) for c, t in _STATE_COLS],
        *[T.StructField(f"prev_{c}", t) for c, t in _STATE_COLS],
        T.StructField("cluster_id", T.IntegerType()),
        T.StructField("distance_to_centroid", T.DoubleType()),
        T.StructField("confidence", T.DoubleType()),
        T.StructField("leaf_id", T.IntegerType()),
        T.StructField("segment_path", T.StringType()),
        T.StructField("leaf_confidence", T.DoubleType()),
    ]
)


def live_updater(model: Model, cfg: EmbedConfig) -> Any:
    """A ``mapInArrow`` function over rows sorted by user (within a partition holding all of a
    user's rows) to ``UPDATED``: per user, the stored state (``kind`` 0) plus the new sessions'
    vector sum, count and latest session (1) and token counts (2, several rows when counted
    in several batches) — ``_combine`` — then the user's segment as ``seqclust assign`` places
    users (``_place``). A user whose rows straddle two Arrow batches is held back to the next.
    The model's arrays travel as npz bytes and JSON, nothing pickled."""
    from seqclust.represent.behaviour import TokenModel
    from seqclust.segment.refine import TokenSegments

    art = model.artifact
    tm = art.token_model if (cfg.representation != "encoder" or model.token_segments is not None) else None
    meta, npz = (tm.to_json(), tm.arrays_npz()) if tm is not None else (None, None)
    segs_npz = model.token_segments.to_npz() if model.token_segments is not None else None
    centers = np.asarray(model.centers, dtype=np.float64)
    tree = model.tree if model.tree is not None else Tree.flat(centers)
    paths, parent, nodes = tree.paths, tree.parent.copy(), tree.centers.copy()

    def run(batches: Any) -> Any:
        tmodel = TokenModel.load(meta, npz) if meta is not None and npz is not None else None
        segs = TokenSegments.from_npz(segs_npz) if segs_npz is not None else None
        place = _placer(cfg, tmodel, segs, centers, Tree(paths, parent, nodes))
        carry: pa.Table | None = None
        for b in batches:
            if b.num_rows == 0:
                continue
            t = pa.Table.from_batches([b])
            t = pa.concat_tables([carry, t]) if carry is not None else t
            users = t.column("user_id").to_numpy(zero_copy_only=False)
            other = np.flatnonzero(users != users[-1])
            cut = int(other[-1]) + 1 if len(other) else 0  # the last user's rows may go on in the next batch
            if cut:
                yield place(_combine(t.slice(0, cut)))
            carry = t.slice(cut)
        if carry is not None and carry.num_rows:
            yield place(_combine(carry))

    return run


def _combine(t: pa.Table) -> dict[str, Any]:
    """Each user's new state from rows sorted by (user, kind): sums of sessions, vectors (the
    stored sum first, then the new sessions': the order of the SQL form) and token counts, the
    latest (end time, session id); ``prev_*``: the stored row."""
    t = t.combine_chunks()
    users = t.column("user_id").to_numpy(zero_copy_only=False)
    start = np.r_[True, users[1:] != users[:-1]]
    g = np.cumsum(start) - 1
    n_users = int(g[-1]) + 1
    kind = t.column("kind").to_numpy(zero_copy_only=False)
    sessions = np.zeros(n_users, np.int64)
    np.add.at(sessions, g, t.column("sessions").to_numpy(zero_copy_only=False).astype(np.int64))
    vec = t.column("vec").chunk(0)
    has_vec = pc.is_valid(vec).to_numpy(zero_copy_only=False)
    flat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    dim = len(flat) // max(int(has_vec.sum()), 1)
    sums = np.zeros((n_users, dim))
    np.add.at(sums, g[has_vec], flat.reshape(-1, dim))
    # token counts: (user, token) summed, then one list per user (empty when none)
    offs, toks = list_parts(t.column("tokens"))
    _, ns = list_parts(t.column("n"))
    owner = g[np.repeat(np.arange(t.num_rows), np.diff(offs))]
    agg = pa.table({"g": owner, "t": toks, "n": ns}).group_by(["g", "t"], use_threads=False).aggregate([("n", "sum")])
    gg = agg.column("g").to_numpy()
    order = np.argsort(gg, kind="stable")
    tok_offs = np.r_[0, np.cumsum(np.bincount(gg, minlength=n_users))].astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(tok_offs), agg.column("t").combine_chunks().take(pa.array(order)))
    counts = pa.ListArray.from_arrays(pa.array(tok_offs), agg.column("n_sum").combine_chunks().take(pa.array(order)).cast(pa.int64()))
    # the latest session: the largest (end time, session id) of a user's rows
    last = pa.table({"g": g, "e": t.column("last_end_ts"), "s": t.column("last_session_id"), "i": np.arange(t.num_rows)})
    last = last.filter(pc.is_valid(last.column("e"))).sort_by([("g", "ascending"), ("e", "ascending"), ("s", "ascending")])
    lg = last.column("g").to_numpy()
    final = np.r_[lg[1:] != lg[:-1], True] if len(lg) else np.zeros(0, bool)
    pick = np.full(n_users, -1, np.int64)
    pick[lg[final]] = last.column("i").to_numpy()[final]
    stored = np.full(n_users, -1, np.int64)
    old = np.flatnonzero(kind == 0)
    stored[g[old]] = old

    def at(col: str, idx: np.ndarray) -> pa.Array:
        return t.column(col).chunk(0).take(pa.array(idx, mask=idx < 0))

    first = np.flatnonzero(start)
    out = {
        "user_id": t.column("user_id").chunk(0).take(pa.array(first)),
        "sessions": sessions,
        "vector_sum": sums,
        "tokens": tokens,
        "n": counts,
        "last_end_ts": at("last_end_ts", pick),
        "last_session_id": at("last_session_id", pick),
    }
    for col in ("sessions", "vec", "tokens", "n", "last_end_ts", "last_session_id"):
        out[f"prev_{'vector_sum' if col == 'vec' else col}"] = at(col, stored)
    return out


def _placer(cfg: EmbedConfig, tmodel: Any, segs: Any, centers: np.ndarray, tree: Tree) -> Any:
    """``_combine``'s users -> an ``UPDATED`` batch: the state's columns and the user's
    placement (``placement.placer``: segment, distance, leaf, path, confidences)."""
    placed = placer(cfg, tmodel, segs, centers, tree)

    def place(u: dict[str, Any]) -> pa.RecordBatch:
        vs = u["vector_sum"]
        n, dim = vs.shape
        vec = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(vs.reshape(-1)))
        cols = {**u, "sessions": pa.array(u["sessions"]), "vector_sum": vec, **placed(vs, u["tokens"], u["n"])}
        return pa.RecordBatch.from_arrays([cols[f.name] for f in UPDATED.fields], names=UPDATED.fieldNames())

    return place


def updated_users(
    model: Model, cfg: EmbedConfig, old: DataFrame | None, batch_id: int, fresh: DataFrame, fresh_emb: DataFrame
) -> DataFrame:
    """The new pooling state of the users with sessions closed by this batch and their
    segment (``UPDATED``): their state before it (``prev_*`` when the row is this batch's
    own: a re-run) plus the new sessions' sums — the session vectors' sum and count (mean
    pooling, up to the L2 normalisation), the behaviour-token counts, the latest session.

    A few rows per user (the stored state, each new session's vector, their token counts per
    Arrow batch) are brought together by user in one shuffle and combined and placed in one
    Arrow pass (``live_updater``). The DataFrame form (three joins, a map merge per user
    in interpreted SQL, five Python stages to place users) took 12-30 s of a 2-core
    micro-batch for 14-18k users, measured."""
    art = model.artifact
    no_tokens = [F.array().cast("array<string>").alias("tokens"), F.array().cast("array<bigint>").alias("n")]
    no_last = [F.lit(None).cast("timestamp").alias("last_end_ts"), F.lit(None).cast("string").alias("last_session_id")]
    # a row per new session: the updater sums them per user (no aggregation in Spark first)
    parts = [
        fresh_emb.select(
            "user_id",
            F.lit(1).alias("kind"),
            F.lit(1).cast("long").alias("sessions"),
            F.col("embedding").cast("array<double>").alias("vec"),
            *no_tokens,
            F.col("end_ts").alias("last_end_ts"),
            F.col("session_id").alias("last_session_id"),
        )
    ]
    if art.token_model is not None:
        tok = behaviour.token_count_parts(fresh, art.vocab, art.token_model.interest)
        none = [F.lit(0).cast("long").alias("sessions"), F.lit(None).cast("array<double>").alias("vec")]
        parts.append(tok.select("user_id", F.lit(2).alias("kind"), *none, "tokens", "n", *no_last))
    if old is not None:
        mine = F.col("batch_id") == F.lit(batch_id)

        def base(c: str) -> Any:
            return F.when(mine, F.col(f"prev_{c}")).otherwise(F.col(c))

        before = old.join(fresh_emb.select("user_id"), "user_id", "left_semi").select(
            "user_id",
            F.lit(0).alias("kind"),
            base("sessions").alias("sessions"),
            base("vector_sum").alias("vec"),
            F.map_keys(base("token_counts")).alias("tokens"),
            F.map_values(base("token_counts")).alias("n"),
            base("last_end_ts").alias("last_end_ts"),
            base("last_session_id").alias("last_session_id"),
        )
        parts.insert(0, before.where(F.col("sessions").isNotNull()))  # a re-run of a user's first batch: no state before
    rows = parts[0]
    for p in parts[1:]:
        rows = rows.unionByName(p)
    n = int(fresh.sparkSession.conf.get("spark.sql.shuffle.partitions") or 4)
    # sorted by session id too: the vector sums are added in one order, run after run
    rows = rows.repartition(n, "user_id").sortWithinPartitions("user_id", "kind", "last_session_id")
    return rows.mapInArrow(live_updater(model, cfg), UPDATED)


def split_updated(batch_id: int, out: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(``live_user_state`` rows, labels) of ``updated_users``' rows."""
    tok = F.map_from_arrays("tokens", "n")
    prev_tok = F.when(F.col("prev_tokens").isNotNull(), F.map_from_arrays("prev_tokens", "prev_n"))
    state = out.select(
        "user_id",
        F.lit(batch_id).cast("long").alias("batch_id"),
        "sessions",
        "vector_sum",
        tok.alias("token_counts"),
        "last_end_ts",
        "last_session_id",
        "prev_sessions",
        "prev_vector_sum",
        prev_tok.alias("prev_token_counts"),
        "prev_last_end_ts",
        "prev_last_session_id",
    )
    labels = out.select(
        "user_id",
        *PLACEMENT,
        F.col("sessions").alias("sessions_counted"),
        "last_session_id",
    )
    return state, labels
