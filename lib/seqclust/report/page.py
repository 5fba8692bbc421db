"""A self-contained HTML report of one run: one file, its charts embedded as PNG data URIs.

Everything in it is read back from the run's Delta tables: the run record, metrics and
profiles (a few hundred rows), and through ``seqclust.report.explain`` a seeded sample of users for
the map, per-segment n-gram counts and example sessions, and the flow of users from the run
it is compared with. Every quality number is shown beside its baselines; every chart has a
caption that says how to read it. Readable from 800 px wide up (wide tables scroll inside
their box, never the page). Written to ``<output>/_artifacts/runs/<run_id>/report.html``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import SparkSession

from seqclust.evaluate.trust import per_segment, statements
from seqclust.report import charts
from seqclust.runtime.context import RunContext
from seqclust.segment.cluster import coarse, leaf_rows

if TYPE_CHECKING:
    from seqclust.core.config import PipelineConfig

log = logging.getLogger(__name__)

METHODS = ("encoder", "leaf", "confident", "fine", "bag_of_events", "random")
CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 16px;color:#222}
.tbl{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;height:auto;border:1px solid #eee}
figure{margin:1em 0}figcaption{color:#444;font-size:90%;max-width:900px}
.note{color:#666;font-size:90%}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px}
.journey{display:flex;flex-wrap:wrap;align-items:center;gap:2px;margin:4px 0}
.ev{display:inline-block;padding:1px 6px;border-radius:9px;font-size:80%;color:#fff;background:#777}
.gap{font-size:70%;color:#888;margin:0 2px}
.ev-view{background:#4c78a8}.ev-search{background:#72b7b2}.ev-cart{background:#f58518}
.ev-fav{background:#b279a2}.ev-purchase{background:#54a24b}
code{word-break:break-all}
"""
EVENT_LABEL = {"view": "view", "search": "search", "cart": "cart", "fav": "fav", "purchase": "buy"}


def _fmt(v: Any, ci: tuple[Any, Any] | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    s = f"{v:.4f}" if isinstance(v, float) else str(v)
    if ci and ci[0] is not None and ci[1] is not None:
        s += f" <span class=note>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"
    return s


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    th = "".join(f"<th class={'l' if i < left else 'r'}>{html.escape(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td class={'l' if i < left else 'r'}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<div class=tbl><table><tr>{th}</tr>{body}</table></div>"


def _figure(png: bytes | None, alt: str, caption: str) -> str:
    """An embedded PNG with its caption ('' when there is nothing to draw)."""
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


def _gap(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _journey(events: list[str], gaps: list[float]) -> str:
    """A session as a row of event chips with the time between them (``gaps`` as the sessions
    table keeps them: one per event, the first 0)."""
    out = []
    for i, e in enumerate(events):
        if i and i < len(gaps) and gaps[i] is not None:
            out.append(f"<span class=gap>{_gap(float(gaps[i]))}</span>")
        cls = f"ev ev-{e}" if e in EVENT_LABEL else "ev"
        out.append(f"<span class='{cls}'>{html.escape(EVENT_LABEL.get(e, str(e)))}</span>")
    return "<div class=journey>" + "".join(out) + "</div>"


def _section(name: str, build: Callable[[], list[str]]) -> list[str]:
    """One picture section; if drawing it fails the report still appears, saying so."""
    t0 = time.monotonic()
    try:
        out = build()
        log.info("report: %s in %.1fs", name, time.monotonic() - t0)
        return out
    except Exception as e:  # a chart is not worth the run's report
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        log.warning("report: %s not drawn: %s", name, first)
        return [f"<p class=note>{html.escape(name)} not drawn: {html.escape(first)}</p>"]


def _map_section(spark: SparkSession, ctx: RunContext, cfg: PipelineConfig) -> list[str]:
    from seqclust.report.explain import map_data

    m = map_data(spark, ctx, cfg.report, cfg.run.seed, cfg.baseline, cfg.cluster)
    if m is None:
        return []
    n = len(m.xy)
    cap = (
        f"Each dot is a user ({n:,} of {m.users_total:,}, a seeded sample), placed by the first two principal components of "
        "their vector and coloured by segment; black crosses are the segment centres, hollow rings users with one session. "
        "Segments that form separate clouds are distinct; overlapping colours are segments that differ in directions this "
        "flat view does not show."
    )
    if m.boe_xy is not None:
        cap += " The middle panel clusters the same users by their bag of events at the same k, for comparison."
    if m.tsne_xy is not None:
        cap += f" The right panel is a {m.tsne_note}: it keeps neighbours together, distances between clouds mean little."
    elif m.tsne_note:
        cap += f" ({m.tsne_note}.)"
    out = ["<h2>The map of users</h2>", _figure(charts.user_map(m), "map of users by segment", cap)]
    out += [f"<p class=note>{html.escape(x)}</p>" for x in m.notes]
    return out


def _heatmap_section(profiles: list[dict[str, Any]]) -> list[str]:
    from seqclust.report.explain import heatmap

    h = heatmap(profiles)
    if h is None or not h.features:
        return []
    cap = (
        "Each cell is the segment's value over everyone's (1.00 = like everyone; red above, blue below, on a log scale): "
        "event-type shares, conversion, sessions per user, session length and duration, time between events, price level "
        "and the segment's most lifted category, where the source has them. Read a row to see what sets a segment apart."
    )
    return ["<h2>What sets each segment apart</h2>", _figure(charts.heatmap(h), "segment by feature heatmap", cap)]


def _tree_section(
    spark: SparkSession, ctx: RunContext, cfg: PipelineConfig, metrics: list[dict[str, Any]], nodes: list[dict[str, Any]]
) -> list[str]:
    """The segment tree, when some segment split: every split test (the evidence), a heatmap
    per split (its sub-segments read against each other), the map coloured by leaf and the
    typical journeys per leaf."""
    import dataclasses

    from seqclust.report.explain import heatmap, map_data

    tests: dict[str, dict[str, Any]] = {}
    for r in metrics:
        if r["family"] == "hierarchy":
            path = json.loads(r["details"] or "{}").get("segment_path")
            t = tests.setdefault(str(path), {"k": r["k"], "details": json.loads(r["details"] or "{}")})
            t[r["metric"]] = r["value"]
    if not any(t.get("split") == 1.0 for t in tests.values()):
        return []
    out = [
        "<h2>The segment tree</h2>",
        "<p class=note>Every segment was tested for segments of its own (docs/EVALUATION.md): its best sub-split's silhouette "
        "against one Gaussian blob's of the same shape (the gap), the split's stability on subsamples, and whether users keep "
        "their sub-segment across the two halves of their history (ARI). A segment splits when all three pass.</p>",
    ]
    head = ["segment", "users", "sub-k", "silhouette", "gap", "stability", "across halves", "verdict"]
    rows = []
    from seqclust.segment.hierarchy import path_key

    for path in sorted(tests, key=path_key):
        t = tests[path]
        rows.append(
            [
                html.escape(path),
                str(t["details"].get("users", "")),
                str(t["k"]),
                _fmt(t.get("split_silhouette")),
                _fmt(t.get("split_gap")),
                _fmt(t.get("split_stability")),
                _fmt(t.get("split_temporal_ari")),
                html.escape(str(t["details"].get("reason", ""))),
            ]
        )
    out.append(_table(head, rows, left=8))
    for path in sorted((p for p, t in tests.items() if t.get("split") == 1.0), key=path_key):
        kids = [n for n in nodes if str(n.get("segment_path") or "").rsplit(".", 1)[0] == path and "." in str(n.get("segment_path"))]
        h = heatmap(sorted(kids, key=lambda n: path_key(n["segment_path"])), by_path=True)
        if h is None or not h.features:
            continue
        cap = (
            f"Segment {path}'s sub-segments, each read against the segment's own users (1.00 = like the segment; red above, "
            "blue below): what the split separates."
        )
        out += [f"<h3>Inside segment {html.escape(path)}</h3>", _figure(charts.heatmap(h), f"sub-segments of {path}", cap)]
    m = map_data(spark, ctx, dataclasses.replace(cfg.report, tsne_users=0), cfg.run.seed, level="leaf")
    if m is not None:
        cap = (
            f"The same map coloured by leaf ({len(m.xy):,} users): numbers are leaf ids (the table at the top gives their paths), "
            "crosses the sampled members' means."
        )
        out.append(_figure(charts.user_map(m), "map of users by leaf", cap))
    out += _journeys_section(spark, ctx, cfg, level="leaf")
    return out


def _journeys_section(spark: SparkSession, ctx: RunContext, cfg: PipelineConfig, level: str = "top") -> list[str]:
    from seqclust.report.explain import MIN_NGRAM_COUNT, journeys

    r = cfg.report
    j = journeys(
        spark,
        ctx,
        top=r.top_ngrams,
        examples=r.examples,
        neighbourhood=r.neighbourhood,
        seed=cfg.run.seed,
        sample_users=r.journey_users,
        level=level,
    )
    if j is None or not (j.ngrams or j.examples):
        return []
    what = "leaf" if level == "leaf" else "segment"
    out = [
        "<h2>Typical journeys" + (" per leaf" if level == "leaf" else "") + "</h2>",
        f"<p class=note>Per {what}: the event sequences (2 and 3 events in a row) most over-represented against everyone "
        f"(lift = their share of the segment's sequences over their share of everyone's; seen at least {MIN_NGRAM_COUNT} times), and "
        f"{r.examples} sessions drawn at random from the segment's {r.neighbourhood} users nearest its centre, "
        "with the time between events. Session handles are hashes, not ids.</p>",
    ]
    for c in sorted(set(j.ngrams) | set(j.examples)):
        grams = ", ".join(f"<b>{html.escape(g)}</b> {lift:.1f}x" for g, lift, _ in j.ngrams.get(c, []))
        out.append(f"<h3>{what} {c}</h3><p>{grams or f'<span class=note>no sequence seen {MIN_NGRAM_COUNT} times</span>'}</p>")
        for e in j.examples.get(c, []):
            out.append(f"<div class=note>session {html.escape(e['session'])} ({_gap(float(e['duration_s'] or 0))})</div>")
            out.append(_journey(e["events"], e["gaps_s"]))
    return out


def _flows_section(spark: SparkSession, ctx: RunContext, drift_details: str | None) -> list[str]:
    from seqclust.report.explain import flows

    det = json.loads(drift_details or "{}")
    if not det.get("previous_run"):
        return []
    matched = {int(a): int(b) for a, b in (det.get("matched") or {}).items()}
    f = flows(spark, ctx, det["previous_run"], matched)
    if f is None:
        return []
    cap = (
        f"Users present in both runs: left, their segment in run {f.previous_run}; right, in this run. A band's height is "
        "the number of users who moved that way; thick straight bands are stable segments, fans are segments that split "
        "or merged. Segments are matched by " + str(det.get("alignment", "")).replace("_", " ") + "."
    )
    out = ["<h2>Across runs</h2>", _figure(charts.flows(f), "flow of users between runs", cap)]
    if f.changes:
        rows = [
            [
                f"{c['previous']} → {c['now']}",
                f"{c['share'][0]:.3f} → {c['share'][1]:.3f}",
                f"{c['conversion_rate'][0]:.3f} → {c['conversion_rate'][1]:.3f}",
                f"{c['median_session_events'][0]:.0f} → {c['median_session_events'][1]:.0f}",
                html.escape(f"{c['largest_mix_change'][0]} {c['largest_mix_change'][1]:.3f} → {c['largest_mix_change'][2]:.3f}"),
            ]
            for c in f.changes
        ]
        out.append(_table(["matched segments", "share", "conversion", "median session events", "largest event-mix change"], rows))
    return out


def _verdict(
    profiles: list[dict[str, Any]], leaves: list[dict[str, Any]], metrics: list[dict[str, Any]], k_rule: dict[str, Any]
) -> list[str]:
    """The first screen: how many segments, one line on who each one is, how sure its members
    are, and how far each level holds (``seqclust.evaluate.trust``)."""
    sure = {
        (r["method"], json.loads(r["details"] or "{}").get("segment")): r["value"]
        for r in metrics
        if r["family"] == "confidence" and r["metric"] == "confident_share"
    }
    split = len(leaves) > len(profiles)
    head = f"{len(profiles)} segments" + (f", {len(leaves)} once the segments that hold sub-segments are split" if split else "")
    out = [
        "<h2>Verdict</h2>",
        f"<p><b>{head}.</b>" + (" <b>k uncertain</b>: another k fits about as well." if k_rule.get("uncertain") else "") + "</p>",
    ]

    def rows(ps: list[dict[str, Any]], method: str) -> list[list[str]]:
        return [
            [
                html.escape(str(p["cluster_id"]) if method == "encoder" else f"{p['cluster_id']} (path {p.get('segment_path')})"),
                str(p["size"]),
                f"{p['share']:.1%}",
                _fmt(sure.get((method, int(p["cluster_id"])))),
                html.escape(p.get("description") or ""),
            ]
            for p in ps
        ]

    head_cols = ["segment", "users", "share", "confident", "who they are"]
    out.append(_table(head_cols, rows(profiles, "encoder"), left=5))
    if split:
        out.append("<p>The leaves of the segment tree (each user in their deepest segment; the path names the segments above):</p>")
        out.append(_table(head_cols, rows(leaves, "leaf"), left=5))
    trust = statements(metrics)
    if trust:
        out.append("<p>How far the segments hold (better: above the reference's 95% interval):</p>")
        out.append("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in trust) + "</ul>")
    out.append(
        "<p class=note>confident: the share of a segment's users whose margin over the nearest other segment "
        "(clusters.confidence) reaches cluster.min_confidence.</p>"
    )
    return out


@dataclass
class _Run:
    """What the report reads back from the run's tables (a few hundred rows)."""

    rec: Any
    metrics: list[dict[str, Any]]
    profiles: list[dict[str, Any]]  # the top level
    leaves: list[dict[str, Any]]
    nodes: list[dict[str, Any]]  # every node below the top level: leaves and inner nodes
    by: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # (family, method, metric) -> (value, low, high)
    sweep: dict[int, dict[str, Any]] = field(default_factory=dict)
    k_rule: dict[str, Any] = field(default_factory=dict)
    drift_details: str | None = None


def _read(spark: SparkSession, ctx: RunContext) -> _Run:
    store, t = ctx.store, ctx.tables
    rec = store.read(spark, t.runs, ctx.run_id).first() if store.exists(t.runs) else None
    metrics = [r.asDict() for r in store.read(spark, t.metrics, ctx.run_id).collect()] if store.exists(t.metrics) else []
    profiles: list[dict[str, Any]] = []
    leaves: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    if store.exists(t.cluster_profiles):
        every = store.read(spark, t.cluster_profiles, ctx.run_id)
        profiles = [r.asDict() for r in coarse(every).orderBy("cluster_id").collect()]
        leaf_profiles = leaf_rows(every)
        if leaf_profiles is not None:
            leaves = [r.asDict() for r in leaf_profiles.orderBy("cluster_id").collect()]
            nodes = [r.asDict() for r in every.where("granularity IN ('leaf', 'node')").collect()]
    run = _Run(rec, metrics, profiles, leaves, nodes)
    for r in metrics:
        if r["family"] == "sweep":
            d = run.sweep.setdefault(int(r["k"]), {})
            d[r["metric"]] = (r["value"], r["ci_low"], r["ci_high"]) if r["metric"] == "stability" else r["value"]
            det = json.loads(r["details"] or "{}")
            d["chosen"] = d.get("chosen") or det.get("chosen", False)
            if det.get("chosen"):
                run.k_rule = det
        elif not per_segment(r):  # per-segment rows stay out of the run's tables
            run.by[(r["family"], r["method"], r["metric"])] = (r["value"], r["ci_low"], r["ci_high"])
            if r["family"] == "drift" and r["method"] == "encoder":
                run.drift_details = r["details"]
    return run


RUN_FIELDS = (
    "status",
    "input_path",
    "rows_input",
    "rows_clean",
    "rows_quarantined",
    "rows_duplicates",
    "sessions",
    "users",
    "k",
    "encoder_id",
    "git_commit",
    "config_hash",
)


def _run_section(run: _Run) -> list[str]:
    """The run record, and how k was chosen (with the warning when the rule was unsure)."""
    out = []
    rec = run.rec
    n_eval = run.by.get(("internal", "encoder", "evaluated_users"))
    if rec is not None:
        rows = [[html.escape(k), html.escape(str(rec[k]))] for k in RUN_FIELDS if k in rec.asDict()]
        if n_eval and rec["users"] and n_eval[0] < rec["users"]:
            rows.append(["evaluated_users", f"{int(n_eval[0])} (seeded hash sample: evaluate.sample_users)"])
        out += ["<h2>The run</h2>", _table(["field", "value"], rows)]
    if run.k_rule.get("rule"):
        chosen_k = next((k for k, d in run.sweep.items() if d.get("chosen")), None)
        if run.k_rule.get("uncertain"):
            out.append(
                f"<p class=warn><b>k uncertain</b>: k = {chosen_k} was chosen, but k = {run.k_rule.get('runner_up')} fits about as "
                "well; read the segments as one plausible granularity, not a finding.</p>"
            )
        out.append(f"<p class=note>How k was chosen: {html.escape(str(run.k_rule['rule']))}</p>")
    return out


FAMILIES = (
    ("internal", "Internal indices (each method in its own space)"),
    ("external", "Agreement with known labels"),
    ("proxy", "Agreement with proxy labels (derived from the events, not ground truth)"),
    ("downstream", "Next-session recommendation, conversion and return within N days, from history only (95% bootstrap CI)"),
    ("drift", "Drift against the previous run"),
    ("temporal", "Segments as traits: first vs second half of each user's sessions (random: independent draws)"),
)


def _metric_sections(run: _Run) -> list[str]:
    """A table per metric family, one column per method (the run's segments beside its baselines)."""
    out = []
    by = run.by
    for fam, title in FAMILIES:
        names = sorted({m for (f, _, m) in by if f == fam})
        if not names:
            continue
        methods = [m for m in METHODS if any((fam, m, n) in by for n in names)]
        blank = (None, None, None)
        rows = [[html.escape(n)] + [_fmt(by.get((fam, m, n), blank)[0], ci=by.get((fam, m, n), blank)[1:]) for m in methods] for n in names]
        out.append(f"<h2>{html.escape(title)}</h2>" + _table(["metric", *methods], rows))
        if fam == "drift" and run.drift_details:
            out.append(f"<p class=note>{html.escape(run.drift_details)}</p>")
    return out


def _sweep_and_hitrate(run: _Run) -> list[str]:
    """The k sweep's chart and the next-session HitRate beside random segments."""
    out = []
    if run.sweep:
        out.append("<h2>How k was chosen</h2>")
        out.append(
            _figure(
                charts.sweep(run.sweep),
                "k sweep",
                "Silhouette (higher: tighter, better separated segments) and stability (how often refits on other "
                "samples agree) at each k tried; the dashed line is the chosen k.",
            )
        )
    down = {
        (m, metric.split("_categories_", 1)[1]): v
        for (fam, m, metric), v in run.by.items()
        if fam == "downstream" and metric.startswith("hitrate@") and "_categories_" in metric
    }
    if down:
        out.append(
            _figure(
                charts.downstream(down),
                "next-session HitRate",
                "How often a list built from the user's segment contains a category of the user's next session, for "
                "this run's segments and for random segments of the same sizes; bars that do not clear random add nothing.",
            )
        )
    return out


CHECKS = (
    # filled in by the browser once images have loaded: the headless check reads them
    '<p class=note>images loaded: <span id="img-check">?</span>; page width: <span id="scroll-check">?</span></p>'
    '<script>window.addEventListener("load",function(){'
    "var i=document.images,n=0;for(var j=0;j<i.length;j++){if(i[j].complete&&i[j].naturalWidth>0)n++;}"
    'document.getElementById("img-check").textContent=n+"/"+i.length;'
    "var d=document.documentElement,w=window.innerWidth;"
    'document.getElementById("scroll-check").textContent=d.scrollWidth<=w?"fits "+w:"overflows "+d.scrollWidth+" > "+w;});</script>'
)


def write_report(spark: SparkSession, ctx: RunContext, cfg: PipelineConfig | None = None) -> Path:
    """Write the run's report; return its path. Reading order: the verdict, the run, the
    metric tables, the segments and their pictures, the tree, how k was chosen, across runs."""
    if cfg is None:
        from seqclust.core.config import PipelineConfig

        cfg = PipelineConfig()
    out = ctx.run_dir
    out.mkdir(parents=True, exist_ok=True)
    run = _read(spark, ctx)
    profiles = run.profiles
    title = html.escape(ctx.run_id)
    parts = [
        "<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>seqclust run {title}</title><style>{CSS}</style></head><body>",
        f"<h1>seqclust run <code>{title}</code></h1>",
    ]
    if profiles:
        parts += _verdict(profiles, run.leaves, run.metrics, run.k_rule)
    parts += _run_section(run)
    parts += _metric_sections(run)
    if profiles:
        parts.append("<h2>Segments</h2>")
        parts.append(
            _table(
                ["cluster", "size", "share", "description"],
                [[str(p["cluster_id"]), str(p["size"]), f"{p['share']:.3f}", html.escape(p.get("description") or "")] for p in profiles],
                left=4,
            )
        )
    parts.append(_figure(charts.sizes(profiles), "segment sizes", "The share of users in each segment (colours as in the map below)."))
    parts += _section("the heatmap", lambda: _heatmap_section(profiles))
    parts += _section("the map", lambda: _map_section(spark, ctx, cfg))
    parts += _section("typical journeys", lambda: _journeys_section(spark, ctx, cfg))
    parts += _section("the segment tree", lambda: _tree_section(spark, ctx, cfg, run.metrics, run.nodes))
    parts += _sweep_and_hitrate(run)
    parts += _section("the flow across runs", lambda: _flows_section(spark, ctx, run.drift_details))
    parts += [CHECKS, "</body></html>"]
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    log.info("report: %s", path)
    return path
