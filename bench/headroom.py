"""How much room a real log leaves for segments: next-session fill and conversion, read from a run.

A useful segmentation of a real log would have fine segments, used to fill a user's own history up to
N items, beat global-popularity fill with non-overlapping 95% intervals, and personas
beat random segments on next-session conversion. Whether any segmentation *can* do that
depends on the log. This reads a finished run's Delta tables (``sessions``, ``clusters``) and
measures, on the same users and the same split as ``evaluate`` (each user's last modelled
session is the target, the earlier ones the history):

  - HitRate@N of ``own`` history alone, ``own + global`` fill, ``own + fine segment`` fill
    (the run's fine segments as stored: assigned from all of a user's sessions, target
    included, which if anything favours them; ``evaluate`` assigns from history only),
    ``own + item co-occurrence`` fill (items that share history
    sessions with the user's items; no segmentation at all, a strong recommender baseline),
    and the **upper bound of any fill**: users whose target holds an own item, or (own list
    short of N) an item someone had in history;
  - the paired 95% bootstrap interval of each fill's gain over global fill;
  - next-session conversion by whether the user bought in history, and the AUC of the
    user's *own* history conversion rate (what a segment's rate can at best approximate).

It collects the run's modelled sessions of the users with 2+ sessions to the driver: a tool
for samples (RetailRocket: 16k sessions), not for a production table.

Usage: python bench/headroom.py --output OUT --run-id RUN [--n 10] [--replicates 1000]
Last line: JSON {"users", "own", "own_global", "own_fine", "own_cooc", "fill_upper_bound",
"gain_fine_vs_global": [lo, mid, hi], "gain_cooc_vs_global": [...], "conversion_auc_own_history", ...}
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

import numpy as np


def _ranked(c: Counter) -> list[str]:
    return [x for x, v in sorted(c.items(), key=lambda t: (-t[1], t[0])) if v > 0]


def _fill(base: list[str], *extra: list[str], n: int) -> list[str]:
    out = list(base)
    for lst in extra:
        for x in lst:
            if len(out) >= n:
                return out
            if x not in out:
                out.append(x)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="run.output of the run (folder of the Delta tables)")
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    from deltalake import DeltaTable

    n = args.n
    cols = ["run_id", "session_id", "user_id", "start_ts", "is_modelled", "items", "event_counts"]
    s = DeltaTable(f"{args.output}/sessions").to_pandas(columns=cols)
    s = s[(s.run_id == args.run_id) & s.is_modelled].sort_values(["user_id", "start_ts", "session_id"])
    if s.empty:
        raise SystemExit(f"headroom: no modelled sessions of run {args.run_id!r} under {args.output}")
    s = s[s.groupby("user_id").session_id.transform("count") >= 2]
    last = s.groupby("user_id").tail(1)
    hist = s.drop(last.index)
    items = {u: set(x for x in it if x) for u, it in zip(last.user_id, last["items"])}
    target = {u: t for u, t in items.items() if t}
    users = sorted(target)

    own_c: dict[str, Counter] = defaultdict(Counter)
    glob: Counter = Counter()
    co: dict[str, Counter] = defaultdict(Counter)
    for u, it in zip(hist.user_id, hist["items"]):
        its = [x for x in it if x]
        own_c[u].update(its)
        glob.update(its)
        uniq = set(its)
        for a in uniq:
            co[a].update(b for b in uniq if b != a)
    own = {u: _ranked(own_c[u])[:n] for u in users}
    global_list = _ranked(glob)[: 2 * n]

    cl = DeltaTable(f"{args.output}/clusters").to_pandas()
    cl = cl[(cl.run_id == args.run_id) & (cl.entity_type == "user")]
    fine = cl[cl.granularity == "fine"] if "granularity" in cl else cl.iloc[:0]
    seg = dict(zip(fine.entity_id, fine.cluster_id))
    seg_c: dict[int, Counter] = defaultdict(Counter)
    for u, c in own_c.items():
        if u in seg:
            seg_c[seg[u]].update(c)

    def cooc(u: str) -> list[str]:
        c: Counter = Counter()
        for a in own[u]:
            c.update(co[a])
        return _ranked(c)

    recs = {
        "own": {u: own[u] for u in users},
        "own_global": {u: _fill(own[u], global_list, n=n) for u in users},
        "own_fine": {u: _fill(own[u], _ranked(seg_c.get(seg.get(u), Counter()))[: 2 * n], n=n) for u in users},
        "own_cooc": {u: _fill(own[u], cooc(u), global_list, n=n) for u in users},
    }
    hits = {name: np.array([len(set(r[u][:n]) & target[u]) > 0 for u in users], dtype=float) for name, r in recs.items()}
    seen = set(glob)
    bound = np.array([bool(set(own[u]) & target[u]) or (len(own[u]) < n and bool((target[u] - set(own[u])) & seen)) for u in users])
    rng = np.random.default_rng(args.seed)
    idx = rng.integers(0, len(users), size=(args.replicates, len(users)))

    def ci(x: np.ndarray) -> list[float]:
        reps = x[idx].mean(axis=1)
        lo, hi = np.percentile(reps, [2.5, 97.5])
        return [round(float(lo), 4), round(float(x.mean()), 4), round(float(hi), 4)]

    out: dict = {"users": len(users), "n": n, "fine_segments": len(set(seg.values()))}
    for name, h in hits.items():
        out[name] = ci(h)
    out["fill_upper_bound"] = round(float(bound.mean()), 4)
    out["gain_fine_vs_global"] = ci(hits["own_fine"] - hits["own_global"])
    out["gain_cooc_vs_global"] = ci(hits["own_cooc"] - hits["own_global"])

    bought = s.assign(b=s.event_counts.map(lambda m: int(dict(m or {}).get("purchase", 0) > 0)))
    hb = bought.drop(last.index).groupby("user_id").b.agg(["max", "mean"])
    y = bought.loc[last.index].set_index("user_id").b.loc[hb.index]
    if 0 < y.sum() < len(y):
        from sklearn.metrics import roc_auc_score

        out["conversion_next_given_bought_before"] = round(float(y[hb["max"] == 1].mean()), 4) if (hb["max"] == 1).any() else None
        out["conversion_next_given_not_bought_before"] = round(float(y[hb["max"] == 0].mean()), 4) if (hb["max"] == 0).any() else None
        out["users_who_bought_at_all"] = round(float(bought.groupby("user_id").b.max().mean()), 4)
        out["conversion_auc_own_history"] = round(float(roc_auc_score(y, hb["mean"])), 4)

    print(f"{len(users)} users with history and a non-empty next session, HitRate@{n} (95% CI):")
    for name in recs:
        lo, mid, hi = out[name]
        print(f"  {name:<11} {mid:.3f} [{lo:.3f}, {hi:.3f}]")
    print(f"  any fill can reach at most {out['fill_upper_bound']:.3f}")
    for g in ("gain_fine_vs_global", "gain_cooc_vs_global"):
        lo, mid, hi = out[g]
        print(f"  {g}: {mid:+.4f} [{lo:+.4f}, {hi:+.4f}] (paired)")
    if "conversion_auc_own_history" in out:
        print(
            f"  next session converts: {out['conversion_next_given_bought_before']} after a purchase in history, "
            f"{out['conversion_next_given_not_bought_before']} without; AUC of the user's own history rate "
            f"{out['conversion_auc_own_history']:.3f}"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
