"""Synthetic e-commerce event logs with planted personas (vectorised numpy, no Spark).

Each user is drawn from one of several personas that differ in event-type mix, category
interests, number and length of sessions, pace (gaps between events) and price level. Every
user's parameters are jittered around the persona's, sessions focus on a category with some
spill-over, and a share of events is exploration outside the user's interests, so personas
overlap and the task is not trivial. Output: ``events/`` (Parquet, JSON lines or CSV) and
``personas/`` (Parquet: user_id, persona).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

EVENT_TYPES = np.array(["view", "search", "cart", "fav", "purchase"])


@dataclass(frozen=True)
class Persona:
    name: str
    mix: tuple[float, float, float, float, float]  # view, search, cart, fav, purchase
    sessions: float  # mean sessions per user in the window
    session_len: float  # mean events per session
    gap_s: float  # median seconds between events
    price_level: float  # 0 = cheapest items of a category, 1 = dearest


PERSONAS: tuple[Persona, ...] = (
    Persona("browser", (0.84, 0.08, 0.04, 0.03, 0.01), 6.0, 12.0, 25.0, 0.50),
    Persona("decisive_buyer", (0.45, 0.15, 0.18, 0.02, 0.20), 3.0, 5.0, 40.0, 0.50),
    Persona("bargain_hunter", (0.66, 0.14, 0.10, 0.06, 0.04), 8.0, 9.0, 15.0, 0.15),
    Persona("premium", (0.60, 0.05, 0.15, 0.10, 0.10), 3.0, 7.0, 90.0, 0.85),
    Persona("cart_abandoner", (0.50, 0.05, 0.40, 0.03, 0.02), 5.0, 8.0, 30.0, 0.55),
    Persona("researcher", (0.45, 0.35, 0.03, 0.15, 0.02), 4.0, 14.0, 60.0, 0.60),
    Persona("wishlister", (0.55, 0.05, 0.05, 0.33, 0.02), 4.0, 8.0, 45.0, 0.40),
)

N_DEPARTMENTS = 20
CATS_PER_DEPT = 5
ITEMS_PER_CAT = 200
START = np.datetime64("2026-10-01T00:00:00", "ms")
WINDOW_S = 30 * 24 * 3600
MIN_SESSION_GAP_S = 31 * 60  # > the 30-minute inactivity rule, so planted sessions survive
MAX_EVENT_GAP_S = 25 * 60


@dataclass(frozen=True)
class GenerateResult:
    out: str
    users: int
    events: int  # rows written to events/, bad ones and duplicates included
    bad: int
    duplicates: int
    malformed: int
    seconds: float


def _choice_rows(rng: np.random.Generator, probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each i, draw an index from the distribution ``probs[rows[i]]`` (vectorised)."""
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0
    u = rng.random(len(rows))
    out = np.empty(len(rows), dtype=np.int64)
    step = 1_000_000
    for s in range(0, len(rows), step):
        c = cum[rows[s : s + step]]
        out[s : s + step] = (u[s : s + step, None] > c).sum(axis=1)
    return out


def _group_cumsum_exclusive(values: np.ndarray, group_starts: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """Cumulative sum within consecutive groups, starting at 0 for each group's first element."""
    total = np.cumsum(values) - values
    offsets = np.repeat(total[group_starts], group_sizes)
    return total - offsets


def generate_events(users: int, seed: int = 7, bad_rate: float = 0.0) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Generate events and persona labels in memory.

    Args:
        users: number of users.
        seed: random seed; same seed, same output.
        bad_rate: share of rows turned into invalid records (for reliability tests).

    Returns:
        (events table, personas table, counts of injected problems).

    Long on purpose: one vectorised simulation whose steps share arrays and draw from one
    random stream in a fixed order (split into functions, the order of draws, and so every
    generated dataset and every figure measured on one, would be easy to change by accident).
    """
    if users < 1:
        raise ValueError("users must be >= 1")
    rng = np.random.default_rng(seed)
    n_p = len(PERSONAS)
    n_cats = N_DEPARTMENTS * CATS_PER_DEPT
    # Persona-level interests: fixed per generator version (not per seed) so that persona
    # definitions are stable; overlap between personas is intended.
    prng = np.random.default_rng(20261128)
    persona_dept = prng.dirichlet(np.full(N_DEPARTMENTS, 0.6), size=n_p)

    # ---- users
    persona = rng.integers(0, n_p, size=users)
    mix = np.array([p.mix for p in PERSONAS])[persona]
    user_mix = _dirichlet_rows(rng, mix * 40.0)
    user_dept = _dirichlet_rows(rng, persona_dept[persona] * 8.0 + 0.05)
    n_sessions_mean = np.array([p.sessions for p in PERSONAS])[persona] * rng.lognormal(0, 0.3, users)
    n_sessions = 1 + rng.poisson(np.maximum(n_sessions_mean - 1, 0.1))
    len_mean = np.array([p.session_len for p in PERSONAS])[persona] * rng.lognormal(0, 0.25, users)
    gap_med = np.array([p.gap_s for p in PERSONAS])[persona] * rng.lognormal(0, 0.3, users)
    price_level = np.clip(np.array([p.price_level for p in PERSONAS])[persona] + rng.normal(0, 0.08, users), 0, 1)

    # ---- sessions
    n_sess_total = int(n_sessions.sum())
    s_user = np.repeat(np.arange(users), n_sessions)
    s_len = 1 + rng.poisson(np.maximum(len_mean[s_user] - 1, 0.2))
    s_dept = _choice_rows(rng, user_dept, s_user)
    s_cat = s_dept * CATS_PER_DEPT + rng.integers(0, CATS_PER_DEPT, n_sess_total)

    # ---- events
    n = int(s_len.sum())
    e_sess = np.repeat(np.arange(n_sess_total), s_len)
    e_user = s_user[e_sess]
    sess_start_idx = np.cumsum(s_len) - s_len
    gaps = np.minimum(rng.lognormal(np.log(gap_med[e_user]), 0.8), MAX_EVENT_GAP_S)
    gaps[sess_start_idx] = 0.0
    within = _group_cumsum_exclusive(gaps, sess_start_idx, s_len) + gaps  # offset from session start
    within[sess_start_idx] = 0.0
    duration = within[np.cumsum(s_len) - 1]
    # sessions of a user follow each other with a gap > the inactivity rule
    user_first_sess = np.cumsum(n_sessions) - n_sessions
    between = MIN_SESSION_GAP_S + rng.exponential(WINDOW_S / np.maximum(n_sessions[s_user], 1) / 2)
    step = duration + between
    s_start = _group_cumsum_exclusive(step, user_first_sess, n_sessions) + rng.uniform(0, WINDOW_S / 4, users)[s_user]
    ts_ms = START + (np.round((s_start[e_sess] + within) * 1000)).astype("timedelta64[ms]")

    etype = _choice_rows(rng, user_mix, e_user)
    # category: the session's focus 65% of the time, else the user's interests, 10% exploration
    r = rng.random(n)
    other_dept = _choice_rows(rng, user_dept, e_user)
    other_cat = other_dept * CATS_PER_DEPT + rng.integers(0, CATS_PER_DEPT, n)
    cat = np.where(r < 0.65, s_cat[e_sess], other_cat)
    explore = rng.random(n) < 0.10
    cat[explore] = rng.integers(0, n_cats, int(explore.sum()))
    # items within a category are ordered by price; users pick around their price level
    item_idx = np.clip(np.round(price_level[e_user] * (ITEMS_PER_CAT - 1) + rng.normal(0, 25, n)), 0, ITEMS_PER_CAT - 1).astype(np.int64)
    cat_base = np.random.default_rng(99).lognormal(np.log(30.0), 0.9, n_cats)
    price = cat_base[cat] * np.exp(1.2 * (item_idx / (ITEMS_PER_CAT - 1) - 0.5)) * rng.lognormal(0, 0.03, n)
    price = np.round(price, 2)
    is_search = EVENT_TYPES[etype] == "search"
    item_id = (cat * 1000 + item_idx).astype(np.int64)

    # ---- shuffle rows (logs are not sorted by user) and build the table
    order = rng.permutation(n)
    user_str = pc.binary_join_element_wise("u", pa.array(e_user[order]).cast(pa.string()), "")
    item_arr = pa.array(item_id[order], mask=is_search[order]).cast(pa.string())
    cat_str = pc.binary_join_element_wise("c", pa.array(cat[order]).cast(pa.string()), "")
    table = pa.table(
        {
            "event_id": pc.binary_join_element_wise(f"e{seed}-", pa.array(np.arange(n)).cast(pa.string()), ""),
            "user_id": user_str,
            "ts": pa.array(ts_ms[order], type=pa.timestamp("ms", tz="UTC")),
            "event_type": pa.array(EVENT_TYPES[etype[order]]),
            "item_id": item_arr,
            "category_id": cat_str,
            "price": pa.array(price[order], mask=is_search[order]),
        }
    )
    personas = pa.table(
        {
            "user_id": pc.binary_join_element_wise("u", pa.array(np.arange(users)).cast(pa.string()), ""),
            "persona": pa.array(np.array([p.name for p in PERSONAS])[persona]),
        }
    )
    table, counts = _inject_bad(table, rng, bad_rate)
    return table, personas, counts


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """One Dirichlet draw per row of ``alpha`` (vectorised via normalised gammas)."""
    g = rng.gamma(alpha)
    g = np.maximum(g, 1e-12)
    return g / g.sum(axis=1, keepdims=True)


BAD_KINDS = ("null_user_id", "empty_user_id", "null_ts", "ts_in_future", "ts_too_old", "unknown_event_type", "bad_price")


def _inject_bad(table: pa.Table, rng: np.random.Generator, bad_rate: float) -> tuple[pa.Table, dict[str, int]]:
    """Turn ``bad_rate`` of the rows into invalid records (cycling through BAD_KINDS) and
    append as many exact duplicates (same event_id: at-least-once delivery)."""
    counts = {k: 0 for k in BAD_KINDS}
    counts["duplicates"] = 0
    n = table.num_rows
    n_bad = min(int(round(bad_rate * n)), n // 2)
    if n_bad == 0:
        return table, counts
    idx = rng.choice(n, size=n_bad * 2, replace=False)
    bad_idx, dup_idx = idx[:n_bad], idx[n_bad:]
    masks = {}
    for j, kind in enumerate(BAD_KINDS):
        m = np.zeros(n, dtype=bool)
        m[bad_idx[j :: len(BAD_KINDS)]] = True
        masks[kind] = pa.array(m)
        counts[kind] = int(m.sum())
    user = pc.if_else(masks["null_user_id"], pa.scalar(None, pa.string()), table["user_id"])
    user = pc.if_else(masks["empty_user_id"], pa.scalar("  "), user)
    ts_type = table.schema.field("ts").type
    ts = pc.if_else(masks["null_ts"], pa.scalar(None, ts_type), table["ts"])
    ts = pc.if_else(masks["ts_in_future"], pa.scalar(4102444800000, pa.int64()).cast(ts_type), ts)
    ts = pc.if_else(masks["ts_too_old"], pa.scalar(31536000000, pa.int64()).cast(ts_type), ts)
    etype = pc.if_else(masks["unknown_event_type"], pa.scalar("hover"), table["event_type"])
    price = pc.if_else(masks["bad_price"], pc.negate(pc.fill_null(table["price"], 1.0)), table["price"])
    fixed = (
        table.set_column(table.schema.get_field_index("user_id"), "user_id", user)
        .set_column(table.schema.get_field_index("ts"), "ts", ts)
        .set_column(table.schema.get_field_index("event_type"), "event_type", etype)
        .set_column(table.schema.get_field_index("price"), "price", price)
    )
    dups = fixed.take(pa.array(dup_idx))
    counts["duplicates"] = len(dup_idx)
    return pa.concat_tables([fixed, dups]), counts


def write_dataset(
    out: str | Path,
    users: int,
    seed: int = 7,
    bad_rate: float = 0.0,
    fmt: str = "parquet",
    files: int = 4,
    malformed: int | None = None,
) -> GenerateResult:
    """Generate and write ``out/events`` (parquet|json|csv) and ``out/personas`` (parquet).

    Args:
        malformed: number of unparseable lines appended (JSON/CSV only); defaults to the
            bad-rate share of rows.
    """
    t0 = time.perf_counter()
    out = Path(out)
    table, personas, counts = generate_events(users, seed=seed, bad_rate=bad_rate)
    events_dir = out / "events"
    if events_dir.exists():
        shutil.rmtree(events_dir)
    events_dir.mkdir(parents=True)
    (out / "personas").mkdir(parents=True, exist_ok=True)
    pq.write_table(personas, out / "personas" / "part-0.parquet")
    n = table.num_rows
    files = max(1, min(files, n))
    bounds = np.linspace(0, n, files + 1).astype(int)
    n_malformed = 0
    if fmt in ("json", "csv"):
        n_malformed = int(round(bad_rate * n)) if malformed is None else malformed
    for i in range(files):
        part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        path = events_dir / f"part-{i:05d}.{'jsonl' if fmt == 'json' else fmt}"
        if fmt == "parquet":
            pq.write_table(part, path)
            continue
        k = n_malformed // files + (1 if i < n_malformed % files else 0)
        if fmt == "json":
            df = part.to_pandas()
            df["ts"] = df["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").str.slice(0, 23) + "Z"
            text = df.to_json(orient="records", lines=True)
            bad_lines = "".join('{"user_id": "u1", "ts": \n' for _ in range(k))
            path.write_text(text + bad_lines, encoding="utf-8")
        elif fmt == "csv":
            df = part.to_pandas()
            df["ts"] = df["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str.slice(0, 23) + "Z"
            df.to_csv(path, index=False)
            with path.open("a", encoding="utf-8") as fh:
                for _ in range(k):
                    fh.write('"unterminated,quote\n')
        else:
            raise ValueError(f"unknown format {fmt!r}; use parquet, json or csv")
    (out / "_GENERATED.json").write_text(
        json.dumps({"users": users, "seed": seed, "bad_rate": bad_rate, "format": fmt, **counts}), encoding="utf-8"
    )
    dt = time.perf_counter() - t0
    log.info("generated %d events for %d users in %.1fs (%s)", n + n_malformed, users, dt, events_dir)
    return GenerateResult(
        out=str(out),
        users=users,
        events=n + n_malformed,
        bad=sum(v for k, v in counts.items() if k != "duplicates"),
        duplicates=counts["duplicates"],
        malformed=n_malformed,
        seconds=dt,
    )
