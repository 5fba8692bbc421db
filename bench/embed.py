"""Embedding throughput: the project's Spark path vs the raw Keras model, side by side.

Writes N session sequences to Parquet, builds the default encoder (random weights: speed does
not depend on training), then measures on the same data and the same cores:

- raw: one Python process (a fresh interpreter, so TensorFlow's import counts) reads the
  Parquet, featurises and calls the model on batches; TF uses all cores.
- spark cold: the first job of a fresh SparkSession (local[C]) embeds the Parquet file and
  discards the output (noop sink): Python worker start, TF import and model build included.
  The session's own start (JVM, Delta jars) is timed apart and reported with and without.
- spark warm: the same job again in that session (workers and cached models reused).
- row UDF: a row-at-a-time Python UDF on a subset (what not to do).

Usage: python bench/embed.py [--sequences 1000000] [--cores 2]. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from seqclust.represent.features import EVENT_TYPES, Vocab  # noqa: E402


def make_sequences(n: int, seed: int = 0) -> tuple[pa.Table, Vocab]:
    """Realistic shapes: lengths ~ 1 + geometric (mean ~8), 100 categories, 5 event types."""
    rng = np.random.default_rng(seed)
    lens = np.minimum(1 + rng.geometric(1 / 8, n), 200)
    total = int(lens.sum())
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    cats = np.array([f"c{i}" for i in range(100)])
    et = np.array(EVENT_TYPES[:5])[rng.choice(5, total, p=[0.6, 0.15, 0.12, 0.08, 0.05])]
    ct = cats[rng.zipf(1.5, total) % 100]
    tokens = np.char.add(np.char.add(et, ":"), ct)
    prices = rng.lognormal(3, 1, total)
    gaps = rng.exponential(60, total)
    gaps[offsets[:-1]] = 0.0

    def lst(values: np.ndarray) -> pa.Array:
        arr = pa.array(values)
        arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        return pa.ListArray.from_arrays(pa.array(offsets), arr)

    table = pa.table(
        {
            "session_id": pa.array([f"s{i}" for i in range(n)]),
            "tokens": lst(tokens),
            "event_types": lst(et),
            "categories": lst(ct),
            "prices": lst(prices),
            "gaps_s": lst(gaps),
        }
    )
    vocab = Vocab(
        tokens=tuple(sorted({f"{e}:{c}" for e in EVENT_TYPES[:5] for c in cats})),
        categories=tuple(cats),
        category_median_price=tuple([20.0] * 100),
        global_median_price=20.0,
        price_edges=(-1.0, -0.5, 0.0, 0.5, 1.0),
        max_len=50,
    )
    return table, vocab


RAW = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[3])
import numpy as np, pyarrow.parquet as pq
from seqclust.represent.encoder import load_artifact, embedding_fn
from seqclust.represent.features import featurize
art = load_artifact(sys.argv[2])
predict = embedding_fn(art.model_cfg, art.weights, threads=int(sys.argv[4]))
t1 = time.perf_counter()
n = 0
pf = pq.ParquetFile(sys.argv[1])
for batch in pf.iter_batches(batch_size=int(sys.argv[5])):
    z = predict(featurize(batch, art.vocab))
    n += len(z)
t2 = time.perf_counter()
print(json.dumps({"n": n, "cold_s": t2 - t0, "warm_s": t2 - t1}))
"""


def run_raw(data: str, art: str, cores: int, batch: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RAW, data, art, str(Path(__file__).resolve().parents[1] / "lib"), str(cores), str(batch)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=1_000_000)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--row-udf-sequences", type=int, default=5000)
    args = ap.parse_args()
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

    from seqclust.represent.encoder import build_encoder, save_artifact

    with tempfile.TemporaryDirectory() as d:
        table, vocab = make_sequences(args.sequences)
        data = str(Path(d) / "seqs.parquet")
        pq.write_table(table, data, row_group_size=65536)
        model_cfg = {
            "architecture": "gru",
            "objective": "bag_reconstruction",
            "embedding_dim": 32,
            "token_dim": 32,
            "hidden": 64,
            "max_len": vocab.max_len,
            "sizes": vocab.sizes,
            "format_version": 1,
        }
        import keras

        keras.utils.set_random_seed(0)
        weights = build_encoder(model_cfg).get_weights()
        art = save_artifact(Path(d) / "enc", model_cfg, vocab, weights, {})
        print(f"{args.sequences} sequences, {table.column('tokens').combine_chunks().values.__len__()} events; encoder {art.encoder_id}")

        raw = run_raw(data, str(art.path), args.cores, args.batch)
        raw_cold = raw["n"] / raw["cold_s"]
        raw_warm = raw["n"] / raw["warm_s"]
        print(f"raw keras:   cold {raw['cold_s']:.1f}s ({raw_cold:,.0f} seq/s), warm {raw['warm_s']:.1f}s ({raw_warm:,.0f} seq/s)")

        from pyspark.sql import functions as F

        from seqclust.core.config import SparkConfig
        from seqclust.represent.embed import embed_sessions
        from seqclust.runtime.spark import get_spark

        t0 = time.perf_counter()
        spark = get_spark(SparkConfig(master=f"local[{args.cores}]", shuffle_partitions=args.cores, log_level="ERROR"))
        spark.range(1).count()
        session_s = time.perf_counter() - t0
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(args.batch))
        spark.conf.set("spark.sql.files.maxPartitionBytes", str(max(1 << 20, os.path.getsize(data) // (args.cores * 4))))
        df = spark.read.parquet(data).withColumn("user_id", F.lit("u")).withColumn("end_ts", F.current_timestamp())
        # cold: no Python worker has started yet, so worker start, TF import and model build count
        t1 = time.perf_counter()
        embed_sessions(spark, df, art).write.format("noop").mode("overwrite").save()
        spark_cold_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        embed_sessions(spark, df, art).write.format("noop").mode("overwrite").save()
        spark_warm_s = time.perf_counter() - t2
        spark_cold = args.sequences / spark_cold_s
        spark_warm = args.sequences / spark_warm_s
        with_session = args.sequences / (spark_cold_s + session_s)
        print(f"spark session start (JVM, Delta jars): {session_s:.1f}s")
        print(
            f"spark (mapInArrow, {args.cores} workers): cold {spark_cold_s:.1f}s ({spark_cold:,.0f} seq/s), warm {spark_warm_s:.1f}s ({spark_warm:,.0f} seq/s)"
        )

        # row-at-a-time UDF on a subset: the model is cached per worker, but each row pays
        # Python call overhead and a batch of one.
        from pyspark.sql import types as T

        payload = spark.sparkContext.broadcast(art.payload())
        eid = art.encoder_id

        def one(tokens, event_types, categories, prices, gaps_s):  # noqa: ANN001
            from seqclust.represent.embed import _worker_model
            from seqclust.represent.features import featurize as fz

            voc, predict = _worker_model(eid, payload)
            b = pa.table(
                {"tokens": [tokens], "event_types": [event_types], "categories": [categories], "prices": [prices], "gaps_s": [gaps_s]}
            )
            return predict(fz(b, voc))[0].tolist()

        row_udf = F.udf(one, T.ArrayType(T.FloatType()))
        sub = df.limit(args.row_udf_sequences).repartition(args.cores).cache()
        sub.count()
        sub.select(row_udf("tokens", "event_types", "categories", "prices", "gaps_s")).limit(10).write.format("noop").mode(
            "overwrite"
        ).save()  # warm
        t2 = time.perf_counter()
        sub.select(row_udf("tokens", "event_types", "categories", "prices", "gaps_s").alias("e")).write.format("noop").mode(
            "overwrite"
        ).save()
        row_s = time.perf_counter() - t2
        row_rate = args.row_udf_sequences / row_s
        print(f"row-at-a-time udf (warm, {args.row_udf_sequences} sequences): {row_s:.1f}s ({row_rate:,.0f} seq/s)")
        spark.stop()

    result = {
        "sequences": args.sequences,
        "cores": args.cores,
        "spark_seq_per_s": round(spark_cold),
        "spark_warm_seq_per_s": round(spark_warm),
        "raw_seq_per_s": round(raw_cold),
        "raw_warm_seq_per_s": round(raw_warm),
        "ratio": round(spark_cold / raw_cold, 3),
        "ratio_warm": round(spark_warm / raw_warm, 3),
        "ratio_incl_session_start": round(with_session / raw_cold, 3),
        "spark_session_start_s": round(session_s, 2),
        "row_udf_seq_per_s": round(row_rate),
    }
    print(f"ratio (cold, end to end) {result['ratio']:.2f}, warm {result['ratio_warm']:.2f}; goal >= 0.9 cold")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
