"""A self-contained HTML report of one run (charts as PNG files beside it).

Everything in it is read back from the run's Delta tables (``runs``, ``metrics``,
``cluster_profiles``): a few hundred rows at most, never data-sized. Every quality number is
shown beside its baselines. Written to ``<output>/_artifacts/runs/<run_id>/report.html``.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from seqclust.context import RunContext

log = logging.getLogger(__name__)

METHODS = ("encoder", "fine", "bag_of_events", "random")
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-size:90%}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px}
"""


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
    return f"<table><tr>{th}</tr>{body}</table>"


def _charts(out: Path, sweep: dict[int, dict[str, Any]], profiles: list[dict[str, Any]], down: dict[tuple[str, str], Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    if sweep:
        ks = sorted(sweep)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(ks, [sweep[k].get("silhouette", math.nan) for k in ks], "o-", label="silhouette")
        if any("stability" in sweep[k] for k in ks):
            st = [sweep[k].get("stability", (math.nan, None, None)) for k in ks]
            ax.errorbar(
                ks,
                [s[0] for s in st],
                yerr=[[s[0] - (s[1] if s[1] is not None else s[0]) for s in st], [(s[2] if s[2] is not None else s[0]) - s[0] for s in st]],
                fmt="s-",
                label="stability (mean ARI of refits, 95% CI)",
            )
        chosen = [k for k in ks if sweep[k].get("chosen")]
        for k in chosen:
            ax.axvline(k, color="grey", ls="--")
        ax.set_xlabel("k")
        ax.legend()
        ax.set_title("k sweep (dashed: chosen k)")
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=90)
        plt.close(fig)
        names.append("sweep.png")
    if profiles:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.bar([str(p["cluster_id"]) for p in profiles], [p["share"] for p in profiles])
        ax.set_xlabel("cluster")
        ax.set_ylabel("share of users")
        ax.set_title("segment sizes")
        fig.tight_layout()
        fig.savefig(out / "sizes.png", dpi=90)
        plt.close(fig)
        names.append("sizes.png")
    strategies = sorted({s for (_, s) in down})
    if strategies:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.38
        for j, method in enumerate(("encoder", "random")):
            vals = [down.get((method, s)) for s in strategies]
            xs = [i + (j - 0.5) * width for i in range(len(strategies))]
            ys = [v[0] if v else math.nan for v in vals]
            err = [
                [(v[0] - v[1]) if v and v[1] is not None else 0 for v in vals],
                [(v[2] - v[0]) if v and v[2] is not None else 0 for v in vals],
            ]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=f"segments: {method}")
        ax.set_xticks(range(len(strategies)), strategies, rotation=15)
        ax.set_ylabel("HitRate")
        ax.set_title("next-session categories: HitRate (95% CI)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "downstream.png", dpi=90)
        plt.close(fig)
        names.append("downstream.png")
    return names


def write_report(spark: SparkSession, ctx: RunContext) -> Path:
    """Write the run's report; return its path. (Long on purpose: one HTML page assembled in
    reading order from the tables' rows; each section is a few lines.)"""
    out = ctx.run_dir
    out.mkdir(parents=True, exist_ok=True)
    rec = ctx.store.read(spark, ctx.tables.runs, ctx.run_id).first() if ctx.store.exists(ctx.tables.runs) else None
    metrics = (
        ctx.store.read(spark, ctx.tables.metrics, ctx.run_id).collect() if ctx.store.exists(ctx.tables.metrics) else []
    )  # hundreds of rows
    profiles = (
        [r.asDict() for r in ctx.store.read(spark, ctx.tables.cluster_profiles, ctx.run_id).orderBy("cluster_id").collect()]
        if ctx.store.exists(ctx.tables.cluster_profiles)
        else []
    )
    by: dict[tuple[str, str, str], Any] = {}
    sweep: dict[int, dict[str, Any]] = {}
    k_rule: dict[str, Any] = {}
    drift_details = None
    for r in metrics:
        if r["family"] == "sweep":
            d = sweep.setdefault(int(r["k"]), {})
            d[r["metric"]] = (r["value"], r["ci_low"], r["ci_high"]) if r["metric"] == "stability" else r["value"]
            det = json.loads(r["details"] or "{}")
            d["chosen"] = d.get("chosen") or det.get("chosen", False)
            if det.get("chosen"):
                k_rule = det
        else:
            by[(r["family"], r["method"], r["metric"])] = (r["value"], r["ci_low"], r["ci_high"])
            if r["family"] == "drift":
                drift_details = r["details"]
    down = {
        (m, metric.split("_categories_", 1)[1]): v
        for (fam, m, metric), v in by.items()
        if fam == "downstream" and metric.startswith("hitrate@") and "_categories_" in metric
    }
    charts = _charts(out, sweep, profiles, down)
    n_eval = by.get(("internal", "encoder", "evaluated_users"))

    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>seqclust run {html.escape(ctx.run_id)}</title><style>{CSS}</style></head><body>"
    ]
    parts.append(f"<h1>seqclust run <code>{html.escape(ctx.run_id)}</code></h1>")
    if rec is not None:
        parts.append(
            _table(
                ["field", "value"],
                [
                    [html.escape(k), html.escape(str(rec[k]))]
                    for k in (
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
                    if k in rec.asDict()
                ]
                + (
                    [["evaluated_users", f"{int(n_eval[0])} (seeded hash sample: evaluate.sample_users)"]]
                    if n_eval and rec["users"] and n_eval[0] < rec["users"]
                    else []
                ),
            )
        )
    if k_rule.get("rule"):
        chosen_k = next((k for k, d in sweep.items() if d.get("chosen")), None)
        if k_rule.get("uncertain"):
            parts.append(
                f"<p class=warn><b>k uncertain</b>: k = {chosen_k} was chosen, but k = {k_rule.get('runner_up')} fits about as well; "
                "read the segments as one plausible granularity, not a finding.</p>"
            )
        parts.append(f"<p class=note>How k was chosen: {html.escape(str(k_rule['rule']))}</p>")
    families = [
        ("internal", "Internal indices (each method in its own space)"),
        ("external", "Agreement with known labels"),
        ("proxy", "Agreement with proxy labels (derived from the events, not ground truth)"),
        ("downstream", "Next-session recommendation, conversion and return within N days, from history only (95% bootstrap CI)"),
        ("drift", "Drift against the previous run"),
        ("temporal", "Segments as traits: first vs second half of each user's sessions (random: independent draws)"),
    ]
    for fam, title in families:
        names = sorted({m for (f, _, m) in by if f == fam})
        if not names:
            continue
        methods = [m for m in METHODS if any((fam, m, n) in by for n in names)]
        blank = (None, None, None)
        rows = [[html.escape(n)] + [_fmt(by.get((fam, m, n), blank)[0], ci=by.get((fam, m, n), blank)[1:]) for m in methods] for n in names]
        parts.append(f"<h2>{html.escape(title)}</h2>" + _table(["metric", *methods], rows))
        if fam == "drift" and drift_details:
            parts.append(f"<p class=note>{html.escape(drift_details)}</p>")
    if profiles:
        parts.append("<h2>Segments</h2>")
        parts.append(
            _table(
                ["cluster", "size", "share", "description"],
                [[str(p["cluster_id"]), str(p["size"]), f"{p['share']:.3f}", html.escape(p.get("description") or "")] for p in profiles],
                left=4,
            )
        )
    for c in charts:
        parts.append(f'<p><img src="{c}" alt="{c}"></p>')
    # filled in by the browser once images have loaded: the headless check reads it
    parts.append(
        '<p class=note>images loaded: <span id="img-check">?</span></p><script>window.addEventListener("load",function(){'
        "var i=document.images,n=0;for(var j=0;j<i.length;j++){if(i[j].complete&&i[j].naturalWidth>0)n++;}"
        'document.getElementById("img-check").textContent=n+"/"+i.length;});</script>'
    )
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    log.info("report: %s", path)
    return path
