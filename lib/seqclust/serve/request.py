"""Segments at request time: the events of one or more users in, one row per user out — their
segment at the top and at the leaf of the model run's tree, the distance to its centre, how sure
the placement is and what the segment does — in milliseconds, without Spark.

Each step is the library's own per-batch code, the code the Spark stages run inside their
Arrow UDFs: the Arrow sessionizer (``sessionize.arrow_engine.sessionize_table``), the encoder's
features and forward pass (``represent.features.featurize``, ``represent.encoder.embedding_fn``),
the behaviour tokens (``represent.behaviour.session_tokens``) and the placement shared with the
stream (``serve.placement.placer``). Only the validation of raw events is written for pandas
here (``validate_events``: the rules of ``ingest.stage.validate``, held to it by a test), since
Spark's column expressions do not run without Spark.

A model is a folder (``bundle.write_bundle`` makes it from a model run's tables): the encoder
artifact (weights, configuration and vocabulary; loaded in Keras' safe mode) and
``segments.json`` (centres of every node of the tree, the token segments, the segments'
descriptions, and the run's source, sessionize and embed settings). Nothing is pickled.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from seqclust.core.config import EmbedConfig, SessionizeConfig, SourceConfig, build_section
from seqclust.core.errors import SeqclustError

log = logging.getLogger(__name__)

REQUIRED = ("user_id", "ts")
OPTIONAL = ("event_type", "item_id", "category_id", "price", "event_id")
OUTPUT = (
    "user_id",
    "cluster_id",
    "segment_path",
    "leaf_id",
    "distance_to_centroid",
    "confidence",
    "leaf_confidence",
    "description",
    "sessions",
    "events",
    "model_run_id",
    "encoder_id",
)
BUNDLE_FILE = "segments.json"


class BadRequest(SeqclustError):
    """A request that cannot be scored, with the one-line reason (HTTP 400 when served)."""


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    window_days: float | None = 90.0  # events older than the user's newest by more than this are ignored
    max_events_per_user: int = 10_000
    max_events: int = 100_000


def _epoch_auto(x: np.ndarray) -> np.ndarray:
    """Epoch numbers as microseconds: seconds, milliseconds or microseconds by magnitude
    (``ingest.stage``'s ``auto`` rule)."""
    a = np.abs(x)
    return np.where(a >= 1e14, x, np.where(a >= 1e11, x * 1000, x * 1_000_000))


def _text(values: Any) -> np.ndarray:
    """Stripped text of each value (object array; None where missing)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = None if v is None or (isinstance(v, float) and v != v) or v is pd.NA or v is pd.NaT else str(v).strip()
    return out


_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_ZONED = re.compile(r"(?:Z|[+-]\d{2}:?\d{2}|UTC)$")


def parse_ts(col: pd.Series, source: SourceConfig) -> np.ndarray:
    """Timestamps as UTC microseconds since the epoch (int64; ``NAT`` where unparseable) from
    epoch numbers, datetimes or ISO-8601 text; values without a zone are in ``source.timezone``."""
    tz = source.timezone
    if pd.api.types.is_datetime64_any_dtype(col):
        s = col if col.dt.tz is not None else col.dt.tz_localize(tz, nonexistent="NaT", ambiguous="NaT")
        return _micros(pd.DatetimeIndex(s).tz_convert("UTC"))
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return _epoch(col.to_numpy(dtype=np.float64), source)
    text = _text(col.to_numpy(dtype=object))
    out = np.full(len(text), NAT, dtype=np.int64)
    numeric = np.array([t is not None and _NUMBER.fullmatch(t) is not None for t in text], dtype=bool)
    if numeric.any():
        out[numeric] = _epoch(text[numeric].astype(np.float64), source)
    rest = ~numeric & np.array([bool(t) for t in text], dtype=bool)
    zoned = rest & np.array([t is not None and _ZONED.search(t) is not None for t in text], dtype=bool)
    for mask, utc in ((zoned, True), (rest & ~zoned, False)):
        if mask.any():
            vals = [t[:-3] + "+00:00" if t.endswith("UTC") else t for t in text[mask]]
            p = pd.DatetimeIndex(pd.to_datetime(vals, errors="coerce", utc=utc, **ISO))
            out[mask] = _micros(p if utc else p.tz_localize(tz, nonexistent="NaT", ambiguous="NaT").tz_convert("UTC"))
    return out


NAT = np.iinfo(np.int64).min


# pandas 2 parses mixed ISO-8601 text with format="ISO8601"; pandas 1.5 (the 16.4 LTS runtime) infers it
ISO: dict[str, str] = {"format": "ISO8601"} if int(pd.__version__.split(".")[0]) >= 2 else {}


def _micros(idx: pd.DatetimeIndex) -> np.ndarray:
    us = idx.as_unit("us").asi8.copy() if hasattr(idx, "as_unit") else idx.asi8 // 1000
    us[idx.isna()] = NAT
    return us


def _epoch(x: np.ndarray, source: SourceConfig) -> np.ndarray:
    scale = {"epoch_s": 1e6, "epoch_ms": 1e3}.get(source.ts_format)
    us = x * scale if scale else _epoch_auto(x)
    ok = np.isfinite(us) & (np.abs(us) < 9.2e18)
    return np.where(ok, np.round(np.where(ok, us, 0)).astype(np.int64), NAT)


def validate_events(events: pd.DataFrame, source: SourceConfig, now: dt.datetime) -> tuple[pa.Table, dict[str, int]]:
    """The valid events of a request as the canonical clean columns (sorted as the Arrow
    sessionizer needs), de-duplicated as ingest does, and the refused rows per reason (the
    reasons and order of ``ingest.stage.REASONS``; the first failing check wins)."""
    missing = [c for c in REQUIRED if c not in events.columns]
    if missing:
        raise BadRequest(
            f"the events lack the column(s) {', '.join(missing)} (required: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})"
        )
    unknown = sorted(set(events.columns) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise BadRequest(f"unknown column(s) {', '.join(unknown)} (known: {', '.join(REQUIRED + OPTIONAL)})")
    n = len(events)
    if n == 0:
        raise BadRequest("no events in the request")
    none = np.full(n, None, dtype=object)

    def text(c: str) -> np.ndarray:
        return _text(events[c].to_numpy(dtype=object)) if c in events.columns else none

    user = text("user_id")
    ts = parse_ts(events["ts"], source)
    ts_given = np.array([bool(t) for t in text("ts")], dtype=bool)
    mapping = {str(k).strip().lower(): v for k, v in source.event_types.items()}
    if "event_type" in events.columns:
        fallback = "other" if source.unknown_event_type == "other" else None
        etype = np.array([mapping.get(t.lower(), fallback) if t is not None else fallback for t in text("event_type")], dtype=object)
    else:
        etype = np.full(n, source.default_event_type, dtype=object)
    bad_type = np.zeros(n, dtype=bool)
    if "price" not in events.columns:
        price, price_given = np.full(n, np.nan), np.zeros(n, dtype=bool)
    elif pd.api.types.is_numeric_dtype(events["price"]) and not pd.api.types.is_bool_dtype(events["price"]):
        price = events["price"].to_numpy(dtype=np.float64)
        price_given = ~np.isnan(price)  # a JSON null and a float column's NaN are both missing
    else:
        ptext = text("price")
        price_given = np.array([bool(t) for t in ptext], dtype=bool)
        price = pd.to_numeric(pd.Series(ptext, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
        nan_text = np.array([bool(t) and t.lower().lstrip("+-") == "nan" for t in ptext], dtype=bool)  # Spark reads it as NaN
        bad_type = price_given & np.isnan(price) & ~nan_text
    min_ts = dt.datetime.fromisoformat(source.min_ts.replace("Z", "+00:00"))
    min_us = int(pd.Timestamp(min_ts if min_ts.tzinfo else min_ts.replace(tzinfo=dt.timezone.utc)).value // 1000)
    max_us = int(pd.Timestamp(now + dt.timedelta(hours=source.max_clock_skew_hours)).value // 1000)
    valid_ts = ts != NAT
    encoded = np.zeros(n, dtype=bool)
    for c in ("user_id", "event_type", "item_id", "category_id"):
        if c in events.columns:
            encoded |= np.array([t is not None and "\ufffd" in t for t in text(c)], dtype=bool)
    with np.errstate(invalid="ignore"):
        checks = [
            ("bad_encoding", encoded),
            ("null_user_id", np.array([not u for u in user], dtype=bool)),
            ("null_ts", ~ts_given),
            ("bad_ts", ~valid_ts),
            ("ts_too_old", valid_ts & (ts < min_us)),
            ("ts_in_future", valid_ts & (ts > max_us)),
            ("unknown_event_type", np.array([e is None for e in etype], dtype=bool)),
            ("bad_type", bad_type),
            ("bad_price", price_given & ~bad_type & ((price < 0) | (price > source.max_price) | np.isnan(price))),
        ]
    reason = np.full(n, None, dtype=object)
    for name, failed in checks:
        reason[failed & (reason == None)] = name  # noqa: E711 - elementwise on an object array
    ok = reason == None  # noqa: E711
    refused: dict[str, int] = {}
    for r in reason[~ok]:
        refused[r] = refused.get(r, 0) + 1
    table = pa.table(
        {
            "user_id": pa.array(user[ok], pa.string()),
            "ts": pa.array(ts[ok], pa.timestamp("us", tz="UTC")),
            "event_type": pa.array(etype[ok], pa.string()),
            "category_id": pa.array([t or "" for t in text("category_id")[ok]], pa.string()),
            "item_id": pa.array([t or "" for t in text("item_id")[ok]], pa.string()),
            "event_id": pa.array(text("event_id")[ok], pa.string()),
            "price": pa.array(np.where(price_given, price, np.nan)[ok], pa.float64(), mask=~price_given[ok]),
        }
    )
    from seqclust.sessionize.arrow_engine import SORT_COLUMNS

    table = _dedup(table)
    return table.sort_by([(c, "ascending") for c in SORT_COLUMNS]), refused


def _dedup(t: pa.Table) -> pa.Table:
    """One row per event: the key of ``ingest.stage.event_key`` (the event id, else user, time,
    type and item), keeping the earliest copy as ``ingest.stage.dedup`` does (the smallest
    (ts, user, type, item, category, price, event id))."""
    if t.num_rows < 2:
        return t.set_column(5, "event_id", pc.fill_null(t.column("event_id"), ""))
    # nulls sort first, as in Spark's ascending order
    keys = t.append_column("_p", pc.fill_null(t.column("price"), -np.inf)).append_column("_e", pc.fill_null(t.column("event_id"), ""))
    order = ["ts", "user_id", "event_type", "item_id", "category_id", "_p", "_e"]
    t = keys.sort_by([(c, "ascending") for c in order]).drop(["_p", "_e"])
    eid = t.column("event_id").to_pylist()
    us = t.column("ts").cast(pa.int64()).to_pylist()
    cols = [t.column(c).to_pylist() for c in ("user_id", "event_type", "item_id")]
    seen: set[tuple] = set()
    keep = np.zeros(t.num_rows, dtype=bool)
    for i in range(t.num_rows):
        key = ("id", eid[i]) if eid[i] is not None else ("k", cols[0][i], us[i], cols[1][i], cols[2][i])
        if key not in seen:
            seen.add(key)
            keep[i] = True
    t = t.filter(pa.array(keep))
    return t.set_column(5, "event_id", pc.fill_null(t.column("event_id"), ""))


class Segmenter:
    """A loaded model: ``score(events)`` -> one row per user (``OUTPUT``). The encoder is built
    once, when the segmenter is made."""

    def __init__(self, folder: str | Path, limits: Limits | None = None) -> None:
        from seqclust.represent.encoder import embedding_fn, load_artifact
        from seqclust.segment.hierarchy import Tree
        from seqclust.segment.refine import TokenSegments
        from seqclust.serve.placement import placer

        folder = Path(folder)
        try:
            spec = json.loads((folder / BUNDLE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise SeqclustError(f"model folder {folder}: no readable {BUNDLE_FILE} ({e})") from None
        self.limits = limits or Limits(**spec.get("limits", {}))
        self.source: SourceConfig = build_section(SourceConfig, spec["source"], "source")
        self.sessionize: SessionizeConfig = build_section(SessionizeConfig, spec["sessionize"], "sessionize")
        self.embed: EmbedConfig = build_section(EmbedConfig, spec["embed"], "embed")
        self.artifact = load_artifact(folder / "encoder")
        if self.artifact.encoder_id != spec["encoder_id"]:
            raise SeqclustError(
                f"model folder {folder}: encoder {self.artifact.encoder_id}, the segments were made with {spec['encoder_id']}"
            )
        self.model_run_id: str = spec["model_run_id"]
        centers = np.asarray(spec["centers"], dtype=np.float64)
        tree = Tree.from_rows([(p, c) for p, c in spec["tree"]]) if spec.get("tree") else Tree.flat(centers)
        segs = TokenSegments.from_rows(spec["token_segments"]) if spec.get("token_segments") else None
        tm = self.artifact.token_model
        self._place = placer(self.embed, tm, segs, centers, tree)
        self._predict = embedding_fn(self.artifact.model_cfg, self.artifact.weights)
        self.descriptions: dict[str, str] = spec.get("descriptions", {})
        self.dim = int(self.artifact.model_cfg["embedding_dim"])

    def score(self, events: pd.DataFrame, now: dt.datetime | None = None) -> pd.DataFrame:
        """Each user of ``events`` placed in the model's segments (``OUTPUT``); users whose
        events all fail validation, or who have no modelled session, get no row."""
        now = now or dt.datetime.now(dt.timezone.utc)
        if len(events) > self.limits.max_events:
            raise BadRequest(f"{len(events):,} events in one request; at most {self.limits.max_events:,} (serve.max_events)")
        clean, refused = validate_events(events, self.source, now)
        if clean.num_rows == 0:
            raise BadRequest("no valid events: " + ", ".join(f"{n} {r}" for r, n in sorted(refused.items())))
        # ``clean`` is sorted by user, then time: each user's events are one run of rows
        users = clean.column("user_id").to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        counts = np.diff(np.r_[starts, len(users)])
        if counts.max() > self.limits.max_events_per_user:
            i = int(np.argmax(counts))
            raise BadRequest(
                f"user {users[starts[i]]} has {int(counts[i]):,} events; at most {self.limits.max_events_per_user:,} per user (serve.max_events_per_user)"
            )
        clean = self._window(clean, starts, counts)
        return self._place_users(clean)

    def _window(self, t: pa.Table, starts: np.ndarray, counts: np.ndarray) -> pa.Table:
        """Only each user's events within ``limits.window_days`` of their newest one (``t``
        sorted by user, then time; ``starts``/``counts``: each user's run of rows)."""
        if self.limits.window_days is None:
            return t
        us = t.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
        window_us = int(self.limits.window_days * 86_400_000_000)
        newest = us[starts + counts - 1]  # a user's last row is their newest event
        if (newest - us[starts]).max() <= window_us:
            return t  # every user's events fit in the window
        return t.filter(pa.array(us >= np.repeat(newest - window_us, counts)))

    def _place_users(self, clean: pa.Table) -> pd.DataFrame:
        from seqclust.represent.behaviour import group_by_user, session_tokens
        from seqclust.represent.features import featurize, input_columns
        from seqclust.sessionize.arrow_engine import sessionize_table

        pieces = sessionize_table(clean, self.sessionize)
        modelled = pieces.filter(pc.and_(pc.is_null(pieces.column("reason")), pieces.column("is_modelled")))
        if modelled.num_rows == 0:
            return pd.DataFrame({c: [] for c in OUTPUT})
        vocab = self.artifact.vocab
        z = self._predict(featurize(modelled.select(input_columns(modelled.column_names, vocab.token_fields)), vocab))
        users, inverse = np.unique(modelled.column("user_id").to_numpy(zero_copy_only=False), return_inverse=True)
        sums = np.zeros((len(users), self.dim))
        np.add.at(sums, inverse, z.astype(np.float64))
        sessions = np.bincount(inverse, minlength=len(users))
        empty = pa.array(np.zeros(len(users) + 1, dtype=np.int32))
        tokens = pa.ListArray.from_arrays(empty, pa.array([], pa.string()))
        counts = pa.ListArray.from_arrays(empty, pa.array([], pa.int64()))
        tm = self.artifact.token_model
        if tm is not None:
            row, tok = session_tokens(modelled, vocab, tm.interest)
            if len(tok):
                g = group_by_user(modelled.column("user_id").combine_chunks().take(pa.array(row)), tok)
                # each user's row of g (null: no token), in the order of ``users``
                at = pc.index_in(pa.array(users.astype(str), pa.string()), value_set=g.column("user_id"))
                tokens, counts = g.column("tokens").take(at), g.column("n").take(at)
        placed = self._place(sums, tokens, counts)
        events_per_user = dict(zip(*np.unique(clean.column("user_id").to_numpy(zero_copy_only=False), return_counts=True)))
        out = pd.DataFrame({k: v.to_pandas() for k, v in placed.items()})
        out.insert(0, "user_id", users.astype(str))
        out["description"] = [self.descriptions.get(p, self.descriptions.get(p.split(".")[0], "")) for p in out["segment_path"]]
        out["sessions"] = sessions.astype(np.int64)
        out["events"] = [int(events_per_user.get(u, 0)) for u in users]
        out["model_run_id"] = self.model_run_id
        out["encoder_id"] = self.artifact.encoder_id
        return out[list(OUTPUT)]


def spec_json(spec: dict[str, Any]) -> str:
    """``segments.json`` text: every key known, numbers as JSON numbers."""
    return json.dumps(spec, sort_keys=True, indent=1, default=float)
