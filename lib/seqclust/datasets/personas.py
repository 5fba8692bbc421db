"""A family of persona generators that plant behaviour in structurally different ways.

Today's generator (``datagen.generate_events``) plants personas that differ in everything at
once. A representation or a k rule tuned on it can fail on data whose personas differ in one
way only, so ``bench/quality.py`` judges the defaults on this family instead:

- ``interests``: personas differ only in what they look at: category taste, how broad it
  is, and how often they return to items they already saw.
- ``dynamics``: personas differ only in *what follows what*: each has its own transition
  matrix over event types, built (Sinkhorn scaling) to share one stationary mix, so the
  event-type shares barely differ.
- ``pace_price``: personas differ only in the seconds between events and the price level
  they buy at within a category; interests are per-user noise.
- ``mixture``: each persona combines an interest profile, a dynamics, a pace, a price level
  and a time of day (hour, weekday) drawn from small pools, so personas share some signals
  and differ in others.
- ``real_sessions`` (needs a real event log): every session is a real session of the
  RetailRocket subset, drawn through a persona-specific filter on what the session does.
- ``generated``: today's generator, for reference.

All of them carry the same noise: heavy-tailed activity (lognormal sessions per user, about a
third of users with one session), per-user jitter of every persona parameter, a share of
exploration events. Output is the generic event schema of ``datagen`` (user_id, ts,
event_type, item_id, category_id, price, event_id) and a personas table (user_id, persona).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seqclust.datasets import generated as datagen

log = logging.getLogger(__name__)

TYPES = np.array(["view", "search", "cart", "fav", "purchase"])
N_T = len(TYPES)
N_DEPTS = 20
CATS_PER_DEPT = 5
N_CATS = N_DEPTS * CATS_PER_DEPT
ITEMS_PER_CAT = 200
START = np.datetime64("2026-10-05T00:00:00", "ms")  # a Monday
DAYS = 28
MIN_SESSION_GAP_S = 40 * 60  # above the 30-minute inactivity rule
MAX_EVENT_GAP_S = 25 * 60
MAX_SESSION_LEN = 60
# a stationary event-type mix shared by personas whose dynamics differ
BASE_MIX = np.array([0.40, 0.16, 0.18, 0.12, 0.14])
# per-user jitter of a persona's distribution: Dirichlet(persona * CONC + FLOOR), shared by the
# generators and by ``bayes_labels`` (which integrates it out)
DYNAMICS_CONC, DYNAMICS_FLOOR = 40.0, 0.02
REAL_CONC, REAL_FLOOR = 30.0, 0.05


@dataclass
class Population:
    """Per-user parameters of a simulated population (arrays of length ``users``)."""

    persona: np.ndarray  # int label
    n_sessions: np.ndarray
    session_len: np.ndarray  # mean events per session
    start: np.ndarray  # [users, N_T] first-event type distribution
    trans: np.ndarray  # [users, N_T, N_T] next-type distribution given the current type
    gap_s: np.ndarray  # median seconds between events
    price_level: np.ndarray  # 0 = cheapest items of a category, 1 = dearest
    taste: np.ndarray  # [users, N_DEPTS] department taste
    focus: np.ndarray  # probability an event stays in the session's category
    revisit: np.ndarray  # probability an event returns to an item seen earlier in the session
    hour: np.ndarray  # preferred hour of day (centre)
    hour_sd: np.ndarray
    weekend: np.ndarray  # probability a session falls on a weekend day


@dataclass(frozen=True)
class FamilyMember:
    name: str
    planted_k: int
    make: Callable[[int, int], tuple[pa.Table, pa.Table]]  # (users, seed) -> (events, personas)
    needs_data: str | None = None  # a folder under shared/data/ it reads
    note: str = ""
    planted_top: int | None = None  # nested generators: the planted groups above the personas (their ``group`` column)

    @property
    def planted_groups(self) -> int:
        """Planted segments at the top level: the groups where they nest, else the personas."""
        return self.planted_top or self.planted_k


# --------------------------------------------------------------------------------------
# shared pieces


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    g = np.maximum(rng.gamma(alpha), 1e-12)
    return g / g.sum(axis=-1, keepdims=True)


def with_mix(kernel: np.ndarray, pi: np.ndarray, iters: int = 500) -> np.ndarray:
    """A transition matrix with stationary distribution ``pi`` and the structure of the
    positive ``kernel``: Sinkhorn scaling makes ``kernel`` a joint distribution F of
    (event, next event) whose two marginals are both ``pi``; ``F[i, j] / pi[i]`` is then a
    chain that visits the event types in the shares ``pi``. Personas built this way share one
    event-type mix and differ only in what follows what (the chain need not be reversible)."""
    f = np.asarray(kernel, dtype=np.float64)
    for _ in range(iters):
        f *= (pi / f.sum(axis=1))[:, None]
        f *= (pi / f.sum(axis=0))[None, :]
    return f / f.sum(axis=1, keepdims=True)


def distinct_chains(k: int, prng: np.random.Generator, weight: float = 4.0) -> np.ndarray:
    """``k`` transition matrices with the stationary mix ``BASE_MIX``, each favouring its own
    successor for every event type (a distinct permutation of the types), scaled by
    ``with_mix``: the shares of event types are the same, what follows what is not."""
    out: list[np.ndarray] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < k:
        succ = tuple(int(x) for x in prng.permutation(N_T))
        if succ in seen:
            continue
        seen.add(succ)
        kernel = np.full((N_T, N_T), 0.15)
        kernel[np.arange(N_T), succ] += weight
        out.append(with_mix(kernel, BASE_MIX))
    return np.stack(out)


def dynamics_chains(k: int, prng: np.random.Generator | None = None) -> np.ndarray:
    """The ``dynamics`` generator's persona chains for ``k`` personas."""
    return distinct_chains(k, prng if prng is not None else np.random.default_rng(2000 + k), 10.0)


def stationary(p: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eig(p.T)
    s = np.real(v[:, np.argmin(np.abs(w - 1.0))])
    return s / s.sum()


def base_population(rng: np.random.Generator, persona: np.ndarray) -> Population:
    """Noise shared by every generator: heavy-tailed activity, per-user taste and habits."""
    users = len(persona)
    # lognormal activity: about a third of users have a single session, a few have dozens (as real logs)
    n_sessions = np.minimum(np.floor(rng.lognormal(1.0, 0.9, users)).astype(np.int64), 40)
    n_sessions = np.maximum(n_sessions, 1)
    generic = with_mix(np.ones((N_T, N_T)), BASE_MIX)
    trans = _dirichlet_rows(rng, np.repeat(generic[None], users, axis=0) * 30.0 + 0.05)
    return Population(
        persona=persona,
        n_sessions=n_sessions,
        session_len=10.0 * rng.lognormal(0, 0.3, users),
        start=_dirichlet_rows(rng, np.repeat(BASE_MIX[None], users, axis=0) * 30.0),
        trans=trans,
        gap_s=40.0 * rng.lognormal(0, 0.5, users),
        price_level=rng.uniform(0.1, 0.9, users),
        taste=_dirichlet_rows(rng, np.full((users, N_DEPTS), 0.3)),
        focus=rng.uniform(0.5, 0.8, users),
        revisit=rng.uniform(0.05, 0.25, users),
        hour=rng.uniform(8, 23, users),
        hour_sd=rng.uniform(1.5, 4.0, users),
        weekend=rng.uniform(0.2, 0.4, users),
    )


def _draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One index per row of the row-stochastic ``probs``."""
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0
    return (rng.random(len(probs))[:, None] > cum).sum(axis=1)


def simulate(rng: np.random.Generator, pop: Population, prefix: str = "u", names: list[str] | None = None) -> tuple[pa.Table, pa.Table]:
    """Events of ``pop``: sessions of Markov event types with items, prices and timestamps."""
    users = len(pop.persona)
    s_user = np.repeat(np.arange(users), pop.n_sessions)
    n_s = len(s_user)
    s_len = np.clip(1 + rng.poisson(np.maximum(pop.session_len[s_user] - 1, 0.2)), 1, MAX_SESSION_LEN)
    s_cat = _draw(rng, pop.taste[s_user]) * CATS_PER_DEPT + rng.integers(0, CATS_PER_DEPT, n_s)
    starts = np.cumsum(s_len) - s_len
    n = int(s_len.sum())
    etype = np.zeros(n, dtype=np.int64)
    item_idx = np.zeros(n, dtype=np.int64)
    cat = np.zeros(n, dtype=np.int64)
    gaps = np.zeros(n)
    for t in range(int(s_len.max())):
        live = np.nonzero(s_len > t)[0]
        pos = starts[live] + t
        u = s_user[live]
        if t == 0:
            etype[pos] = _draw(rng, pop.start[u])
        else:
            etype[pos] = _draw(rng, pop.trans[u, etype[pos - 1]])
            gaps[pos] = np.minimum(rng.lognormal(np.log(pop.gap_s[u]), 0.6), MAX_EVENT_GAP_S)
        # category: the session's focus, else the user's taste, 8% exploration
        r = rng.random(len(live))
        other = _draw(rng, pop.taste[u]) * CATS_PER_DEPT + rng.integers(0, CATS_PER_DEPT, len(live))
        c = np.where(r < pop.focus[u], s_cat[live], other)
        explore = rng.random(len(live)) < 0.08
        c[explore] = rng.integers(0, N_CATS, int(explore.sum()))
        it = np.clip(np.round(pop.price_level[u] * (ITEMS_PER_CAT - 1) + rng.normal(0, 20, len(live))), 0, ITEMS_PER_CAT - 1)
        cat[pos], item_idx[pos] = c, it.astype(np.int64)
        if t > 0:  # return to an item seen earlier in this session
            back = rng.random(len(live)) < pop.revisit[u]
            if back.any():
                src = starts[live[back]] + np.floor(rng.random(int(back.sum())) * t).astype(np.int64)
                cat[pos[back]], item_idx[pos[back]] = cat[src], item_idx[src]
    # session start times: a day (weekends by preference) and an hour around the user's habit
    within = datagen._group_cumsum_exclusive(gaps, starts, s_len) + gaps
    duration = within[starts + s_len - 1]
    weekend_day = rng.random(n_s) < pop.weekend[s_user]
    week = rng.integers(0, DAYS // 7, n_s)
    day = week * 7 + np.where(weekend_day, 5 + rng.integers(0, 2, n_s), rng.integers(0, 5, n_s))
    hour = np.mod(rng.normal(pop.hour[s_user], pop.hour_sd[s_user]), 24.0)
    t0 = day * 86400.0 + hour * 3600.0
    # a user's sessions in time order, each starting after the previous one ended + a gap
    order = np.lexsort((t0, s_user))
    t0, duration_o = t0[order], duration[order]
    first = np.cumsum(pop.n_sessions) - pop.n_sessions
    rank = np.arange(n_s) - np.repeat(first, pop.n_sessions)
    for nth in range(1, int(pop.n_sessions.max())):
        idx = np.nonzero(rank == nth)[0]
        t0[idx] = np.maximum(t0[idx], t0[idx - 1] + duration_o[idx - 1] + MIN_SESSION_GAP_S)
    s_start = np.empty(n_s)
    s_start[order] = t0
    e_sess = np.repeat(np.arange(n_s), s_len)
    ts_ms = START + np.round((s_start[e_sess] + within) * 1000).astype("timedelta64[ms]")
    cat_base = np.random.default_rng(99).lognormal(np.log(30.0), 0.9, N_CATS)
    price = np.round(cat_base[cat] * np.exp(1.5 * (item_idx / (ITEMS_PER_CAT - 1) - 0.5)) * rng.lognormal(0, 0.03, n), 2)
    return _tables(rng, s_user[e_sess], ts_ms, TYPES[etype], cat, cat * 1000 + item_idx, price, pop.persona, prefix, names)


def _tables(rng, e_user, ts_ms, etype, cat, item, price, persona, prefix: str, names: list[str] | None = None) -> tuple[pa.Table, pa.Table]:
    n = len(e_user)
    order = rng.permutation(n)  # logs are not sorted by user
    is_search = np.asarray(etype) == "search"
    events = pa.table(
        {
            "event_id": pc.binary_join_element_wise(f"{prefix}e", pa.array(np.arange(n)).cast(pa.string()), ""),
            "user_id": pc.binary_join_element_wise(prefix, pa.array(e_user[order]).cast(pa.string()), ""),
            "ts": pa.array(ts_ms[order], type=pa.timestamp("ms", tz="UTC")),
            "event_type": pa.array(np.asarray(etype)[order]),
            "item_id": pa.array(np.asarray(item)[order], mask=is_search[order]).cast(pa.string()),
            "category_id": pc.binary_join_element_wise("c", pa.array(np.asarray(cat)[order]).cast(pa.string()), "")
            if cat is not None
            else pa.nulls(n, pa.string()),
            "price": pa.array(np.asarray(price)[order], mask=is_search[order]) if price is not None else pa.nulls(n, pa.float64()),
        }
    )
    labels = [names[p] if names else f"p{p}" for p in persona]
    personas = pa.table(
        {"user_id": pc.binary_join_element_wise(prefix, pa.array(np.arange(len(persona))).cast(pa.string()), ""), "persona": labels}
    )
    return events, personas


# --------------------------------------------------------------------------------------
# the generators


def interests(users: int, seed: int, k: int = 8) -> tuple[pa.Table, pa.Table]:
    """Personas differ in what they look at only: a few departments each (overlapping),
    narrow or broad taste within them, and a habit of returning to items or not."""
    rng = np.random.default_rng(seed)
    prng = np.random.default_rng(1000 + k)
    persona = rng.integers(0, k, users)
    pop = base_population(rng, persona)
    depts = np.zeros((k, N_DEPTS))
    own = prng.permutation(N_DEPTS)
    for p in range(k):  # two departments of its own (where k allows) and one shared with others
        mine = [own[(2 * p) % N_DEPTS], own[(2 * p + 1) % N_DEPTS], own[-1 - p % 4]]
        depts[p, mine] = prng.dirichlet(np.ones(3)) + 0.3
    depts /= depts.sum(axis=1, keepdims=True)
    pop.taste = _dirichlet_rows(rng, depts[persona] * 25.0 + 0.02)
    broad = np.arange(k) % 2 == 1  # broad personas spread sessions over their departments
    pop.focus = np.clip(np.where(broad[persona], 0.35, 0.85) + rng.normal(0, 0.05, users), 0.05, 0.95)
    returner = (np.arange(k) // 2) % 2 == 1
    pop.revisit = np.clip(np.where(returner[persona], 0.35, 0.05) + rng.normal(0, 0.04, users), 0.0, 0.6)
    return simulate(rng, pop, "i")


def dynamics(users: int, seed: int, k: int = 5) -> tuple[pa.Table, pa.Table]:
    """Personas differ in what follows what among event types; one stationary mix."""
    rng = np.random.default_rng(seed)
    persona = rng.integers(0, k, users)
    pop = base_population(rng, persona)
    mats = dynamics_chains(k)
    pop.trans = _dirichlet_rows(rng, mats[persona] * DYNAMICS_CONC + DYNAMICS_FLOOR)
    return simulate(rng, pop, "d")


def pace_price(users: int, seed: int, k: int = 6) -> tuple[pa.Table, pa.Table]:
    """Personas differ in pace (seconds between events) and price level within a category;
    interests, dynamics and time of day are per-user noise."""
    rng = np.random.default_rng(seed)
    persona = rng.integers(0, k, users)
    pop = base_population(rng, persona)
    paces = (8.0, 45.0, 240.0)
    if k % len(paces):
        raise ValueError(f"pace_price: k must be a multiple of {len(paces)}")
    levels = np.linspace(0.15, 0.85, k // len(paces))
    gap = np.repeat(paces, len(levels))
    level = np.tile(levels, len(paces))
    pop.gap_s = gap[persona] * rng.lognormal(0, 0.25, users)
    pop.price_level = np.clip(level[persona] + rng.normal(0, 0.06, users), 0, 1)
    return simulate(rng, pop, "v")


def mixture(users: int, seed: int, k: int = 10) -> tuple[pa.Table, pa.Table]:
    """Each persona combines signals from small pools (3 interest profiles, 3 dynamics,
    2 paces, 2 price levels, 2 times of day), so any two share some and differ in others."""
    rng = np.random.default_rng(seed)
    prng = np.random.default_rng(3000 + k)
    combos = [(a, b, c, d, e) for a in range(3) for b in range(3) for c in range(2) for d in range(2) for e in range(2)]
    # personas: distinct combinations, each pair differing in at least two signals
    chosen: list[tuple[int, ...]] = []
    for i in prng.permutation(len(combos)):
        c = combos[i]
        if all(sum(x != y for x, y in zip(c, o)) >= 2 for o in chosen):
            chosen.append(c)
        if len(chosen) == k:
            break
    if len(chosen) < k:
        raise ValueError(f"mixture: at most {len(chosen)} personas differ in two signals each")
    spec = np.array(chosen)
    persona = rng.integers(0, k, users)
    pop = base_population(rng, persona)
    depts = np.zeros((3, N_DEPTS))
    for a in range(3):
        depts[a, prng.choice(N_DEPTS, 4, replace=False)] = 1.0
    depts /= depts.sum(axis=1, keepdims=True)
    mats = distinct_chains(3, prng)
    s = spec[persona]
    pop.taste = _dirichlet_rows(rng, depts[s[:, 0]] * 20.0 + 0.05)
    pop.trans = _dirichlet_rows(rng, mats[s[:, 1]] * 40.0 + 0.02)
    pop.gap_s = np.array([12.0, 120.0])[s[:, 2]] * rng.lognormal(0, 0.3, users)
    pop.price_level = np.clip(np.array([0.2, 0.8])[s[:, 3]] + rng.normal(0, 0.08, users), 0, 1)
    pop.hour = np.array([11.0, 21.0])[s[:, 4]] + rng.normal(0, 1.0, users)
    pop.weekend = np.array([0.1, 0.6])[s[:, 4]]
    return simulate(rng, pop, "m")


def generated(users: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """Today's generator (every signal at once), for reference."""
    events, personas, _ = datagen.generate_events(users, seed=seed)
    return events, personas


# --------------------------------------------------------------------------------------
# planted in real sessions


@dataclass(frozen=True)
class RealSessions:
    """Real sessions of an event log as flat arrays (sessions in time order per source user)."""

    offsets: np.ndarray  # [sessions + 1]
    etype: np.ndarray  # event type per event
    item: np.ndarray
    ts: np.ndarray  # seconds
    kind: np.ndarray  # a label per session from what it does (see session_kinds)


def read_retailrocket(path: str | Path, gap_s: float = 1800.0) -> RealSessions:
    """Sessions (30-minute gap) of the RetailRocket subset's ``events.csv`` (user, item, event, ts)."""
    with open(Path(path) / "events.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    user = np.array([int(r["user"]) for r in rows])
    ts = np.array([float(r["ts"]) for r in rows])
    item = np.array([int(r["item"]) for r in rows])
    ev = np.array([{"view": "view", "cart": "cart", "buy": "purchase"}.get(r["event"], "view") for r in rows])
    order = np.lexsort((item, ts, user))
    user, ts, item, ev = user[order], ts[order], item[order], ev[order]
    new = np.ones(len(user), dtype=bool)
    new[1:] = (user[1:] != user[:-1]) | (ts[1:] - ts[:-1] > gap_s)
    starts = np.nonzero(new)[0]
    offsets = np.append(starts, len(user))
    return RealSessions(offsets, ev, item, ts, session_kinds(offsets, ev, ts))


KINDS = ("quick_buy", "slow_buy", "cart_no_buy", "short_look", "long_browse")


def session_kinds(offsets: np.ndarray, etype: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """What a session does, from its events: bought fast / bought slowly / carted without
    buying / a short look (<= 3 views) / a long browse (> 3 views)."""
    n = len(offsets) - 1
    sid = np.repeat(np.arange(n), np.diff(offsets))
    buys = np.bincount(sid, weights=etype == "purchase", minlength=n)
    carts = np.bincount(sid, weights=etype == "cart", minlength=n)
    lens = np.diff(offsets)
    dur = ts[offsets[1:] - 1] - ts[offsets[:-1]]
    pace = dur / np.maximum(lens - 1, 1)
    kind = np.where(
        buys > 0,
        np.where(pace < 60.0, 0, 1),
        np.where(carts > 0, 2, np.where(lens <= 3, 3, 4)),
    )
    return kind


# each persona's mixture over session kinds (rows) and its share of sessions at weekends
def _real_mix(own: int, share: float = 0.94) -> np.ndarray:
    m = np.full(len(KINDS), (1.0 - share) / (len(KINDS) - 1))
    m[own] = share
    return m


# each persona's mixture over session kinds: most of its sessions are of its own kind
REAL_PERSONAS = {
    "decisive": _real_mix(0),
    "deliberate": _real_mix(1),
    "hesitant": _real_mix(2),
    "glancer": _real_mix(3),
    "browser": _real_mix(4),
}


def real_sessions(users: int, seed: int, data: str | Path | None) -> tuple[pa.Table, pa.Table]:
    """Users made of whole real sessions: each persona draws sessions through its own filter
    on what a session does (``REAL_PERSONAS``); events, items and within-session timing are
    the real ones, only each session's start is moved onto the user's timeline."""
    if data is None:
        raise ValueError("real_sessions needs the real log (a retailrocket_subset folder)")
    real = read_retailrocket(data)
    rng = np.random.default_rng(seed)
    names = list(REAL_PERSONAS)
    k = len(names)
    persona = rng.integers(0, k, users)
    pop = base_population(rng, persona)
    pools = [np.nonzero(real.kind == i)[0] for i in range(len(KINDS))]
    if any(len(p) == 0 for p in pools):
        raise ValueError("real_sessions: the log lacks a session kind")
    mix = np.stack([REAL_PERSONAS[n] for n in names])
    s_user = np.repeat(np.arange(users), pop.n_sessions)
    user_mix = _dirichlet_rows(rng, mix[persona] * REAL_CONC + REAL_FLOOR)
    s_kind = _draw(rng, user_mix[s_user])
    s_src = np.array([pools[kd][rng.integers(0, len(pools[kd]))] for kd in s_kind])
    lens = np.diff(real.offsets)[s_src]
    e_src = np.repeat(real.offsets[s_src], lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))
    rel = real.ts[e_src] - np.repeat(real.ts[real.offsets[s_src]], lens)
    # session starts on the user's timeline, in order, separated by more than the gap rule
    n_s = len(s_user)
    t0 = rng.uniform(0, DAYS * 86400.0, n_s)
    order = np.lexsort((t0, s_user))
    dur = (real.ts[real.offsets[s_src + 1] - 1] - real.ts[real.offsets[s_src]])[order]
    t0o = t0[order]
    first = np.cumsum(pop.n_sessions) - pop.n_sessions
    rank = np.arange(n_s) - np.repeat(first, pop.n_sessions)
    for r in range(1, int(pop.n_sessions.max())):
        idx = np.nonzero(rank == r)[0]
        t0o[idx] = np.maximum(t0o[idx], t0o[idx - 1] + dur[idx - 1] + MIN_SESSION_GAP_S)
    t0[order] = t0o
    e_sess = np.repeat(np.arange(n_s), lens)
    ts_ms = START + np.round((t0[e_sess] + rel) * 1000).astype("timedelta64[ms]")
    return _tables(rng, s_user[e_sess], ts_ms, real.etype[e_src], None, real.item[e_src], None, persona, "r", names)


# --------------------------------------------------------------------------------------
# nested generators: a few groups far apart, and inside some of them groups closer together


def _with_groups(events_personas: tuple[pa.Table, pa.Table], groups: list[str]) -> tuple[pa.Table, pa.Table]:
    """The personas table with a ``group`` column (the planted top level): a persona named
    ``group.leaf`` belongs to ``group``, a persona without a dot is a group of its own."""
    events, personas = events_personas
    names = personas.column("persona").to_pylist()
    group = [n.split(".", 1)[0] for n in names]
    unknown = set(group) - set(groups)
    if unknown:
        raise ValueError(f"personas {sorted(unknown)} belong to no planted group")
    return events, personas.append_column("group", pa.array(group, pa.string()))


def nested_price(users: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """Three price tiers far apart (the item's place in its category's price range: cheapest,
    middle, dearest); inside the middle tier four audiences, each pair of them apart in at
    least two of: *when* they shop (weekday daytime or weekend evening), interest breadth,
    returning to items already seen, and session length. Six planted personas under three
    groups; the top split (price) is much stronger than the leaf splits."""
    rng = np.random.default_rng(seed)
    names = ["cheap", "premium", "mid.day_browsers", "mid.evening_loyal", "mid.day_focused", "mid.evening_returners"]
    persona = rng.choice(len(names), users, p=[0.15, 0.15, 0.175, 0.175, 0.175, 0.175])
    pop = base_population(rng, persona)
    level = np.array([0.08, 0.92, 0.5, 0.5, 0.5, 0.5])
    pop.price_level = np.clip(level[persona] + rng.normal(0, 0.04, users), 0, 1)
    mid = persona >= 2
    leaf = np.clip(persona - 2, 0, 3)
    #                     browsers loyal focused returners
    evening = np.array([False, True, False, True])[leaf]
    focus = np.array([0.3, 0.9, 0.9, 0.3])[leaf]
    revisit = np.array([0.04, 0.4, 0.04, 0.4])[leaf]
    length = np.array([6.0, 16.0, 16.0, 6.0])[leaf]
    pop.hour = np.where(mid, np.where(evening, 21.0, 11.0) + rng.normal(0, 0.7, users), pop.hour)
    pop.hour_sd = np.where(mid, rng.uniform(1.0, 1.8, users), pop.hour_sd)
    pop.weekend = np.where(mid, np.where(evening, 0.75, 0.08), pop.weekend)
    pop.focus = np.where(mid, np.clip(focus + rng.normal(0, 0.05, users), 0.05, 0.98), pop.focus)
    pop.revisit = np.where(mid, np.clip(revisit + rng.normal(0, 0.04, users), 0.0, 0.7), pop.revisit)
    pop.session_len = np.where(mid, length * rng.lognormal(0, 0.2, users), pop.session_len)
    return _with_groups(simulate(rng, pop, "np", names), ["cheap", "premium", "mid"])


def nested_interests(users: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """Two groups that shop in disjoint departments (fashion-like and electronics-like), each
    made of three audiences told apart by a *different* signal: in the first, what follows
    what among event types (three transition chains, one shared event-type mix); in the
    second, pace (seconds between events) and price level. Six planted personas under two
    groups; the signal that separates the groups is not the one that separates the leaves."""
    rng = np.random.default_rng(seed)
    prng = np.random.default_rng(4006)
    names = ["a.chain0", "a.chain1", "a.chain2", "b.fast_cheap", "b.steady", "b.slow_dear"]
    persona = rng.integers(0, len(names), users)
    pop = base_population(rng, persona)
    depts = prng.permutation(N_DEPTS)
    taste = np.full((2, N_DEPTS), 0.0)
    taste[0, depts[:5]] = 1.0
    taste[1, depts[5:10]] = 1.0
    group = (persona >= 3).astype(np.int64)
    pop.taste = _dirichlet_rows(rng, taste[group] * 4.0 + 0.01)
    chains = distinct_chains(3, prng, 10.0)
    a = persona < 3
    pop.trans[a] = _dirichlet_rows(rng, chains[persona[a]] * DYNAMICS_CONC + DYNAMICS_FLOOR)
    paces = np.array([10.0, 60.0, 300.0])
    levels = np.array([0.2, 0.5, 0.8])
    b = ~a
    leaf_b = persona[b] - 3
    pop.gap_s[b] = paces[leaf_b] * rng.lognormal(0, 0.25, int(b.sum()))
    pop.price_level[b] = np.clip(levels[leaf_b] + rng.normal(0, 0.06, int(b.sum())), 0, 1)
    return _with_groups(simulate(rng, pop, "ni", names), ["a", "b"])


def family(data_root: str | Path | None = None) -> list[FamilyMember]:
    """The persona benchmark family; ``real_sessions`` needs ``<data_root>/retailrocket_subset``."""
    rr = Path(data_root) / "retailrocket_subset" if data_root else None
    members = [
        FamilyMember("interests", 8, lambda u, s: interests(u, s, 8), note="categories, breadth, item revisits"),
        FamilyMember("dynamics", 5, lambda u, s: dynamics(u, s, 5), note="transition matrices, one stationary mix"),
        FamilyMember("pace_price", 6, lambda u, s: pace_price(u, s, 6), note="pace x price level"),
        FamilyMember("mixture", 10, lambda u, s: mixture(u, s, 10), note="interest, dynamics, pace, price, time of day"),
        FamilyMember(
            "real_sessions",
            len(REAL_PERSONAS),
            lambda u, s: real_sessions(u, s, rr),
            needs_data="retailrocket_subset",
            note="whole RetailRocket sessions through persona filters",
        ),
        FamilyMember("generated", len(datagen.PERSONAS), generated, note="today's generator"),
        FamilyMember("nested_price", 6, nested_price, note="3 price tiers; 4 time x habit audiences inside the middle one", planted_top=3),
        FamilyMember(
            "nested_interests",
            6,
            nested_interests,
            note="2 department groups; leaves by dynamics in one, pace x price in the other",
            planted_top=2,
        ),
    ]
    return members


def member(name: str, data_root: str | Path | None = None) -> FamilyMember:
    """The family member called ``name``; a ValueError lists the names otherwise."""
    members = {m.name: m for m in family(data_root)}
    if name not in members:
        raise ValueError(f"unknown persona generator {name!r}; choose from {', '.join(members)}")
    return members[name]


def write_member(out: str | Path, name: str, users: int, seed: int = 7, data_root: str | Path | None = None, files: int = 4) -> dict:
    """Generate ``name`` and write ``out/events`` (Parquet) and ``out/personas`` (Parquet)."""
    import shutil

    import pyarrow.parquet as pq

    m = member(name, data_root)
    if m.needs_data and not (data_root and (Path(data_root) / m.needs_data).is_dir()):
        raise ValueError(f"persona generator {name!r} needs the real log {m.needs_data!r} under a data root (--data-root)")
    events, personas = m.make(users, seed)
    out = Path(out)
    for sub in ("events", "personas"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        (out / sub).mkdir(parents=True)
    bounds = np.linspace(0, events.num_rows, max(1, files) + 1).astype(int)
    for i in range(len(bounds) - 1):
        pq.write_table(events.slice(bounds[i], bounds[i + 1] - bounds[i]), out / "events" / f"part-{i:05d}.parquet")
    pq.write_table(personas, out / "personas" / "part-0.parquet")
    info = {"generator": name, "users": users, "seed": seed, "events": events.num_rows, "planted_k": m.planted_k}
    log.info("generated %s: %d events for %d users, %d planted personas (%s)", name, events.num_rows, users, m.planted_k, out)
    return info


# --------------------------------------------------------------------------------------
# the Bayes ceiling: what the best possible classifier reads from a generated log


def _dirichlet_multinomial_ll(counts: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """log P(counts | Dirichlet(alpha)-multinomial) up to the multinomial coefficient (which
    is the same for every alpha): ``counts`` [..., n], ``alpha`` [n] -> [...]."""
    from scipy.special import gammaln

    a0 = alpha.sum()
    return gammaln(a0) - gammaln(a0 + counts.sum(axis=-1)) + (gammaln(alpha + counts) - gammaln(alpha)).sum(axis=-1)


def _log_sessions(events: pa.Table, gap_s: float = 1800.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user per event, event type per event, seconds, session offsets) of ``events`` sorted by
    user and time and cut at ``gap_s`` of inactivity (the pipeline's default rule)."""
    user = np.asarray(events.column("user_id").to_pylist(), dtype=object)
    t = events.column("ts").cast(pa.int64()).to_numpy().astype(np.float64) / 1000.0
    etype = np.asarray(events.column("event_type").to_pylist(), dtype=object)
    eid = np.asarray(events.column("event_id").to_pylist(), dtype=object)
    order = np.lexsort((eid, t, user))
    user, t, etype = user[order], t[order], etype[order]
    new = np.ones(len(t), dtype=bool)
    new[1:] = (user[1:] != user[:-1]) | (np.diff(t) > gap_s)
    return user, etype, t, np.append(np.nonzero(new)[0], len(t))


def bayes_labels(name: str, events: pa.Table, k: int) -> dict[str, str] | None:
    """The Bayes-optimal persona of every user of a ``dynamics`` or ``real_sessions`` log:
    the persona under which the user's events are most likely, with the per-user jitter
    integrated out exactly (Dirichlet-multinomial) and equal priors. In both generators
    everything else a user does is drawn independently of the persona, so no method can
    expect to recover the personas better; its ARI is the generator's ceiling. ``None`` for
    the generators whose likelihood has no closed form here."""
    user, etype, t, off = _log_sessions(events)
    first = off[:-1]
    s_user = user[first]
    users, u_idx = np.unique(s_user, return_inverse=True)
    if name == "dynamics":
        code = {str(x): i for i, x in enumerate(TYPES)}
        e = np.array([code[x] for x in etype])
        same = np.ones(len(e), dtype=bool)
        same[first] = False  # a transition needs a previous event in the same session
        ev_user = np.repeat(u_idx, np.diff(off))
        counts = np.zeros((len(users), N_T, N_T))
        np.add.at(counts, (ev_user[same], e[np.nonzero(same)[0] - 1], e[same]), 1.0)
        chains = dynamics_chains(k)
        ll = np.stack([_dirichlet_multinomial_ll(counts, c * DYNAMICS_CONC + DYNAMICS_FLOOR).sum(axis=1) for c in chains], axis=1)
        names = [f"p{i}" for i in range(k)]
    elif name == "real_sessions":
        kind = session_kinds(off, etype.astype(str), t)
        counts = np.zeros((len(users), len(KINDS)))
        np.add.at(counts, (u_idx, kind), 1.0)
        names = list(REAL_PERSONAS)
        ll = np.stack([_dirichlet_multinomial_ll(counts, REAL_PERSONAS[n] * REAL_CONC + REAL_FLOOR) for n in names], axis=1)
    else:
        return None
    best = ll.argmax(axis=1)
    return {str(u): names[b] for u, b in zip(users, best)}
