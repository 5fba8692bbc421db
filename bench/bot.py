"""A bot: one user with 10M events in one second, beside ordinary users, through ingest and sessionize.

Writes a Parquet log (``--events`` events of user ``bot`` within one second, plus ``--users``
ordinary users with a few sessions each), runs ``seqclust ingest`` and ``seqclust sessionize``
on it with ``local[2]`` in a subprocess while sampling the resident memory of the process tree
(driver, JVM, Python workers), then checks from the Delta tables that nothing was lost: every
input row is an event, the bot is one runaway session in ``session_quarantine`` with every
event counted, and the ordinary users' sessions are modelled as usual.

Usage: python bench/bot.py [--events 10000000] [--users 200] [--out DIR]
Last line: JSON {"events", "wall_s", "ingest_s", "sessionize_s", "jvm_peak_rss_mb",
"workers_peak_rss_mb", "bot_runaway_events", "ordinary_sessions", "rows_lost"}.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
sys.path.insert(0, str(REPO / "bench"))

T0_US = 1_790_000_000_000_000  # 2026-09-21, microseconds
STAGE = re.compile(r"stage (\w+): done in ([0-9.]+)s")


def write_log(path: Path, events: int, users: int) -> int:
    """The bot's events (unique ids, one second) and ordinary users' sessions, in row groups."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True)
    chunk = 2_000_000
    with pq.ParquetWriter(
        path / "part-0.parquet",
        pa.schema(
            [
                ("event_id", pa.string()),
                ("user_id", pa.string()),
                ("ts", pa.timestamp("us", tz="UTC")),
                ("event_type", pa.string()),
                ("item_id", pa.string()),
            ]
        ),
    ) as w:
        for start in range(0, events, chunk):
            ids = np.arange(start, min(events, start + chunk))
            w.write_table(
                pa.table(
                    {
                        "event_id": pa.array([f"b{i}" for i in ids]),
                        "user_id": pa.array(["bot"] * len(ids)),
                        "ts": pa.array(T0_US + ids * 1_000_000 // events, type=pa.timestamp("us", tz="UTC")),
                        "event_type": pa.array(["view"] * len(ids)),
                        "item_id": pa.array([f"i{i % 5000}" for i in ids]),
                    }
                )
            )
        rng = np.random.default_rng(3)
        rows = []
        for u in range(users):
            t = T0_US + 3_600_000_000
            for _ in range(3):  # three sessions of 4 events, a day apart
                for k in range(4):
                    rows.append(
                        (f"o{u}-{len(rows)}", f"u{u}", t + k * 30_000_000, ["view", "cart", "view", "purchase"][k], f"i{rng.integers(500)}")
                    )
                t += 86_400_000_000
        w.write_table(
            pa.table(
                {
                    "event_id": [r[0] for r in rows],
                    "user_id": [r[1] for r in rows],
                    "ts": pa.array([r[2] for r in rows], type=pa.timestamp("us", tz="UTC")),
                    "event_type": [r[3] for r in rows],
                    "item_id": [r[4] for r in rows],
                }
            )
        )
    return events + len(rows)


def main(argv: list[str] | None = None) -> int:
    from pipeline import Sampler  # bench/pipeline.py: peak RSS of a process tree

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--out", default="build/bench-bot")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    total = write_log(out / "log", a.events, a.users)
    print(f"bot: {a.events:,} events of one user in one second + {total - a.events:,} of {a.users} ordinary users", file=sys.stderr)
    base = [sys.executable, "-m", "seqclust.app.cli"]
    common = ["--conf", str(REPO / "conf" / "local.yaml"), "--input", str(out / "log"), "--output", str(out / "tables"), "--run-id", "bot"]
    common += ["--set", "source.columns.category_id=null", "--set", "source.columns.price=null", "--set", "spark.master=local[2]"]
    stages: dict[str, float] = {}
    peak = {"jvm": 0, "workers": 0, "driver": 0}
    t0 = time.monotonic()
    for stage in ("ingest", "sessionize"):
        proc = subprocess.Popen([*base, stage, *common], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        assert proc.stderr is not None
        err = proc.stderr.read()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
        for k in peak:
            peak[k] = max(peak[k], sampler.peak[k])
        stages.update({m.group(1): float(m.group(2)) for m in STAGE.finditer(err)})
        if rc != 0:
            print(err[-3000:], file=sys.stderr)
            print(json.dumps({"events": a.events, "failed_stage": stage, "exit_code": rc}))
            return 1
    wall = time.monotonic() - t0

    from pyspark.sql import functions as F

    from seqclust.core.config import SparkConfig
    from seqclust.runtime.spark import get_spark

    spark = get_spark(SparkConfig(master="local[2]", shuffle_partitions=2, log_level="ERROR"))

    def table(name: str):
        return spark.read.format("delta").load(str(out / "tables" / name)).where(F.col("run_id") == "bot")

    events = table("events").count()
    quarantined = table("quarantine").count()
    runaway = [(r["user_id"], r["reason"], r["n_events"]) for r in table("session_quarantine").collect()]
    ordinary = table("sessions").where(F.col("user_id") != "bot").count()
    bot_sessions = table("sessions").where(F.col("user_id") == "bot").count()
    spark.stop()
    bot_events = sum(n for u, _, n in runaway if u == "bot")
    result = {
        "events": a.events,
        "input_rows": total,
        "wall_s": round(wall, 1),
        "ingest_s": stages.get("ingest"),
        "sessionize_s": stages.get("sessionize"),
        "driver_peak_rss_mb": round(peak["driver"] / 2**20),
        "jvm_peak_rss_mb": round(peak["jvm"] / 2**20),
        "workers_peak_rss_mb": round(peak["workers"] / 2**20),
        "runaway": runaway,
        "bot_runaway_events": bot_events,
        "bot_modelled_sessions": bot_sessions,
        "ordinary_sessions": ordinary,
        "rows_lost": total - events - quarantined,
    }
    ok = result["rows_lost"] == 0 and bot_events == a.events and bot_sessions == 0 and ordinary == 3 * a.users
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
