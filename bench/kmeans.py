"""MLlib KMeans vs scikit-learn on the same vectors, objective and wall time side by side.

Same data (n x d Gaussian blobs), same k, k-means++-family initialisation (MLlib k-means||,
scikit-learn k-means++ with one init), same iteration budget and tolerance. MLlib runs on a
cached DataFrame with one partition per core and solver="block".

Timing: each library fits once untimed (JIT, thread pools and code paths warm, as in any
pipeline that fits more than once: the k sweep fits dozens of models), then ``--repeats``
timed fits; the ratio is of the medians. The first MLlib fit of the process is reported too
(``mllib_cold_s``), so the cost of a cold JVM is not hidden.

The levers are flags: ``--partitions`` (input partitions; they also change k-means||'s seeded
sampling), ``--cache dataframe|none`` (fit a cached DataFrame, or an uncached one that MLlib
persists itself), ``--solver``, ``--block-mb``, ``--init-mode``, ``--init-steps``.

Usage: python bench/kmeans.py [--n 200000] [--d 32] [--k 8] [--cores 2] [--repeats 3] [levers]. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    ap.add_argument("--repeats", type=int, default=3, help="timed fits per library (median reported)")
    ap.add_argument("--init-steps", type=int, default=2, help="MLlib k-means|| rounds")
    ap.add_argument("--block-mb", type=float, default=64.0, help="MLlib maxBlockSizeInMB (1 = MLlib's default)")
    ap.add_argument("--solver", default="block", choices=["auto", "row", "block"])
    ap.add_argument("--init-mode", default="k-means||", choices=["k-means||", "random"])
    ap.add_argument("--partitions", type=int, default=0, help="input partitions (0: one per core)")
    ap.add_argument(
        "--cache",
        default="dataframe",
        choices=["dataframe", "none"],
        help="dataframe: fit a cached DataFrame; none: an uncached one (MLlib then persists its own copy of the vectors)",
    )
    args = ap.parse_args()
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(n_samples=args.n, centers=args.k, n_features=args.d, cluster_std=2.0, random_state=0)
    X = X.astype(np.float64)

    def sk_fit():
        return SkKMeans(n_clusters=args.k, init="k-means++", n_init=1, max_iter=args.iters, tol=1e-4, random_state=0).fit(X)

    sk_fit()
    sk_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sk = sk_fit()
        sk_times.append(time.perf_counter() - t0)
    sklearn_s = float(np.median(sk_times))
    sk_obj = float(sk.inertia_)

    from pyspark.ml.clustering import KMeans

    from seqclust.core.config import SparkConfig
    from seqclust.runtime.spark import get_spark

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    spark = get_spark(SparkConfig(master=f"local[{args.cores}]", shuffle_partitions=args.cores, driver_memory="6g", log_level="ERROR"))
    # the vectors reach Spark through a Parquet file (a Python list of a million rows would
    # take minutes to serialise); the cached DataFrame is what both libraries then fit
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.ml.functions import array_to_vector

    tmp = tempfile.mkdtemp(prefix="bench_kmeans_")
    pq.write_table(
        pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), args.d).cast(pa.list_(pa.float64()))}), f"{tmp}/x.parquet"
    )
    parts = args.partitions or args.cores
    df = spark.read.parquet(f"{tmp}/x.parquet").select(array_to_vector("x").alias("features")).repartition(parts)
    if args.cache == "dataframe":
        df = df.cache()
        df.count()
    else:  # materialise the shuffle once so each fit reads shuffle files, not the Parquet decode
        df.count()
    km = KMeans(
        k=args.k,
        seed=0,
        initMode=args.init_mode,
        initSteps=args.init_steps,
        maxIter=args.iters,
        tol=1e-4,
        solver=args.solver,
        maxBlockSizeInMB=args.block_mb,
    )
    t1 = time.perf_counter()
    km.fit(df)  # the process's first fit: cold JVM code paths (reported, not in the ratio)
    mllib_cold_s = time.perf_counter() - t1
    ml_times = []
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        model = km.fit(df)
        ml_times.append(time.perf_counter() - t1)
    mllib_s = float(np.median(ml_times))
    ml_obj = float(model.summary.trainingCost)
    ml_iters = int(model.summary.numIter)
    spark.stop()
    shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "block_mb": args.block_mb,
        "solver": args.solver,
        "init_mode": args.init_mode,
        "partitions": parts,
        "cache": args.cache,
        "init_steps": args.init_steps,
        "repeats": args.repeats,
        "mllib_s": round(mllib_s, 3),
        "mllib_cold_s": round(mllib_cold_s, 3),
        "mllib_iterations": ml_iters,
        "sklearn_iterations": int(sk.n_iter_),
        "sklearn_s": round(sklearn_s, 3),
        "ratio": round(mllib_s / sklearn_s, 2),
        "mllib_objective": ml_obj,
        "sklearn_objective": sk_obj,
        "objective_rel_diff": round((ml_obj - sk_obj) / sk_obj, 6),
    }
    print(
        f"MLlib KMeans {mllib_s:.2f}s (first fit of the JVM {mllib_cold_s:.2f}s; objective {ml_obj:.6g}) vs scikit-learn {sklearn_s:.2f}s (objective {sk_obj:.6g}): "
        f"time ratio {result['ratio']}, objective {100 * result['objective_rel_diff']:+.3f}%  (goal: ratio <= 3, objective within 0.5%)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
