"""Sessions -> fixed-size integer matrices for the encoder (numpy + Arrow, no TensorFlow).

Each event of a session becomes four ids: its token (``event_type:category``, from a
vocabulary built in Spark), its event type, its pace (a bucket of the seconds since the
previous event) and its price level (a band of log(price / the category's median price), so
the feature means the same in any currency). The newest ``max_len`` events are kept,
left-aligned and padded with 0 at the end.

The same code runs on the driver (training) and on executors (embedding), on Arrow list
columns directly, so no per-event Python objects are created.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD, OOV, MASK = 0, 1, 2
TOKEN_OFFSET = 3
EVENT_TYPES = ("view", "search", "cart", "fav", "purchase", "other")
# seconds since the previous event; id 1 = first event of the session, 2.. = buckets
GAP_EDGES = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
FIELDS = ("tok", "etype", "gap", "price")
INPUT_COLUMNS = ("tokens", "event_types", "categories", "items", "prices", "gaps_s")


def input_columns(columns: list[str], token_fields: tuple[str, ...] | list[str] = ("item",)) -> list[str]:
    """The INPUT_COLUMNS to read from a DataFrame with ``columns``: ``items`` only where it
    exists and the tokens use it."""
    return [c for c in INPUT_COLUMNS if c != "items" or (c in columns and "item" in token_fields)]


# what a token is made of (tokenize.token_fields); the default is the event type x category
TOKEN_FIELDS = ("event_type", "category", "item", "price_band", "gap_bucket")
DEFAULT_TOKEN_FIELDS = ("event_type", "category")


@dataclass(frozen=True)
class Vocab:
    """Everything needed to featurise sessions the way the encoder was trained."""

    tokens: tuple[str, ...]
    categories: tuple[str, ...]
    category_median_price: tuple[float, ...]
    global_median_price: float
    price_edges: tuple[float, ...]  # on log(price / category median)
    max_len: int
    token_counts: tuple[int, ...] = field(default=())
    token_fields: tuple[str, ...] = DEFAULT_TOKEN_FIELDS

    @property
    def sizes(self) -> dict[str, int]:
        """Embedding table size per field, including PAD and MASK ids."""
        return {
            "tok": len(self.tokens) + TOKEN_OFFSET,
            "etype": len(EVENT_TYPES) + 2,  # 0 pad, 1..6, mask
            "gap": len(GAP_EDGES) + 4,  # 0 pad, 1 start, 2..10, mask
            "price": len(self.price_edges) + 4,  # 0 pad, 1 no price, 2..bands+1, mask
        }

    @property
    def mask_ids(self) -> dict[str, int]:
        return {f: (MASK if f == "tok" else s - 1) for f, s in self.sizes.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> Vocab:
        d = json.loads(text)
        kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return Vocab(**kwargs)


def list_parts(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Offsets (relative to the returned flat values) and flat values of a list column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    offsets = col.offsets.to_numpy().astype(np.int64)
    flat = col.values.slice(offsets[0], offsets[-1] - offsets[0])
    return offsets - offsets[0], flat


def _ids(values: pa.Array, value_set: pa.Array, offset: int, missing: int) -> np.ndarray:
    idx = pc.index_in(values, value_set=value_set)
    return pc.fill_null(pc.add(idx, offset), missing).to_numpy().astype(np.int32)


@dataclass
class EventParts:
    """Per-event values of a batch of sessions, flat, with the list offsets."""

    offsets: np.ndarray
    event_type: pa.Array
    category: pa.Array
    item: pa.Array | None
    etype: np.ndarray  # ids
    gap: np.ndarray  # pace bucket ids (1 = first event)
    band: np.ndarray  # price band ids (1 = no price)


def event_parts(batch: pa.RecordBatch | pa.Table, vocab: Vocab) -> EventParts:
    """Event-level ids of a batch with INPUT_COLUMNS (``items`` optional)."""
    offsets, et_flat = list_parts(batch.column("event_types"))
    _, cat_flat = list_parts(batch.column("categories"))
    _, price_flat = list_parts(batch.column("prices"))
    _, gap_flat = list_parts(batch.column("gaps_s"))
    item_flat = list_parts(batch.column("items"))[1] if "items" in batch.schema.names else None

    etype = _ids(et_flat, pa.array(EVENT_TYPES, pa.string()), 1, len(EVENT_TYPES))  # unknown -> other
    gaps = pc.fill_null(gap_flat.cast(pa.float64()), 0.0).to_numpy()
    gap = (np.searchsorted(np.asarray(GAP_EDGES), gaps, side="right") + 2).astype(np.int32)
    starts = offsets[:-1]
    gap[starts[offsets[1:] > starts]] = 1

    cat_idx = pc.index_in(cat_flat, value_set=pa.array(vocab.categories, pa.string()))
    medians = np.asarray(vocab.category_median_price + (vocab.global_median_price,), dtype=np.float64)
    med = medians[pc.fill_null(cat_idx, len(vocab.categories)).to_numpy()]
    price = price_flat.cast(pa.float64())
    has_price = pc.and_(pc.is_valid(price), pc.greater(pc.fill_null(price, 0.0), 0.0)).to_numpy(zero_copy_only=False)
    p = pc.fill_null(price, 1.0).to_numpy()
    ratio = np.log(np.maximum(p, 1e-9) / np.maximum(med, 1e-9))
    band = (np.searchsorted(np.asarray(vocab.price_edges), ratio, side="right") + 2).astype(np.int32)
    band[~has_price] = 1
    return EventParts(offsets, et_flat, cat_flat, item_flat, etype, gap, band)


def compose_tokens(parts: EventParts, fields: tuple[str, ...]) -> pa.Array:
    """The flat token strings of ``parts``: the chosen fields joined by ``:`` (``p<band>`` and
    ``g<bucket>`` for the price band and pace bucket). The default fields give the
    ``event_type:category`` tokens the sessions table holds."""
    cols: list[pa.Array] = []
    for f in fields:
        if f == "event_type":
            cols.append(pc.fill_null(parts.event_type.cast(pa.string()), ""))
        elif f == "category":
            cols.append(pc.fill_null(parts.category.cast(pa.string()), ""))
        elif f == "item":
            if parts.item is None:
                raise ValueError("tokenize.token_fields has 'item' but the sessions carry no items")
            cols.append(pc.fill_null(parts.item.cast(pa.string()), ""))
        elif f == "price_band":
            cols.append(pc.binary_join_element_wise(pa.scalar("p"), pa.array(parts.band).cast(pa.string()), ""))
        elif f == "gap_bucket":
            cols.append(pc.binary_join_element_wise(pa.scalar("g"), pa.array(parts.gap).cast(pa.string()), ""))
        else:
            raise ValueError(f"unknown token field {f!r}")
    return cols[0] if len(cols) == 1 else pc.binary_join_element_wise(*cols, ":")


def featurize(batch: pa.RecordBatch | pa.Table, vocab: Vocab) -> dict[str, np.ndarray]:
    """Turn a batch with INPUT_COLUMNS into int32 matrices ``[rows, max_len]`` per field."""
    parts = event_parts(batch, vocab)
    offsets = parts.offsets
    n = len(offsets) - 1
    L = vocab.max_len
    if tuple(vocab.token_fields) == DEFAULT_TOKEN_FIELDS and "tokens" in batch.schema.names:
        tok_flat = list_parts(batch.column("tokens"))[1]  # already composed by sessionize
    else:
        tok_flat = compose_tokens(parts, tuple(vocab.token_fields))
    tok = _ids(tok_flat, pa.array(vocab.tokens, pa.string()), TOKEN_OFFSET, OOV)
    etype, gap, band = parts.etype, parts.gap, parts.band

    lens = np.diff(offsets)
    keep = np.minimum(lens, L)
    total = int(keep.sum())
    row = np.repeat(np.arange(n), keep)
    first = np.cumsum(keep) - keep
    pos = np.arange(total) - np.repeat(first, keep)
    src = np.repeat(offsets[1:] - keep, keep) + pos
    out = {}
    for name, flat in (("tok", tok), ("etype", etype), ("gap", gap), ("price", band)):
        m = np.zeros((n, L), dtype=np.int32)
        m[row, pos] = flat[src]
        out[name] = m
    return out


def price_edges_from_ratios(log_ratios: np.ndarray, bands: int) -> tuple[float, ...]:
    """Quantile edges of log(price/category median) giving ``bands`` roughly equal bands."""
    r = log_ratios[np.isfinite(log_ratios)]
    if len(r) == 0:
        return tuple(np.linspace(-1, 1, bands - 1).tolist())
    qs = np.quantile(r, np.linspace(0, 1, bands + 1)[1:-1])
    qs = np.unique(np.round(qs, 6))
    return tuple(float(x) for x in qs)
