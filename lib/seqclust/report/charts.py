"""The report's charts, drawn with matplotlib (Agg) into PNG bytes: the report embeds them, so it
stays one self-contained file. Each function takes the small driver-side data of
``seqclust.report.explain`` or of the metrics table and returns ``bytes`` (or None: nothing to draw)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from seqclust.report.explain import Flows, Heatmap, MapData

DPI = 90


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, rect: tuple[float, float, float, float] | None = None) -> bytes:
    """The figure as PNG bytes (laid out within ``rect`` when given: room for a figure legend)."""
    buf = io.BytesIO()
    fig.tight_layout(rect=rect)
    fig.savefig(buf, format="png", dpi=DPI)
    _plt().close(fig)
    return buf.getvalue()


def _colours(k: int) -> Any:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(max(k, 1))]


def sweep(sweep: dict[int, dict[str, Any]]) -> bytes | None:
    if not sweep:
        return None
    plt = _plt()
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
    for k in [k for k in ks if sweep[k].get("chosen")]:
        ax.axvline(k, color="grey", ls="--")
    ax.set_xlabel("k")
    ax.legend()
    ax.set_title("k sweep (dashed: chosen k)")
    return _png(fig)


def sizes(profiles: list[dict[str, Any]]) -> bytes | None:
    if not profiles:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    cols = _colours(max(int(p["cluster_id"]) for p in profiles) + 1)
    ax.bar([str(p["cluster_id"]) for p in profiles], [p["share"] for p in profiles], color=[cols[int(p["cluster_id"])] for p in profiles])
    ax.set_xlabel("segment")
    ax.set_ylabel("share of users")
    ax.set_title("segment sizes")
    return _png(fig)


def downstream(down: dict[tuple[str, str], Any]) -> bytes | None:
    strategies = sorted({s for (_, s) in down})
    if not strategies:
        return None
    plt = _plt()
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
    return _png(fig)


def _scatter(ax: Any, xy: np.ndarray, cluster: np.ndarray, one: np.ndarray, k: int, title: str) -> None:
    cols = _colours(k)
    for c in sorted(set(cluster.tolist())):
        m = cluster == c
        multi, single = m & ~one, m & one
        colour = cols[int(c) % len(cols)]
        ax.scatter(xy[multi, 0], xy[multi, 1], s=6, color=colour, alpha=0.6, linewidths=0, label=f"segment {c}")
        ax.scatter(xy[single, 0], xy[single, 1], s=10, facecolors="none", edgecolors=[colour], alpha=0.5, linewidths=0.6)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def user_map(m: MapData) -> bytes:
    """The run's segments on the sample's first two principal components (centres as black
    crosses; one-session users as hollow rings), beside the bag of events of the same users and
    a t-SNE of part of the sample when they exist."""
    plt = _plt()
    panels = 1 + (m.boe_xy is not None) + (m.tsne_xy is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.4), squeeze=False)
    k = int(max(m.cluster.max() + 1, len(m.centroids))) if len(m.cluster) else 1
    ax = axes[0][0]
    _scatter(ax, m.xy, m.cluster, m.one_session, k, f"segments, PCA ({100 * sum(m.explained):.0f}% of variance)")
    if len(m.centroids):
        ax.scatter(m.centroids[:, 0], m.centroids[:, 1], marker="X", s=90, color="black", edgecolors="white", linewidths=1)
        for i, (x, y) in enumerate(m.centroids):
            ax.annotate(str(i), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=9, weight="bold")
    i = 1
    if m.boe_xy is not None and m.boe_cluster is not None and m.boe_one_session is not None:
        _scatter(axes[0][i], m.boe_xy, m.boe_cluster, m.boe_one_session, k, "bag of events, same users and k (PCA)")
        i += 1
    if m.tsne_xy is not None:
        n = len(m.tsne_xy)
        _scatter(axes[0][i], m.tsne_xy, m.cluster[:n], m.one_session[:n], k, f"segments, t-SNE ({n:,} users)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(labels) > 20:  # too many segments for a legend: the colours still tell them apart
        return _png(fig)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 10), fontsize=8, markerscale=2, frameon=False)
    return _png(fig, rect=(0, 0.07, 1, 1))


def heatmap(h: Heatmap) -> bytes:
    """Lift per cell on a log colour scale centred on 1 (red above, blue below), values printed."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    lg = np.log2(np.where(h.lift > 0, h.lift, np.nan))
    span = float(np.nanmax(np.abs(lg))) if np.isfinite(lg).any() else 1.0
    span = max(span, 0.25)
    fig, ax = plt.subplots(figsize=(min(10.0, max(6.0, 0.6 * len(h.features) + 2.5)), 0.4 * len(h.segments) + 2.0))
    im = ax.imshow(np.ma.masked_invalid(lg), cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -span, span), aspect="auto")
    ax.set_xticks(range(len(h.features)), h.features, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(h.segments)), [f"segment {s}" for s in h.segments], fontsize=8)
    for i in range(len(h.segments)):
        for j in range(len(h.features)):
            v = h.lift[i, j]
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(lg[i, j]) > 0.6 * span else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.03)
    ticks = [t for t in (-3, -2, -1, 0, 1, 2, 3) if abs(t) <= span]
    cb.set_ticks(ticks, labels=[f"{2.0**t:g}x" for t in ticks])
    ax.set_title("segment / everyone", fontsize=10)
    return _png(fig)


def flows(f: Flows) -> bytes:
    """Alluvial: the previous run's segments (left) and this run's (right), stacked by users in
    both runs; a band per (previous, now) pair, coloured by the previous segment."""
    plt = _plt()
    olds = sorted({o for o, _ in f.pairs})
    news = sorted({n for _, n in f.pairs})
    total = float(sum(f.pairs.values()))
    gap = 0.02
    cols = _colours(max(olds + news) + 1)

    def blocks(keys: list[int], size: dict[int, int]) -> dict[int, float]:
        y, out = 0.0, {}
        for c in keys:
            out[c] = y
            y += size[c] / total + gap
        return out

    osize = {o: sum(v for (a, _), v in f.pairs.items() if a == o) for o in olds}
    nsize = {n: sum(v for (_, b), v in f.pairs.items() if b == n) for n in news}
    oy, ny = blocks(olds, osize), blocks(news, nsize)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    o_fill = dict.fromkeys(olds, 0.0)
    n_fill = dict.fromkeys(news, 0.0)
    t = np.linspace(0, 1, 50)
    s = 3 * t**2 - 2 * t**3  # smooth step
    for o, n in sorted(f.pairs, key=lambda p: (p[0], p[1])):
        h = f.pairs[(o, n)] / total
        y0, y1 = oy[o] + o_fill[o], ny[n] + n_fill[n]
        o_fill[o] += h
        n_fill[n] += h
        lo = y0 + (y1 - y0) * s
        ax.fill_between(0.1 + 0.8 * t, lo, lo + h, color=cols[o % len(cols)], alpha=0.45, linewidth=0)
    for o in olds:
        ax.add_patch(plt.Rectangle((0.07, oy[o]), 0.03, osize[o] / total, color=cols[o % len(cols)]))
        ax.text(0.06, oy[o] + osize[o] / total / 2, f"{o}", ha="right", va="center", fontsize=9)
    for n in news:
        ax.add_patch(plt.Rectangle((0.9, ny[n]), 0.03, nsize[n] / total, color=cols[n % len(cols)]))
        label = f"{n}" + (f" (was {', '.join(str(a) for a, b in f.matched.items() if b == n)})" if n in f.matched.values() else " (new)")
        ax.text(0.94, ny[n] + nsize[n] / total / 2, label, ha="left", va="center", fontsize=9)
    ax.set_xlim(0, 1.15)
    ax.set_ylim(max(max(oy.values()) + osize[olds[-1]] / total, max(ny.values()) + nsize[news[-1]] / total) + gap, -gap)
    ax.axis("off")
    ax.set_title(f"users between run {f.previous_run} (left) and this run (right)", fontsize=10)
    return _png(fig)
