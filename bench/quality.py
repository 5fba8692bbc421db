"""Segment quality on the persona benchmark family: data we did not tune on.

For every generator of ``seqclust.datasets.personas.family`` (interests, dynamics, pace_price, mixture,
real_sessions when the RetailRocket subset is in ../shared/data, and today's generator), this
writes a log of ``--users`` users, runs the whole pipeline on it with the default
configuration (``conf/local.yaml`` + ``--set`` overrides) and the planted personas as labels,
then measures, side by side on the same users:

  - ``default``: the run's own segments (its user vectors, its k rule, its MLlib fit);
  - ``encoder``: the encoder's pooled session vectors alone;
  - ``tokens``: the behaviour tokens alone (the multi-field bag-of-tokens baseline:
    TF-IDF of event-type n-grams, type x price band x pace bucket n-grams, interest, session
    shape and time, SVD);
  - ``bag_of_events``: TF-IDF of the run's event_type:category tokens (today's baseline);
  - ``random``: random segments of the default's sizes.

For each, with the pipeline's procedure (users with cluster.fit_min_sessions sessions, the top
cluster.sweep_pca_dim principal components, k-means++ best of cluster.sweep_n_init starts,
centres lifted back to the vectors, every user assigned): the k its own sweep chooses (same
rule as the pipeline), ARI at the pipeline's chosen k and ARI at the planted k, and
for the default whether the run called its k uncertain.

Beside them, ``supervised_ceiling``: the best ARI a classifier that knows the personas reaches
from any of these vectors (5-fold cross-validated logistic regression); unsupervised segments
are not expected above it. And ``bayes_ceiling`` where the generator's likelihood has a closed
form (``dynamics``, ``real_sessions``): the ARI of the Bayes-optimal classifier that knows the
generator itself (``personas.bayes_labels``), the most any method can expect to read from the
log, whatever its representation.

Usage: python bench/quality.py [--users 3000] [--seed 7] [--out DIR] [--only a,b] [--set key=value ...]
Last line: JSON {"min_ari", "mean_ari", "k_within_1", "min_leaf_ari", "leaves_within_1",
"generators", "per_generator": {...}} (min/mean over generators of the default's ARI at its
chosen k; k_within_1 = generators whose chosen k is within 1 of the planted k; the segment
tree: min_leaf_ari = the lowest ARI of the tree's leaves against the personas,
leaves_within_1 = generators whose number of leaves is within 1 of the planted personas; per
generator also planted_top, top_ari_groups (the top level against the planted groups of a
nested generator), planted_leaves, leaves and leaf_ari; confident_share and ari_confident:
the share of users at least cluster.min_confidence sure of their top segment, and the top
level's ARI among them alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
DATA_ROOT = REPO.parent / "shared" / "data"

log = logging.getLogger("bench.quality")


def _vectors(df, col: str = "embedding", id_col: str = "entity_id") -> tuple[np.ndarray, np.ndarray]:
    from seqclust.core.compat import to_arrow

    t = to_arrow(df.select(id_col, col))
    ids = np.asarray(t.column(id_col).to_pylist(), dtype=object)
    import pyarrow.compute as pc

    X = pc.list_flatten(t.column(col)).to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(ids), -1)
    order = np.argsort(ids.astype(str), kind="stable")
    return ids[order], X[order]


def _segments(X: np.ndarray, P: np.ndarray, rich: np.ndarray, k: int, seed: int, ccfg) -> np.ndarray:
    """The pipeline's segments in numpy: k-means++ on the fit users' projected vectors, centres
    lifted back to ``X`` (each segment's mean vector), every row to the nearest."""
    from seqclust.segment.scores import local_kmeans

    fit = local_kmeans(P[rich], k, seed, ccfg.sweep_n_init, ccfg.max_iter)
    lifted = np.array([X[rich][fit.labels_ == c].mean(axis=0) for c in range(k) if (fit.labels_ == c).any()])
    return ((X[:, None, :] - lifted[None]) ** 2).sum(axis=2).argmin(axis=1)


def measure(
    spark,
    cfg,
    ctx,
    art,
    labels: dict[str, str],
    planted_k: int,
    chosen_k: int,
    seed: int,
    dump: Path | None = None,
    groups: dict[str, str] | None = None,
) -> dict:
    """Every representation's k and ARI on the run's users (driver-side; bench sizes only)."""
    from pyspark.sql import functions as F
    from sklearn.metrics import adjusted_rand_score

    from seqclust.evaluate.baseline import bag_of_events
    from seqclust.represent import behaviour
    from seqclust.represent.embed import pool_users
    from seqclust.segment.cluster import Projection, choose_k, sweep_curves

    store, tables = ctx.store, ctx.tables
    emb = store.read(spark, tables.embeddings, ctx.run_id)
    sessions = store.read(spark, tables.sessions, ctx.run_id).where("is_modelled")
    reps = {}
    reps["default"] = _vectors(emb.where(F.col("entity_type") == "user"))
    sess = emb.where(F.col("entity_type") == "session").select("user_id", "end_ts", "embedding")
    reps["encoder"] = _vectors(pool_users(sess, "mean", dim=int(art.model_cfg["embedding_dim"])))
    if art.token_model is not None:
        tm = art.token_model
        reps["tokens"] = _vectors(
            behaviour.user_vectors(behaviour.token_counts(sessions, art.vocab, tm.interest), tm), "tokens_vec", "user_id"
        )
    reps["bag_of_events"] = _vectors(bag_of_events(sessions, cfg.baseline.vocab_size, cfg.baseline.min_df), "emb")
    if dump is not None:  # the vectors, for studying representations and k rules offline
        np.savez_compressed(
            dump,
            **{f"{n}_ids": i.astype(str) for n, (i, _) in reps.items()},
            **{f"{n}_X": x for n, (_, x) in reps.items()},
            labels_ids=np.array(list(labels), dtype=str),
            labels=np.array(list(labels.values()), dtype=str),
        )
    from seqclust.segment.cluster import coarse

    stored_clusters = store.read(spark, tables.clusters, ctx.run_id)
    conf_col = F.col("confidence") if "confidence" in stored_clusters.columns else F.lit(None).cast("double").alias("confidence")
    clusters = coarse(stored_clusters).select("entity_id", "cluster_id", conf_col).toPandas().set_index("entity_id")
    leaf = stored_clusters.where(F.col("granularity") == "leaf").select("entity_id", "cluster_id").toPandas().set_index("entity_id")
    n_sess = {
        r["entity_id"]: r["n_sessions"] or 0 for r in emb.where(F.col("entity_type") == "user").select("entity_id", "n_sessions").collect()
    }
    out = {}
    base_ids = reps["default"][0]
    ks = list(range(cfg.cluster.k_min, cfg.cluster.k_max + 1))
    for name, (ids, X) in reps.items():
        keep = np.isin(ids, base_ids)
        ids, X = ids[keep], X[keep]
        y = np.array([labels.get(i, "?") for i in ids])
        # every representation gets the pipeline's procedure: fit users, principal components,
        # sweep and rule, centres lifted back and every user assigned (cluster.sweep_and_fit)
        rich = np.array([n_sess.get(i, 0) >= cfg.cluster.fit_min_sessions for i in ids])
        if rich.sum() < 20 * max(ks):
            rich[:] = True
        proj = Projection.fit(X[rich], cfg.cluster.sweep_pca_dim, seed)
        P = proj.np(X)
        sweep = sweep_curves(P[rich], ks, seed, cfg.cluster)
        k_own, _ = choose_k(sweep, cfg.cluster.selection, cfg.cluster.silhouette_tolerance)[:2]

        res = {"k_own": int(k_own)}
        if name == "default":
            pred = clusters.loc[ids, "cluster_id"].to_numpy()
            res["ari"] = float(adjusted_rand_score(y, pred))
            # the segment tree: its leaves against the personas, its top level against the planted groups
            leaves = leaf.loc[ids, "cluster_id"].to_numpy() if len(leaf) else pred
            res["leaf_ari"] = float(adjusted_rand_score(y, leaves))
            res["leaves"] = int(len(np.unique(leaves)))
            g = np.array([(groups or labels).get(i, "?") for i in ids])
            res["top_ari_groups"] = float(adjusted_rand_score(g, pred))
            # confident members (clusters.confidence >= cluster.min_confidence): their share and
            # their top level's ARI, against everyone's (does the confidence mean anything?)
            conf = clusters.loc[ids, "confidence"].to_numpy(dtype=float)
            sure = conf >= cfg.cluster.min_confidence
            res["confident_share"] = float(np.mean(sure)) if np.isfinite(conf).all() else None
            res["ari_confident"] = float(adjusted_rand_score(y[sure], pred[sure])) if sure.sum() >= 20 else None
        else:
            res["ari"] = float(adjusted_rand_score(y, _segments(X, P, rich, chosen_k, seed, cfg.cluster)))
        res["ari_planted_k"] = float(adjusted_rand_score(y, _segments(X, P, rich, planted_k, seed, cfg.cluster)))
        res["sweep"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in sweep]
        out[name] = res
    # the ceiling: what a classifier that knows the personas reads from the same vectors
    # (5-fold cross-validated logistic regression, ARI of its held-out predictions). An
    # unsupervised method cannot be expected above it; where it is below a goal, the
    # generator's noise (e.g. one-session users) makes the goal unreachable on these vectors.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    for name, (ids, X) in reps.items():
        keep = np.isin(ids, base_ids)
        y = np.array([labels.get(i, "?") for i in ids[keep]])
        if len(set(y)) > 1 and min(np.unique(y, return_counts=True)[1]) >= 5:
            pred = cross_val_predict(LogisticRegression(C=10, max_iter=3000), X[keep], y, cv=5)
            out[name]["supervised_ari"] = float(adjusted_rand_score(y, pred))
    # random segments of the default's sizes
    rng = np.random.default_rng(seed)
    ids = reps["default"][0]
    y = np.array([labels.get(i, "?") for i in ids])
    pred = clusters.loc[ids, "cluster_id"].to_numpy()
    out["random"] = {
        "ari": float(adjusted_rand_score(y, rng.permutation(pred))),
        "ari_planted_k": float(adjusted_rand_score(y, rng.integers(0, planted_k, len(y)))),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(REPO / "out" / "bench_quality"))
    ap.add_argument("--only", default="", help="comma-separated generator names")
    ap.add_argument("--data-root", default=str(DATA_ROOT))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import pyarrow.parquet as pq

    from seqclust.app import pipeline
    from seqclust.core.config import load_config
    from seqclust.datasets import personas
    from seqclust.runtime.spark import get_spark

    only = [s for s in args.only.split(",") if s]
    members = [m for m in personas.family(args.data_root) if not only or m.name in only]
    out = Path(args.out)
    cfg = load_config(str(REPO / "conf" / "local.yaml"), overrides=[f"run.output={out / 'tables'}", *args.set])
    spark = get_spark(cfg.spark)
    results, skipped = {}, {}
    for m in members:
        if m.needs_data and not (Path(args.data_root) / m.needs_data).is_dir():
            skipped[m.name] = f"needs {Path(args.data_root) / m.needs_data}"
            log.warning("skipping %s: %s", m.name, skipped[m.name])
            continue
        t0 = time.perf_counter()
        data = out / "data" / m.name
        personas.write_member(data, m.name, args.users, args.seed, args.data_root)
        labels_t = pq.read_table(data / "personas")
        labels = dict(zip(labels_t.column("user_id").to_pylist(), labels_t.column("persona").to_pylist()))
        groups = (
            dict(zip(labels_t.column("user_id").to_pylist(), labels_t.column("group").to_pylist()))
            if "group" in labels_t.column_names
            else None
        )
        bayes = personas.bayes_labels(m.name, pq.read_table(data / "events"), m.planted_k)
        bayes_ari = float("nan")
        if bayes is not None:
            from sklearn.metrics import adjusted_rand_score

            users = sorted(bayes)
            bayes_ari = float(adjusted_rand_score([labels[u] for u in users], [bayes[u] for u in users]))
            log.info("%s: the Bayes-optimal classifier reads ARI %.3f from the log", m.name, bayes_ari)
        ctx = pipeline.make_context(cfg, str(data / "events"), str(data / "personas"), f"quality-{m.name}")
        summary = pipeline.run(spark, cfg, ctx)
        from seqclust.represent.encoder import load_artifact

        art = load_artifact(summary.record.encoder_path)
        k = int(summary.record.k)
        meas = measure(spark, cfg, ctx, art, labels, m.planted_k, k, cfg.run.seed, dump=out / f"{m.name}_vectors.npz", groups=groups)
        choice = summary.k_choice or {}
        results[m.name] = {
            "planted_k": m.planted_k,
            "planted_top": m.planted_groups,
            "k_chosen": k,
            "leaves": meas["default"]["leaves"],
            "leaf_ari": meas["default"]["leaf_ari"],
            "top_ari_groups": meas["default"]["top_ari_groups"],
            "confident_share": meas["default"].get("confident_share"),
            "ari_confident": meas["default"].get("ari_confident"),
            "k_uncertain": bool(choice.get("uncertain", False)),
            "k_runner_up": choice.get("runner_up"),
            "ari": meas["default"]["ari"],
            "ari_planted_k": meas["default"]["ari_planted_k"],
            "supervised_ceiling": max((mm.get("supervised_ari", float("nan")) for mm in meas.values()), default=float("nan")),
            "bayes_ceiling": bayes_ari,
            "methods": meas,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        log.info(
            "%s: planted k=%d, chosen k=%d, ARI %.3f (at planted k %.3f); tree: %d leaves, leaf ARI %.3f; top level vs %d planted groups ARI %.3f",
            m.name,
            m.planted_k,
            k,
            meas["default"]["ari"],
            meas["default"]["ari_planted_k"],
            meas["default"]["leaves"],
            meas["default"]["leaf_ari"],
            m.planted_groups,
            meas["default"]["top_ari_groups"],
        )
    names = ("default", "encoder", "tokens", "bag_of_events", "random")
    print(
        f"\n{'generator':<14} {'k planted':>9} {'k chosen':>8} {'ceiling':>8} {'bayes':>6}  "
        + "  ".join(f"{n + ' ARI (@planted)':>26}" for n in names)
    )
    for g, r in results.items():
        cells = []
        for n in names:
            mm = r["methods"].get(n)
            cells.append(f"{'-':>26}" if mm is None else f"{mm['ari']:>8.3f} ({mm['ari_planted_k']:.3f}) k_own={mm.get('k_own', '-')!s:>3}")
        flag = "?" if r["k_uncertain"] else " "
        bayes = "-" if np.isnan(r["bayes_ceiling"]) else f"{r['bayes_ceiling']:.3f}"
        print(f"{g:<14} {r['planted_k']:>9} {r['k_chosen']:>7}{flag} {r['supervised_ceiling']:>8.3f} {bayes:>6}  " + "  ".join(cells))
    print(
        f"\n{'generator':<16} {'top planted':>11} {'top chosen':>10} {'top ARI vs groups':>17} {'leaves planted':>14} {'leaves':>6} {'leaf ARI':>8}"
        f" {'confident':>9} {'ARI confident':>13}"
    )

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for g, r in results.items():
        print(
            f"{g:<16} {r['planted_top']:>11} {r['k_chosen']:>10} {r['top_ari_groups']:>17.3f} {r['planted_k']:>14} {r['leaves']:>6} {r['leaf_ari']:>8.3f}"
            f" {num(r['confident_share'], '.1%'):>9} {num(r['ari_confident'], '.3f'):>13}"
        )
    for g, why in skipped.items():
        print(f"{g:<14} skipped: {why}")
    aris = [r["ari"] for r in results.values()]
    summary = {
        "min_ari": round(min(aris), 4) if aris else None,
        "mean_ari": round(float(np.mean(aris)), 4) if aris else None,
        "k_within_1": sum(abs(r["k_chosen"] - r["planted_k"]) <= 1 for r in results.values()),
        "min_leaf_ari": round(min(r["leaf_ari"] for r in results.values()), 4) if results else None,
        "leaves_within_1": sum(abs(r["leaves"] - r["planted_k"]) <= 1 for r in results.values()),
        "generators": len(results),
        "skipped": skipped,
        "per_generator": {
            g: {
                "planted_k": r["planted_k"],
                "k_chosen": r["k_chosen"],
                "k_uncertain": r["k_uncertain"],
                "planted_top": r["planted_top"],
                "top_ari_groups": round(r["top_ari_groups"], 4),
                "planted_leaves": r["planted_k"],
                "leaves": r["leaves"],
                "leaf_ari": round(r["leaf_ari"], 4),
                "confident_share": None if r["confident_share"] is None else round(r["confident_share"], 4),
                "ari_confident": None if r["ari_confident"] is None else round(r["ari_confident"], 4),
                "ari": round(r["ari"], 4),
                "ari_planted_k": round(r["ari_planted_k"], 4),
                "supervised_ceiling": round(r["supervised_ceiling"], 4),
                "bayes_ceiling": None if np.isnan(r["bayes_ceiling"]) else round(r["bayes_ceiling"], 4),
                "baselines": {
                    n: {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in mm.items() if kk != "sweep"}
                    for n, mm in r["methods"].items()
                    if n != "default"
                },
            }
            for g, r in results.items()
        },
    }
    (out / "quality.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
