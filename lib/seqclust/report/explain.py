"""What the report shows beyond numbers: the map of users, the segment x feature heatmap, typical
journeys and the flow of users between two runs' segments.

Each function reads a run's Delta tables and returns small driver-side data (a seeded sample
of at most ``report.map_users`` users, k x features lifts, a few n-grams and example sessions
per segment, k x k flows); the rendering is in ``seqclust.report.charts``. Nothing data-sized is
collected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from seqclust.core.sampling import hash_uniform, user_sample
from seqclust.segment.cluster import at_level, coarse

if TYPE_CHECKING:
    from seqclust.core.config import BaselineConfig, ClusterConfig, ReportConfig
    from seqclust.runtime.context import RunContext

log = logging.getLogger(__name__)


def short_id(value: str, n: int = 10) -> str:
    """A short pseudonymous handle for an id shown in the report (SHA-256 prefix): a reader can
    tell sessions apart, not look a user up."""
    return hashlib.sha256(value.encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------
# the map


@dataclass
class MapData:
    """A seeded sample of users in 2-D, coloured by segment, beside the bag of events."""

    xy: np.ndarray  # n x 2, PCA of the run's user vectors (fitted on the sample)
    cluster: np.ndarray  # n, the run's segment
    one_session: np.ndarray  # n, bool
    centroids: np.ndarray  # k x 2 (the run's centres, same projection)
    explained: tuple[float, float]  # variance share of the two components
    users_total: int
    ids: list[str] = field(default_factory=list)  # the sampled users, in the order of xy
    boe_xy: np.ndarray | None = None  # n_b x 2, PCA of the bag-of-events vectors
    boe_cluster: np.ndarray | None = None
    boe_one_session: np.ndarray | None = None
    tsne_xy: np.ndarray | None = None  # t-SNE of the first tsne_users of the sample
    tsne_note: str = ""
    notes: list[str] = field(default_factory=list)


def _pca2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """Mean, the top two principal axes (2 x d) and the projection of ``x``; variance shares."""
    mean = x.mean(axis=0)
    xc = x - mean
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    axes = vt[:2]
    if axes.shape[0] < 2:  # one-dimensional vectors: a flat second axis
        axes = np.vstack([axes, np.zeros((2 - axes.shape[0], x.shape[1]))])
    var = s**2
    tot = float(var.sum()) or 1.0
    shares = (float(var[0] / tot) if len(var) > 0 else 0.0, float(var[1] / tot) if len(var) > 1 else 0.0)
    return mean, axes, xc @ axes.T, shares


def map_data(
    spark: SparkSession,
    ctx: RunContext,
    cfg: ReportConfig,
    seed: int,
    baseline: BaselineConfig | None = None,
    cluster_cfg: ClusterConfig | None = None,
    level: str = "top",
) -> MapData | None:
    """The map's points: a seeded hash sample of at most ``cfg.map_users`` users with a vector
    and a segment (None when the run has none); ``level``: coloured by top-level segment or by
    leaf of the segment tree (centres: the sampled members' means). (Long on purpose: the
    sample, its projection, the bag of events of the same users at the same k and t-SNE share
    the one sample.)"""
    store, t = ctx.store, ctx.tables
    if not (store.exists(t.embeddings) and store.exists(t.clusters)):
        return None
    users = store.read(spark, t.embeddings, ctx.run_id).where(F.col("entity_type") == "user").select("entity_id", "embedding", "n_sessions")
    seg = at_level(store.read(spark, t.clusters, ctx.run_id), level).where(F.col("entity_type") == "user").select("entity_id", "cluster_id")
    both = users.join(seg, "entity_id")
    n = both.count()
    if n == 0:
        return None
    frac = min(1.0, 1.2 * cfg.map_users / n)  # a little over, then the first map_users by hash
    sample = (
        both.withColumn("_h", hash_uniform("entity_id", seed=seed))
        .where(F.col("_h") < frac)
        .orderBy("_h", "entity_id")
        .limit(cfg.map_users)
    )
    rows = sample.select("entity_id", "embedding", "n_sessions", "cluster_id").collect()  # <= map_users rows
    ids = [r["entity_id"] for r in rows]
    x = np.asarray([r["embedding"] for r in rows], dtype=np.float64)
    mean, axes, xy, shares = _pca2(x)
    labels = np.asarray([r["cluster_id"] for r in rows])
    if level == "top":
        cent_rows = store.read(spark, t.centroids, ctx.run_id).where(F.col("method") == "encoder").orderBy("cluster_id").collect()
        cents = np.asarray([r["centroid"] for r in cent_rows], dtype=np.float64)
        cxy = (cents - mean) @ axes.T if len(cents) and cents.shape[1] == x.shape[1] else np.zeros((0, 2))
    else:
        cxy = np.full((int(labels.max()) + 1 if len(labels) else 0, 2), np.nan)
        for c in set(labels.tolist()):
            cxy[int(c)] = xy[labels == c].mean(axis=0)
    out = MapData(
        xy=xy,
        cluster=labels,
        one_session=np.asarray([(r["n_sessions"] or 0) <= 1 for r in rows]),
        centroids=cxy,
        explained=shares,
        users_total=n,
        ids=ids,
    )
    k = len(set(out.cluster.tolist()))
    # the bag of events of the same users, clustered at the same k (the report's own fit)
    if baseline is not None and baseline.bag_of_events and cluster_cfg is not None and k >= 2 and store.exists(t.sessions):
        try:
            out.boe_xy, out.boe_cluster, ent = _boe_map(spark, ctx, ids, k, seed, baseline, cluster_cfg)
            one = dict(zip(ids, out.one_session.tolist()))
            out.boe_one_session = np.asarray([one[e] for e in ent])
        except Exception as e:  # a baseline that cannot be built is skipped, saying why
            out.notes.append(f"bag of events not drawn: {str(e).splitlines()[0][:200]}")
            log.warning("report: bag-of-events map skipped: %s", str(e).splitlines()[0][:200])
    # t-SNE on the first tsne_users of the sample, when scikit-learn is there
    m = min(cfg.tsne_users, len(x))
    if m >= 10:
        try:
            from sklearn.manifold import TSNE

            perplexity = float(min(30.0, (m - 1) / 3))
            out.tsne_xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x[:m])
            out.tsne_note = f"t-SNE of {m:,} of the sampled users (perplexity {perplexity:.0f})"
        except ImportError:
            out.tsne_note = "t-SNE not drawn: scikit-learn is not installed"
    return out


def _boe_map(
    spark: SparkSession, ctx: RunContext, ids: list[str], k: int, seed: int, baseline: BaselineConfig, cluster_cfg: ClusterConfig
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The sampled users' bag-of-events vectors clustered at ``k`` and projected on their first
    two principal components (MLlib PCA): points, segments and the users in that order."""
    from pyspark.ml.feature import PCA

    from seqclust.evaluate.baseline import boe_clusters

    keep = spark.createDataFrame([(i,) for i in ids], "user_id string")
    sessions = ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).where("is_modelled").join(F.broadcast(keep), "user_id")
    # one k-means start: a picture for comparison, not the evaluated baseline
    boe = boe_clusters(sessions, k, len(ids), seed, baseline, dataclasses.replace(cluster_cfg, n_init=1), vectors=True)
    try:
        pca = PCA(k=2, inputCol="features", outputCol="p2").fit(boe)
        from pyspark.ml.functions import vector_to_array

        rows = pca.transform(boe).select("entity_id", "cluster_id", vector_to_array(F.col("p2")).alias("p")).collect()
    finally:
        boe.unpersist()
    xy = np.asarray([r["p"] for r in rows], dtype=np.float64).reshape(-1, 2)
    return xy, np.asarray([r["cluster_id"] for r in rows]), [r["entity_id"] for r in rows]


# ---------------------------------------------------------------------------------------
# the heatmap


@dataclass
class Heatmap:
    """Segments x behaviour features: each cell the segment's value over everyone's."""

    segments: list[int] | list[str]  # cluster ids or segment paths
    features: list[str]
    lift: np.ndarray  # len(segments) x len(features); nan where the source lacks the field


def heatmap(profiles: list[dict[str, Any]], by_path: bool = False) -> Heatmap | None:
    """From the run's ``cluster_profiles`` rows. Event-type shares, the price index and category
    lifts are already relative to everyone; the other columns are divided by their users'
    average over the given segments (weighted by segment size: the children of one split are
    read against each other). Columns a source lacks (no price, no purchases) are left out, not
    drawn as 1. Rows are labelled by cluster id, or with ``by_path`` by segment path."""
    if not profiles:
        return None
    sizes = np.asarray([float(p["size"]) for p in profiles])
    w = sizes / (sizes.sum() or 1.0)
    cols: dict[str, list[float]] = {}
    types = sorted({t for p in profiles for t in (p.get("event_mix_lift") or {})})
    for t in types:
        cols[f"{t} share"] = [float((p.get("event_mix_lift") or {}).get(t, math.nan)) for p in profiles]

    def rel(key: str) -> list[float] | None:
        v = np.asarray([math.nan if p.get(key) is None else float(p[key]) for p in profiles])
        ok = ~np.isnan(v)
        if not ok.any():
            return None
        ref = float(np.sum(v[ok] * w[ok]) / (np.sum(w[ok]) or 1.0))
        return None if ref <= 0 else list(v / ref)

    for key, label in (
        ("conversion_rate", "conversion"),
        ("sessions_per_user", "sessions per user"),
        ("median_session_events", "session length"),
        ("median_session_duration_s", "session duration"),
        ("median_gap_s", "time between events"),
    ):
        r = rel(key)
        if r is not None:
            cols[label] = r
    if any(p.get("price_index") is not None for p in profiles):
        cols["price level"] = [math.nan if p.get("price_index") is None else float(p["price_index"]) for p in profiles]
    if any(p.get("top_categories") for p in profiles):
        cols["top category lift"] = [max((float(c["lift"]) for c in (p.get("top_categories") or [])), default=math.nan) for p in profiles]
    feats = list(cols)
    lift = np.asarray([[cols[f][i] for f in feats] for i in range(len(profiles))], dtype=np.float64)
    labels: list[int] | list[str] = (
        [str(p.get("segment_path") or p["cluster_id"]) for p in profiles] if by_path else [int(p["cluster_id"]) for p in profiles]
    )
    return Heatmap(labels, feats, lift)


# ---------------------------------------------------------------------------------------
# typical journeys


def ngrams(col: str, n: int) -> F.Column:
    """The event-type n-grams of an array column, joined with ' > ' (an empty array when it is
    shorter than n)."""
    return F.expr(
        f"IF(size({col}) >= {n}, transform(sequence(0, size({col}) - {n}), i -> array_join(slice({col}, i + 1, {n}), ' > ')), array())"
    )


MIN_NGRAM_COUNT = 5  # an n-gram seen fewer times in a segment is not shown as typical of it


@dataclass
class Journeys:
    ngrams: dict[int, list[tuple[str, float, int]]]  # segment -> (n-gram, lift, occurrences)
    examples: dict[int, list[dict[str, Any]]]  # segment -> sessions (id handle, events, gaps)


def journeys(
    spark: SparkSession,
    ctx: RunContext,
    top: int = 5,
    examples: int = 3,
    neighbourhood: int = 50,
    seed: int = 42,
    min_count: int = MIN_NGRAM_COUNT,
    sample_users: int | None = None,
    level: str = "top",
) -> Journeys | None:
    """Per segment: the ``top`` event-type 2- and 3-grams most over-represented against everyone
    (lift = the n-gram's share of the segment's n-grams of that length over its share of
    everyone's; at least ``min_count`` occurrences in the segment), and ``examples`` sessions
    drawn at random (seeded) from the segment's ``neighbourhood`` users nearest its centre.
    The n-grams are counted over the sessions of a seeded hash sample of about ``sample_users``
    users (every user when there are fewer or it is None): at 100M events counting them over
    every session took most of the report's ten minutes; lifts of event-type n-grams need far
    fewer sessions. ``level``: the top level (``top``) or the segment tree's leaves (``leaf``)."""
    store, t = ctx.store, ctx.tables
    if not (store.exists(t.sessions) and store.exists(t.clusters)):
        return None
    seg = at_level(store.read(spark, t.clusters, ctx.run_id), level).where(F.col("entity_type") == "user")
    sessions = store.read(spark, t.sessions, ctx.run_id).where("is_modelled")
    s = sessions.select("user_id", "event_types").join(seg.select(F.col("entity_id").alias("user_id"), "cluster_id"), "user_id")
    if sample_users is not None:
        s = user_sample(seg.count(), sample_users, seed)(s, "user_id")
    grams = None
    for n in (2, 3):
        g = s.select("cluster_id", F.lit(n).alias("n"), F.explode(ngrams("event_types", n)).alias("g"))
        grams = g if grams is None else grams.unionByName(g)
    assert grams is not None
    counts = grams.groupBy("cluster_id", "n", "g").count().collect()  # k x (distinct n-grams) rows
    seg_tot: dict[tuple[int, int], int] = {}
    all_cnt: dict[tuple[int, str], int] = {}
    all_tot: dict[int, int] = {}
    for r in counts:
        seg_tot[(r["cluster_id"], r["n"])] = seg_tot.get((r["cluster_id"], r["n"]), 0) + r["count"]
        all_cnt[(r["n"], r["g"])] = all_cnt.get((r["n"], r["g"]), 0) + r["count"]
        all_tot[r["n"]] = all_tot.get(r["n"], 0) + r["count"]
    found: dict[int, list[tuple[str, float, int]]] = {}
    for r in counts:
        if r["count"] < min_count:
            continue
        lift = (r["count"] / seg_tot[(r["cluster_id"], r["n"])]) / (all_cnt[(r["n"], r["g"])] / all_tot[r["n"]])
        found.setdefault(int(r["cluster_id"]), []).append((r["g"], float(lift), int(r["count"])))
    top_grams = {c: sorted(v, key=lambda x: (-x[1], -x[2], x[0]))[:top] for c, v in found.items()}
    near = (
        seg.withColumn("_r", F.row_number().over(Window.partitionBy("cluster_id").orderBy("distance_to_centroid", "entity_id")))
        .where(F.col("_r") <= neighbourhood)
        .select(F.col("entity_id").alias("user_id"), "cluster_id")
    )
    picks = (
        sessions.select("session_id", "user_id", "event_types", "gaps_s", "duration_s")
        .join(near, "user_id")
        .withColumn("_h", hash_uniform("session_id", seed=seed))
        .withColumn("_r", F.row_number().over(Window.partitionBy("cluster_id").orderBy("_h", "session_id")))
        .where(F.col("_r") <= examples)
        .collect()  # k x examples rows
    )
    ex: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(picks, key=lambda r: (r["cluster_id"], r["_r"])):
        ex.setdefault(int(r["cluster_id"]), []).append(
            {
                "session": short_id(r["session_id"]),
                "events": list(r["event_types"]),
                "gaps_s": list(r["gaps_s"]),
                "duration_s": r["duration_s"],
            }
        )
    return Journeys(top_grams, ex)


# ---------------------------------------------------------------------------------------
# across runs


@dataclass
class Flows:
    previous_run: str
    pairs: dict[tuple[int, int], int]  # (previous segment, this run's segment) -> users in both runs
    matched: dict[int, int]
    changes: list[dict[str, Any]]  # matched segments' profile changes


def flows(spark: SparkSession, ctx: RunContext, previous_run: str, matched: dict[int, int]) -> Flows | None:
    """Users of both runs, counted by (previous segment, this segment); for the matched segments
    the change of size share, conversion, session length and most lifted event type."""
    store, t = ctx.store, ctx.tables

    def segments(run_id: str, name: str) -> DataFrame:
        users = coarse(store.read(spark, t.clusters, run_id)).where(F.col("entity_type") == "user")
        return users.select("entity_id", F.col("cluster_id").alias(name))

    old, new = segments(previous_run, "o"), segments(ctx.run_id, "n")
    pairs = {(int(r["o"]), int(r["n"])): int(r["count"]) for r in old.join(new, "entity_id").groupBy("o", "n").count().collect()}
    if not pairs:
        return None
    changes: list[dict[str, Any]] = []
    if store.exists(t.cluster_profiles):
        prof = coarse(store.read(spark, t.cluster_profiles)).where(F.col("run_id").isin(previous_run, ctx.run_id)).collect()  # 2k rows
        by = {(r["run_id"], r["cluster_id"]): r.asDict() for r in prof}
        for o, nn in sorted(matched.items()):
            a, b = by.get((previous_run, o)), by.get((ctx.run_id, nn))
            if not a or not b:
                continue
            mix_a, mix_b = a.get("event_mix") or {}, b.get("event_mix") or {}
            moved = max(((abs(mix_b.get(x, 0.0) - mix_a.get(x, 0.0)), x) for x in set(mix_a) | set(mix_b)), default=(0.0, ""))
            changes.append(
                {
                    "previous": o,
                    "now": nn,
                    "share": (a["share"], b["share"]),
                    "conversion_rate": (a["conversion_rate"], b["conversion_rate"]),
                    "median_session_events": (a["median_session_events"], b["median_session_events"]),
                    "largest_mix_change": (moved[1], mix_a.get(moved[1], 0.0), mix_b.get(moved[1], 0.0)),
                }
            )
    return Flows(previous_run, pairs, matched, changes)
