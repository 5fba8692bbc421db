"""Sessionization throughput: the project's Spark engines vs DuckDB on the same Parquet events.

Both sides read the same generated Parquet files, apply the same rules (the defaults: 30-min
gap, 24-h cut, 1000-event cut, runaway rules) and write the same columns to Parquet, on the
same number of cores. The Spark session starts before the clock; each Spark engine runs once
untimed on a small slice first (JIT, Python worker start), as DuckDB needs no warm-up.

Usage: python bench/sessionize.py [--events 5000000] [--cores 2] [--repeat 2]. Last line: JSON
with project_events_per_s (the default arrow engine), duckdb_events_per_s, ratio, and the
window-function engine's figure (sql_events_per_s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the DuckDB oracle lives with the tests


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="best of N timed runs per engine")
    ap.add_argument("--skip-sql", action="store_true", help="do not time the window-function engine")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from sessionize_duckdb import sessionize_parquet

    from seqclust.core.config import SessionizeConfig, SparkConfig
    from seqclust.datasets.generated import write_dataset
    from seqclust.runtime.spark import get_spark
    from seqclust.sessionize.stage import sessions_and_runaways

    rules = SessionizeConfig()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sess-"))
    try:
        users = max(10, int(args.events / 47.5))  # the generator makes ~47.5 events per user
        gen = write_dataset(tmp / "data", users=users, seed=1, bad_rate=0.0, files=max(2, args.cores * 2))
        n = gen.events
        print(f"generated {n:,} events for {users:,} users in {gen.seconds:.1f}s", flush=True)
        glob = str(tmp / "data" / "events" / "*.parquet")

        duck_s = _best(lambda: sessionize_parquet(glob, str(tmp / "duck.parquet"), rules, threads=args.cores), args.repeat)
        print(f"duckdb ({args.cores} threads): {duck_s:.2f}s, {n / duck_s:,.0f} events/s", flush=True)

        spark = get_spark(
            SparkConfig(
                master=f"local[{args.cores}]",
                shuffle_partitions=args.cores * 2,
                log_level="ERROR",
                driver_memory="6g",
                conf={"spark.sql.adaptive.enabled": "false"},
            )
        )
        events = spark.read.parquet(str(tmp / "data" / "events"))

        def spark_run(engine: str, src=events, out: str = "spark") -> None:
            from dataclasses import replace

            sessions, runaway = sessions_and_runaways(src, replace(rules, engine=engine))
            sessions.write.mode("overwrite").parquet(str(tmp / out))

        results = {}
        for engine in ("arrow",) + (() if args.skip_sql else ("sql",)):
            spark_run(engine, events.limit(20_000), "warm")
            s = _best(lambda e=engine: spark_run(e), args.repeat)
            results[engine] = s
            print(f"spark {engine} engine (local[{args.cores}]): {s:.2f}s, {n / s:,.0f} events/s", flush=True)
        rows_spark = spark.read.parquet(str(tmp / "spark")).count()
        import duckdb

        rows_duck = (
            duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{tmp / 'duck.parquet'}') WHERE reason IS NULL").fetchone()[0]
        )
        spark.stop()
        out = {
            "events": n,
            "cores": args.cores,
            "project_events_per_s": round(n / results["arrow"]),
            "duckdb_events_per_s": round(n / duck_s),
            "ratio": round(duck_s / results["arrow"], 3),
            "project_s": round(results["arrow"], 3),
            "duckdb_s": round(duck_s, 3),
            "sessions": rows_spark,
            "sessions_equal": rows_spark == rows_duck,
        }
        if "sql" in results:
            out["sql_events_per_s"] = round(n / results["sql"])
            out["sql_ratio"] = round(duck_s / results["sql"], 3)
        print(json.dumps(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
