"""The sessionizer's vectorised engine: one shuffle by user, a sort, then numpy over Arrow batches.

Spark hash-partitions events by user and sorts each partition by (user, event order); a
``mapInArrow`` function walks the sorted batches, carrying the last user of a batch over to
the next, and emits finished sessions (and runaway sessions) directly as Arrow list columns.
Compared with the window-function plan (``sessionize.assign_sessions`` + ``build_sessions``)
it saves the second shuffle (group by session) and every per-row window evaluation.

The rules are those of ``sessionize`` and the ids are the same (``sha256(user|start µs[|piece])``);
``tests/test_sessionize.py`` holds both engines and an independent DuckDB implementation to
identical output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from seqclust.core.config import SessionizeConfig
from seqclust.core.tables import SESSION_PIECES, arrow_schema

US_PER_MIN = 60_000_000
US_PER_DAY = 86_400_000_000

# sessions and runaway pieces (``reason`` not null: the runaway reason, lists left empty)
SPARK_SCHEMA = SESSION_PIECES
OUT_SCHEMA = arrow_schema(SESSION_PIECES)
SORT_COLUMNS = ("user_id", "ts", "event_type", "category_id", "item_id", "event_id", "price")


def session_ids(users: list[str], start_us: np.ndarray, pieces: np.ndarray | None = None) -> list[str]:
    """The ids ``sessionize.session_id`` computes in Spark, computed here in Python."""
    out = []
    for i, (u, s) in enumerate(zip(users, start_us.tolist())):
        key = f"{u}|{s}" if pieces is None or pieces[i] == 0 else f"{u}|{s}|{int(pieces[i])}"
        out.append(hashlib.sha256(key.encode()).hexdigest()[:32])
    return out


def _local_day(ts: pa.Array, tz: str) -> np.ndarray:
    if tz in ("UTC", "Etc/UTC", "Z"):
        return ts.cast(pa.int64()).to_numpy(zero_copy_only=False) // US_PER_DAY
    local = pc.local_timestamp(ts)  # wall time in the array's zone
    return local.cast(pa.int64()).to_numpy(zero_copy_only=False) // US_PER_DAY


def _list(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def sessionize_table(t: pa.Table, cfg: SessionizeConfig) -> pa.Table:
    """Sessions of the complete users in ``t`` (sorted by ``SORT_COLUMNS``) as ``OUT_SCHEMA``."""
    n = t.num_rows
    if n == 0:
        return OUT_SCHEMA.empty_table()
    user = t.column("user_id").combine_chunks()
    ts = t.column("ts").combine_chunks()
    if ts.type.tz is None:
        ts = ts.cast(pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC"))
    ts = ts.cast(pa.timestamp("us", tz="UTC"))
    m = ts.cast(pa.int64()).to_numpy(zero_copy_only=False)

    new = np.ones(n, dtype=bool)
    if n > 1:
        same_user = pc.equal(user.slice(1), user.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        new[1:] = ~same_user | ((m[1:] - m[:-1]) > cfg.gap_minutes * US_PER_MIN)
        if cfg.midnight_split:
            day = _local_day(ts.cast(pa.timestamp("us", tz=cfg.timezone)), cfg.timezone)
            new[1:] |= day[1:] != day[:-1]
    starts = np.flatnonzero(new)
    sess = np.cumsum(new) - 1
    ends = np.append(starts[1:], n)
    cnt = ends - starts
    first, last = m[starts], m[ends - 1]
    minutes = np.maximum((last - first) / 6e7, 1.0)
    too_fast = (cnt >= cfg.bot_min_events) & (cnt / minutes > cfg.bot_events_per_minute)
    too_many = ~too_fast & (cnt > cfg.bot_max_events)
    bot = too_fast | too_many

    # cuts: windows of max_duration from the session's start, then chunks of max_events
    win = np.floor((m - first[sess]) / (cfg.max_duration_minutes * US_PER_MIN)).astype(np.int64)
    group_new = new.copy()
    group_new[1:] |= win[1:] != win[:-1]
    g_start = np.flatnonzero(group_new)
    pos = np.arange(n) - g_start[np.cumsum(group_new) - 1]
    chunk = pos // cfg.max_events
    piece = win * 1_000_000 + chunk
    piece_new = group_new.copy()
    piece_new[1:] |= chunk[1:] != chunk[:-1]

    keep = ~bot[sess]
    parts = []
    if keep.any():
        parts.append(_pieces(t, user, ts, m, keep, piece_new, piece, starts[sess], cfg))
    if bot.any():
        parts.append(_runaway(user, ts, starts[bot], ends[bot], np.where(too_fast[bot], "too_fast", "too_many_events")))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _pieces(t, user, ts, m, keep, piece_new, piece, root_row, cfg: SessionizeConfig) -> pa.Table:
    idx = np.flatnonzero(keep)
    mk = m[idx]
    pn = piece_new[idx]
    pstart = np.flatnonzero(pn)
    offsets = np.append(pstart, len(idx))
    cnt = np.diff(offsets)
    take = pa.array(idx)
    etype = t.column("event_type").combine_chunks().take(take)
    cat = pc.fill_null(t.column("category_id").combine_chunks().take(take), "")
    item = pc.fill_null(t.column("item_id").combine_chunks().take(take), "")
    price = t.column("price").combine_chunks().take(take).cast(pa.float64())
    gaps = np.zeros(len(idx))
    gaps[1:] = (mk[1:] - mk[:-1]) / 1e6
    gaps[pstart] = 0.0
    first_us, last_us = mk[pstart], mk[offsets[1:] - 1]

    # event counts per piece, in order of first appearance (as array_distinct gives them)
    codes = pc.dictionary_encode(etype).combine_chunks() if isinstance(etype, pa.ChunkedArray) else pc.dictionary_encode(etype)
    code = codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    pid = np.cumsum(pn) - 1
    key = pid * (len(codes.dictionary) + 1) + code
    uniq, first_pos, counts = np.unique(key, return_index=True, return_counts=True)
    order = np.lexsort((first_pos, uniq // (len(codes.dictionary) + 1)))
    uniq, counts = uniq[order], counts[order]
    kpid = uniq // (len(codes.dictionary) + 1)
    koff = np.searchsorted(kpid, np.arange(len(pstart) + 1))
    keys = codes.dictionary.take(pa.array(uniq % (len(codes.dictionary) + 1)))
    event_counts = pa.MapArray.from_arrays(pa.array(koff, pa.int32()), keys, pa.array(counts, pa.int32()))

    users = user.take(pa.array(idx[pstart]))
    start_ts = ts.take(pa.array(idx[pstart]))
    end_ts = ts.take(pa.array(idx[offsets[1:] - 1]))
    return pa.table(
        {
            "session_id": pa.array(session_ids(users.to_pylist(), first_us, piece[idx[pstart]]), pa.string()),
            "user_id": users,
            "start_ts": start_ts,
            "end_ts": end_ts,
            "duration_s": pa.array((last_us - first_us) / 1e6),
            "n_events": pa.array(cnt, pa.int32()),
            "event_counts": event_counts,
            "event_types": _list(offsets, etype),
            "categories": _list(offsets, cat),
            "items": _list(offsets, item),
            "prices": _list(offsets, price),
            "gaps_s": _list(offsets, pa.array(gaps)),
            "tokens": _list(offsets, pc.binary_join_element_wise(etype, cat, ":")),
            "is_modelled": pa.array(cnt >= cfg.min_events),
            "root_start_ts": ts.take(pa.array(root_row[idx[pstart]])),
            "reason": pa.nulls(len(pstart), pa.string()),
        },
        schema=OUT_SCHEMA,
    )


def _runaway(user, ts, starts, ends, reasons) -> pa.Table:
    m = ts.cast(pa.int64()).to_numpy(zero_copy_only=False)
    users = user.take(pa.array(starts))
    k = len(starts)
    empty = np.zeros(k + 1, dtype=np.int32)
    cols = {
        "session_id": pa.array(session_ids(users.to_pylist(), m[starts]), pa.string()),
        "user_id": users,
        "start_ts": ts.take(pa.array(starts)),
        "end_ts": ts.take(pa.array(ends - 1)),
        "duration_s": pa.array((m[ends - 1] - m[starts]) / 1e6),
        "n_events": pa.array(ends - starts, pa.int32()),
        "event_counts": pa.MapArray.from_arrays(pa.array(empty), pa.array([], pa.string()), pa.array([], pa.int32())),
        "is_modelled": pa.array(np.zeros(k, dtype=bool)),
        "root_start_ts": ts.take(pa.array(starts)),
        "reason": pa.array(reasons, pa.string()),
    }
    for name, typ in (("event_types", pa.string()), ("categories", pa.string()), ("items", pa.string()), ("prices", pa.float64())):
        cols[name] = _list(empty, pa.array([], typ))
    cols["gaps_s"] = _list(empty, pa.array([], pa.float64()))
    cols["tokens"] = _list(empty, pa.array([], pa.string()))
    return pa.table({f.name: cols[f.name] for f in OUT_SCHEMA}, schema=OUT_SCHEMA)


def _partition_fn(cfg: SessionizeConfig):
    def fn(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        carry: pa.Table | None = None
        for batch in batches:
            if batch.num_rows == 0:
                continue
            t = pa.Table.from_batches([batch])
            if carry is not None:
                t = pa.concat_tables([carry, t])
            # the last user may go on in the next batch: hold its rows back
            user = t.column("user_id")
            same = pc.equal(user, user[-1]).to_numpy(zero_copy_only=False)
            other = np.flatnonzero(~same)
            cut = int(other[-1]) + 1 if len(other) else 0
            carry = t.slice(cut)
            if cut > 0:
                yield from sessionize_table(t.slice(0, cut), cfg).to_batches()
        if carry is not None and carry.num_rows:
            yield from sessionize_table(carry, cfg).to_batches()

    return fn


def sessionize_arrow(events: DataFrame, cfg: SessionizeConfig, partitions: int | None = None) -> DataFrame:
    """Clean events -> one row per session piece (``OUT_SCHEMA``: sessions and, with a
    ``reason``, runaway sessions). One shuffle (by user), one sort, no per-row Python."""
    spark = events.sparkSession
    n = partitions or int(spark.conf.get("spark.sql.shuffle.partitions") or 200)
    ordered = (
        events.select(
            F.col("user_id").cast("string"),
            "ts",
            "event_type",
            F.coalesce("category_id", F.lit("")).alias("category_id"),
            F.coalesce("item_id", F.lit("")).alias("item_id"),
            F.coalesce("event_id", F.lit("")).alias("event_id"),
            F.col("price").cast("double"),
        )
        .repartition(n, "user_id")
        .sortWithinPartitions(*SORT_COLUMNS)
    )
    return ordered.mapInArrow(_partition_fn(cfg), SPARK_SCHEMA)
