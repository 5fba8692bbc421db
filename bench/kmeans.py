"""MLlib KMeans vs scikit-learn on the same vectors, objective and wall time side by side.

Same data (n x d Gaussian blobs), same k, k-means++-family initialisation (MLlib k-means||,
scikit-learn k-means++ with one init), same iteration budget and tolerance. MLlib runs on a
cached DataFrame with one partition per core and solver="block".

Usage: python bench/kmeans.py [--n 200000] [--d 32] [--k 8] [--cores 2]. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--block-mb", type=float, default=64.0, help="MLlib maxBlockSizeInMB (1 = MLlib's default)")
    args = ap.parse_args()
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(n_samples=args.n, centers=args.k, n_features=args.d, cluster_std=2.0, random_state=0)
    X = X.astype(np.float64)

    t0 = time.perf_counter()
    sk = SkKMeans(n_clusters=args.k, init="k-means++", n_init=1, max_iter=args.iters, tol=1e-4, random_state=0).fit(X)
    sklearn_s = time.perf_counter() - t0
    sk_obj = float(sk.inertia_)

    from pyspark.ml.clustering import KMeans
    from pyspark.ml.linalg import Vectors

    from seqclust.config import SparkConfig
    from seqclust.spark import get_spark

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    spark = get_spark(SparkConfig(master=f"local[{args.cores}]", shuffle_partitions=args.cores, log_level="ERROR"))
    df = spark.createDataFrame([(Vectors.dense(x),) for x in X], ["features"]).repartition(args.cores).cache()
    df.count()
    km = KMeans(
        k=args.k, seed=0, initMode="k-means||", initSteps=2, maxIter=args.iters, tol=1e-4, solver="block", maxBlockSizeInMB=args.block_mb
    )
    km.fit(df.limit(1000))  # JIT and code paths warm, not timed
    t1 = time.perf_counter()
    model = km.fit(df)
    mllib_s = time.perf_counter() - t1
    ml_obj = float(model.summary.trainingCost)
    spark.stop()

    result = {
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "block_mb": args.block_mb,
        "mllib_s": round(mllib_s, 3),
        "sklearn_s": round(sklearn_s, 3),
        "ratio": round(mllib_s / sklearn_s, 2),
        "mllib_objective": ml_obj,
        "sklearn_objective": sk_obj,
        "objective_rel_diff": round((ml_obj - sk_obj) / sk_obj, 6),
    }
    print(
        f"MLlib KMeans {mllib_s:.2f}s (objective {ml_obj:.6g}) vs scikit-learn {sklearn_s:.2f}s (objective {sk_obj:.6g}): "
        f"time ratio {result['ratio']}, objective {100 * result['objective_rel_diff']:+.3f}%  (goal: ratio <= 3, objective within 0.5%)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
