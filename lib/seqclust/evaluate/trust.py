"""How far the segments can be trusted, said in sentences.

The metrics table holds dozens of figures per run; a reader needs the few verdicts they add up
to. For each level of the segmentation (the top level, the segment tree's leaves when some
segment splits, and the top level's confident members) and each job segments are used for,
one sentence says whether the segments do that job better than the references measured beside
them in the same run:

- **conversion**: does a segment's past conversion rate rank who buys in their next session
  (``conversion_auc``; bag-of-events segments and random segments of the same sizes beside);
- **stability**: do users keep their segment from the first half of their history to the
  second (``temporal_ari``; random draws beside — about 0);
- **next-session items**: does the segment's most popular list hold what the user looks at next
  (``hitrate@N_items_cluster``, categories where a log has no items; bag-of-events and random).

"Better" means the level's figure lies above the reference's 95% bootstrap interval (the
intervals the evaluate stage measures); a figure inside it is "no better". Weak temporal
persistence (ARI under ``WEAK_TEMPORAL``) is said so even when it beats random.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WEAK_TEMPORAL = 0.5  # the split test's own persistence threshold (cluster.split_min_temporal's default)
LEVELS = (("encoder", "top level"), ("leaf", "leaves"), ("confident", "confident members (top level)"))


@dataclass(frozen=True)
class Figure:
    value: float
    low: float | None = None
    high: float | None = None

    def above(self, other: Figure) -> bool:
        """This figure lies above ``other``'s 95% interval (its value where it has none)."""
        ref = other.high if other.high is not None and math.isfinite(other.high) else other.value
        return self.value > ref


def per_segment(row: Mapping[str, Any]) -> bool:
    """A ``metrics`` row about one segment (``details.segment``), not the run's level as a whole."""
    return "segment" in json.loads(row.get("details") or "{}")


def figures(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Figure]:
    """``(method, metric) -> Figure`` from ``metrics`` rows (run-level rows only: rows of one
    segment, ``details.segment``, are left out)."""
    out: dict[tuple[str, str], Figure] = {}
    for r in rows:
        v = r.get("value")
        if v is None or not math.isfinite(float(v)) or per_segment(r):
            continue
        out[(r["method"], r["metric"])] = Figure(float(v), r.get("ci_low"), r.get("ci_high"))
    return out


def _items_metric(f: Mapping[tuple[str, str], Figure]) -> tuple[str, str] | None:
    for what in ("items", "categories"):
        hit = next((m for (meth, m) in f if meth == "encoder" and m.startswith("hitrate@") and m.endswith(f"_{what}_cluster")), None)
        if hit:
            return hit, what
    return None


def _versus(
    f: Mapping[tuple[str, str], Figure], method: str, metric: str, refs: tuple[str, ...]
) -> tuple[Figure, list[tuple[str, Figure, bool]]] | None:
    me = f.get((method, metric))
    if me is None:
        return None
    return me, [(r, f[(r, metric)], me.above(f[(r, metric)])) for r in refs if (r, metric) in f]


def _name(ref: str) -> str:
    return {"bag_of_events": "bag-of-events segments", "random": "random segments", "encoder": "all members"}[ref]


def _job_sentence(job: str, me: Figure, refs: list[tuple[str, Figure, bool]], label: str) -> str:
    figs = ", ".join(f"{_name(r)} {x.value:.3f}" for r, x, _ in refs)
    losing = [r for r, _, better in refs if not better]
    if not refs:
        return f"{job}: {label} {me.value:.3f} (no reference measured)"
    if not losing:
        return f"{job}: better than {' and '.join(_name(r) for r, _, _ in refs)} ({label} {me.value:.3f} vs {figs})"
    if "random" in losing:
        return f"{job}: no better than random segments ({label} {me.value:.3f} vs {figs})"
    return f"{job}: no better than {' or '.join(_name(r) for r in losing)} ({label} {me.value:.3f} vs {figs})"


def statements(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per level: its size, the share of confident members, and a verdict per job
    (conversion, stability, next-session items), each against the references measured; and,
    from the segment tree's split tests (family ``hierarchy``), a line saying so when no
    segment split."""
    rows = list(rows)
    f = figures(rows)
    items = _items_metric(f)
    out = []
    for method, level in LEVELS:
        parts: list[str] = []
        refs3 = ("encoder", "bag_of_events", "random") if method == "confident" else ("bag_of_events", "random")
        conv = _versus(f, method, "conversion_auc", refs3)
        if conv:
            parts.append(_job_sentence("conversion", *conv, "AUC"))
        temporal = _versus(f, method, "temporal_ari", ("encoder", "random") if method == "confident" else ("random",))
        if temporal:
            me, refs = temporal
            line = _job_sentence("stability", me, refs, "ARI")
            rnd = next((x for r, x, _ in refs if r == "random"), None)
            if rnd is not None and me.above(rnd) and me.value < WEAK_TEMPORAL:
                line = f"stability: weak (ARI {me.value:.3f} between the halves of users' histories; random {rnd.value:.3f})"
            parts.append(line)
        if items:
            it = _versus(f, method, items[0], refs3)
            if it:
                parts.append(_job_sentence(f"next-session {items[1]}", *it, "HitRate"))
        if not parts:
            continue
        share = f.get((method if method != "confident" else "encoder", "confident_share"))
        if share is not None:
            sure = f"{100 * share.value:.0f}% of users" + (" confident" if method != "confident" else "")
            parts.insert(0, sure)
        out.append(f"{level}: " + "; ".join(parts))
    splits = [r.get("value") for r in rows if r.get("family") == "hierarchy" and r.get("metric") == "split"]
    if splits and not any(v == 1.0 for v in splits):
        out.append(f"leaves: no segment holds segments of its own ({len(splits)} tested); the leaves are the top level")
    return out
