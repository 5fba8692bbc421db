"""What Structured Streaming itself sustains on this machine, beside `seqclust stream`, on the same
files: the floor under any live-segments design.

    python bench/stream_floor.py [--users 20000] [--drops 8] [--files-per-batch 1 4] [--work DIR]

The events of ``bench/stream.py`` (the same generator, seed and file cuts: out of order within
the lateness, duplicates included) are read as a stream of Parquet files, ``--files-per-batch``
files per micro-batch (``availableNow``: as fast as the engine goes), by queries that each do
*less* than `seqclust stream` does:

- ``append``: the rows appended to a Delta table (no logic: the source, the sink, the commit);
- ``session_window``: Spark's own sessionization in the JVM (``session_window`` on a 30-minute
  gap, an event-time watermark, state in the state store), the closed sessions appended;
- ``pandas_state``: one state row per user kept by Python code in the state store
  (``transformWithStateInPandas``, RocksDB; Spark 3.5: ``applyInPandasWithState``) counting the
  user's events, one row per user appended: the shape a state-store design of the live
  segments would have, before any sessionization or embedding.

and by `seqclust stream --available-now` itself (``stream.max_files_per_trigger``, a model run
trained first as in ``bench/stream.py``). Per query: the seconds of each micro-batch (Spark's
``triggerExecution``; seqclust's own progress rows), events/s over all batches and over the
batches after the first (warm: the first pays planning and state-store setup). JSON last line,
with ``seqclust_over_session_window_warm`` at the largest ``--files-per-batch`` (goal: 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))


def _rates(rows: list[tuple[int, float]]) -> dict[str, Any]:
    if not rows:
        raise SystemExit("a query processed no rows: no Parquet files in the drops folder?")
    n, s = sum(r for r, _ in rows), sum(t for _, t in rows)
    warm = rows[1:] or rows
    return {
        "batches": len(rows),
        "batch_s": [round(t, 1) for _, t in rows],
        "events_per_s": round(n / s, 1) if s else None,
        "events_per_s_warm": round(sum(r for r, _ in warm) / sum(t for _, t in warm), 1),
    }


def _query(spark: Any, kind: str, src: Path, work: Path, per_batch: int) -> dict[str, Any]:
    import pandas as pd
    from pyspark.sql import functions as F

    df = spark.readStream.schema(spark.read.parquet(str(src)).schema).option("maxFilesPerTrigger", per_batch).parquet(str(src))
    if kind == "session_window":
        out = (
            df.withWatermark("ts", "10 minutes")
            .groupBy("user_id", F.session_window("ts", "30 minutes"))
            .agg(F.count("*").alias("n"), F.collect_list("event_type").alias("types"))
        )
    elif kind == "pandas_state":
        grouped = df.withWatermark("ts", "10 minutes").groupBy("user_id")
        if hasattr(grouped, "transformWithStateInPandas"):
            from pyspark.sql.streaming import StatefulProcessor

            class Count(StatefulProcessor):  # type: ignore[misc]
                def init(self, handle: Any) -> None:
                    self.n = handle.getValueState("n", "n long")

                def handleInputRows(self, key: Any, rows: Any, timerValues: Any) -> Any:
                    n = self.n.get()[0] if self.n.exists() else 0
                    for p in rows:
                        n += len(p)
                    self.n.update((n,))
                    yield pd.DataFrame({"user_id": [key[0]], "n": [n]})

                def close(self) -> None:
                    pass

            out = grouped.transformWithStateInPandas(Count(), "user_id string, n long", "append", "None")
        else:  # Spark 3.5
            from pyspark.sql.streaming.state import GroupStateTimeout

            def count(key: Any, pdfs: Any, state: Any) -> Any:
                n = state.get[0] if state.exists else 0
                for p in pdfs:
                    n += len(p)
                state.update((n,))
                yield pd.DataFrame({"user_id": [key[0]], "n": [n]})

            out = grouped.applyInPandasWithState(count, "user_id string, n long", "n long", "append", GroupStateTimeout.NoTimeout)
    else:
        out = df
    q = (
        out.writeStream.format("delta")
        .outputMode("append")
        .option("checkpointLocation", str(work / "ck"))
        .trigger(availableNow=True)
        .start(str(work / "table"))
    )
    q.awaitTermination()
    rows = [(p["numInputRows"], p["durationMs"].get("triggerExecution", 0) / 1000) for p in q.recentProgress if p["numInputRows"]]
    return _rates(rows)


def _seqclust_stream(work: Path, landing: Path, per_batch: int, env: dict[str, str]) -> dict[str, Any]:
    from deltalake import DeltaTable
    from stream import MODEL, _seqclust

    live = f"floor-{per_batch}-{int(time.time())}"
    ck = work / f"ck-seqclust-{per_batch}"
    shutil.rmtree(ck, ignore_errors=True)
    cmd = _seqclust(
        "stream", "--model", "m", "--run-id", live, "--input", str(landing), "--checkpoint", str(ck), "--output", str(work / "out"),
        "--format", "parquet", "--available-now", conf=[*MODEL, f"stream.max_files_per_trigger={per_batch}"],
    )  # fmt: skip
    with open(work / f"seqclust-{per_batch}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    t = DeltaTable(str(work / "out" / "live_progress")).to_pyarrow_table(filters=[("run_id", "=", live)])
    rows = sorted(
        (b, n, s)
        for b, n, s in zip(t.column("batch_id").to_pylist(), t.column("input_rows").to_pylist(), t.column("seconds").to_pylist())
        if b >= 0
    )
    return _rates([(n, s) for _, n, s in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--drops", type=int, default=8)
    ap.add_argument("--files-per-batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--no-seqclust", action="store_true", help="the engine's queries only (no model run, no seqclust stream)")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed); bench/stream.py's --work folder is reused")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    from stream import model_run
    from test_stream import _drops

    from seqclust.core.config import SparkConfig
    from seqclust.runtime.spark import get_spark

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-floor-"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    try:
        model_run(work, args.users, env, model=not args.no_seqclust)
        src = work / "floor_drops"
        shutil.rmtree(src, ignore_errors=True)
        _drops(pq.read_table(work / "gen" / "events"), src, n=args.drops)
        total = sum(pq.read_metadata(f).num_rows for f in src.glob("*.parquet"))

        spark = get_spark(SparkConfig(master="local[*]", shuffle_partitions=4, log_level="ERROR"))
        spark.conf.set(
            "spark.sql.streaming.stateStore.providerClass", "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
        )
        result: dict[str, Any] = {"bench": "stream_floor", "events": total, "files": args.drops, "cores": os.cpu_count()}
        for per_batch in args.files_per_batch:
            res: dict[str, Any] = {}
            for kind in ("append", "session_window", "pandas_state"):
                qwork = work / f"q-{kind}-{per_batch}"
                shutil.rmtree(qwork, ignore_errors=True)
                res[kind] = _query(spark, kind, src, qwork, per_batch)
                print(f"{per_batch} file(s) per batch, {kind}: {res[kind]}", flush=True)
            if not args.no_seqclust:
                res["seqclust_stream"] = _seqclust_stream(work, src, per_batch, env)
                print(f"{per_batch} file(s) per batch, seqclust stream: {res['seqclust_stream']}", flush=True)
                for kind in ("append", "session_window", "pandas_state"):
                    res[f"seqclust_over_{kind}_warm"] = round(
                        res["seqclust_stream"]["events_per_s_warm"] / res[kind]["events_per_s_warm"], 3
                    )
            result[f"files_per_batch_{per_batch}"] = res
        if not args.no_seqclust:
            # the ratio the goal is set on, at the largest micro-batches measured (nested keys: each size)
            top = result[f"files_per_batch_{max(args.files_per_batch)}"]
            result["seqclust_over_session_window_warm"] = top["seqclust_over_session_window_warm"]
        result["goal_seqclust_over_session_window_warm"] = 0.5
        spark.stop()
        print(json.dumps(result))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
