"""Cluster profiles: what the users of each segment do, against everyone, in Spark aggregates.

Only per-cluster figures (k rows, and k x top_n categories) reach the driver.
"""

from __future__ import annotations

from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from seqclust.core.tables import CLUSTER_PROFILES

EVENT_TYPES = ("view", "search", "cart", "fav", "purchase", "other")


def _describe(p: dict[str, Any], overall_conv: float) -> str:
    mix = p["event_mix_lift"]
    lifted = sorted(((v, t) for t, v in mix.items() if p["event_mix"].get(t, 0) >= 0.01), reverse=True)
    parts = [f"{100 * p['share']:.0f}% of users"]
    if lifted:
        v, t = lifted[0]
        parts.append(f"{t} events {v:.1f}x the average share")
    if overall_conv > 0:
        parts.append(f"conversion {100 * p['conversion_rate']:.0f}% ({p['conversion_rate'] / overall_conv:.1f}x)")
    parts.append(f"median session: {p['median_session_events']:.0f} events over {p['median_session_duration_s'] / 60:.1f} min")
    if p["median_gap_s"] is not None:
        parts.append(f"{p['median_gap_s']:.0f}s between events")
    if p["price_index"] is not None:
        parts.append(f"price level {p['price_index']:.2f}x overall")
    if p["top_categories"]:
        c = max(p["top_categories"], key=lambda x: x["lift"])
        parts.append(f"most lifted category {c['category']} ({c['lift']:.1f}x)")
    return "; ".join(parts)


def cluster_profiles(
    spark: SparkSession,
    sessions: DataFrame,
    clusters: DataFrame,
    top_n: int = 5,
    sizes: dict[int, int] | None = None,
    granularity: str = "coarse",
    paths: dict[int, str] | None = None,
) -> DataFrame:
    """One row per cluster (CLUSTER_PROFILES) from ``sessions`` and ``clusters`` (entity_id, cluster_id).

    ``sizes`` (cluster -> users), when given, are the exact segment sizes and shares, for
    profiles measured on a sample of each segment's users; every other figure is a ratio or
    a median of what ``sessions`` holds. ``granularity`` and ``paths`` (cluster -> segment path;
    default: the cluster id) label the rows' level of the segment tree. Five aggregations of the sessions joined to their
    users' segments (the join cached once); only per-cluster figures reach the driver.
    """
    cols = ("user_id", "n_events", "duration_s", "event_counts", "categories", "prices", "gaps_s")
    s = (
        sessions.select(*cols)
        .join(clusters.select(F.col("entity_id").alias("user_id"), "cluster_id"), "user_id")
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        return _profiles(spark, s, top_n, sizes, granularity, paths or {})
    finally:
        s.unpersist()


def _profiles(
    spark: SparkSession, s: DataFrame, top_n: int, sizes: dict[int, int] | None, granularity: str, paths: dict[int, str]
) -> DataFrame:
    """One row per cluster from per-cluster aggregates (a handful of small Spark jobs, k rows
    each). Long on purpose: the aggregates and the lifts computed from them are one table."""
    per_cluster = (
        s.groupBy("cluster_id")
        .agg(
            F.countDistinct("user_id").alias("size"),
            F.count("*").alias("n_sessions"),
            F.percentile_approx("n_events", 0.5).cast("double").alias("med_events"),
            F.percentile_approx("duration_s", 0.5).cast("double").alias("med_duration"),
        )
        .collect()
    )
    users = s.groupBy("cluster_id", "user_id").agg(F.max(F.coalesce(F.col("event_counts")["purchase"], F.lit(0))).alias("p"))
    conv_n = {
        r["cluster_id"]: (r["c"], r["n"])
        for r in users.groupBy("cluster_id").agg(F.avg((F.col("p") > 0).cast("double")).alias("c"), F.count("*").alias("n")).collect()
    }
    conv = {c: v for c, (v, _) in conv_n.items()}
    overall_conv = sum(v * n for v, n in conv_n.values()) / max(1, sum(n for _, n in conv_n.values()))
    mix_rows = (
        s.select("cluster_id", F.explode("event_counts").alias("t", "n")).groupBy("cluster_id", "t").agg(F.sum("n").alias("n")).collect()
    )
    events = s.select("cluster_id", F.explode(F.arrays_zip("categories", "prices", "gaps_s")).alias("e"))
    # per cluster and (the rollup's null cluster) over everyone, in one pass
    stats = events.rollup("cluster_id").agg(
        F.grouping_id().alias("_all"),
        F.percentile_approx(F.when(F.col("e.prices") > 0, F.col("e.prices")), 0.5).alias("med_price"),
        F.percentile_approx(F.when(F.col("e.gaps_s") > 0, F.col("e.gaps_s")), 0.5).alias("med_gap"),
    )
    med, overall_price = {}, None
    for r in stats.collect():
        if r["_all"]:
            overall_price = r["med_price"]
        else:
            med[r["cluster_id"]] = (r["med_price"], r["med_gap"])
    # (cluster, category) counts: k x categories rows; shares, lifts and the top n on the driver
    cat_counts: dict[int, dict[str, int]] = {}
    for r in events.groupBy("cluster_id", F.col("e.categories").alias("category")).count().collect():
        cat_counts.setdefault(r["cluster_id"], {})[r["category"]] = r["count"]
    overall_cats: dict[str, int] = {}
    for cc in cat_counts.values():
        for cat, v in cc.items():
            overall_cats[cat] = overall_cats.get(cat, 0) + v
    grand = sum(overall_cats.values()) or 1
    n_sample = sum(r["size"] for r in per_cluster) or 1
    n_users = sum(sizes.values()) if sizes else n_sample
    mix: dict[int, dict[str, float]] = {}
    for r in mix_rows:
        mix.setdefault(r["cluster_id"], {})[r["t"]] = float(r["n"])
    all_mix: dict[str, float] = {}
    for m in mix.values():
        for t, share in m.items():
            all_mix[t] = all_mix.get(t, 0.0) + share
    all_total = sum(all_mix.values()) or 1.0
    rows = []
    for r in sorted(per_cluster, key=lambda x: x["cluster_id"]):
        c = r["cluster_id"]
        m = mix.get(c, {})
        tot = sum(m.values()) or 1.0
        shares = {t: m.get(t, 0.0) / tot for t in sorted(all_mix)}
        lifts = {t: (shares[t] / (all_mix[t] / all_total)) if all_mix[t] else 0.0 for t in shares}
        price, gap = med.get(c, (None, None))
        cc = cat_counts.get(c, {})
        c_tot = sum(cc.values()) or 1
        top = sorted(((cat, v) for cat, v in cc.items() if cat is not None), key=lambda x: (-x[1], x[0]))[:top_n]
        size = int(sizes.get(c, 0)) if sizes else int(r["size"])
        p = {
            "cluster_id": int(c),
            "granularity": granularity,
            "segment_path": paths.get(int(c), str(int(c))),
            "size": size,
            "share": size / n_users,
            "sessions_per_user": r["n_sessions"] / max(r["size"], 1),
            "event_mix": shares,
            "event_mix_lift": lifts,
            "conversion_rate": float(conv.get(c, 0.0)),
            "median_session_events": r["med_events"],
            "median_session_duration_s": r["med_duration"],
            "median_gap_s": float(gap) if gap is not None else None,
            "median_price": float(price) if price is not None else None,
            "price_index": float(price) / overall_price if price is not None and overall_price else None,
            "top_categories": [{"category": cat, "share": v / c_tot, "lift": (v / c_tot) / (overall_cats[cat] / grand)} for cat, v in top],
        }
        p["description"] = _describe(p, overall_conv)
        rows.append(p)
    return spark.createDataFrame([tuple(p[f.name] for f in CLUSTER_PROFILES.fields) for p in rows], CLUSTER_PROFILES)
