"""The whole pipeline at growing sizes: wall time per stage, events/s, peak memory, 10M/1M ratios.

For each size the project's generator writes the events (fixed seed, in a subprocess, so the
generator's memory is not counted), then `seqclust run` runs on them with `local[N]` in a
subprocess while this script samples, every 0.25 s, the resident memory of
  - the driver program (the `seqclust` Python process),
  - the JVM (in local mode it is the driver JVM *and* the executors),
  - the Python workers (pyspark daemons and workers, summed).
Stage times come from the run's `stage done` log lines.

Usage: python bench/pipeline.py [--sizes 1000000,10000000] [--cores 2] [--out DIR] [--set k=v ...]
Last line: JSON with events (largest size), wall_s, driver_peak_rss_mb, jvm_peak_rss_mb,
driver_rss_ratio_10m_vs_1m, jvm_rss_ratio_10m_vs_1m, time_ratio_10m_vs_1m (largest over smallest
size; named for the default sizes), and per-size details under "runs".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
EVENTS_PER_USER = 47.5  # what the generator makes on average
STAGE_RE = re.compile(r"stage (\w+): done in ([0-9.]+)s")


class Sampler(threading.Thread):
    """Peak RSS of a process tree, split into the driver, the JVM and the Python workers."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = {"driver": 0, "jvm": 0, "workers": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            now = {"driver": 0, "jvm": 0, "workers": 0}
            try:
                now["driver"] = root.memory_info().rss
                for c in root.children(recursive=True):
                    try:
                        name, cmd, rss = c.name(), " ".join(c.cmdline()), c.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    if "java" in name:
                        now["jvm"] += rss
                    elif "pyspark" in cmd or "python" in name:
                        now["workers"] += rss
            except psutil.NoSuchProcess:
                break
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)
            self.stop.wait(self.every)


def generate(root: Path, events: int, seed: int) -> int:
    users = max(20, int(events / EVENTS_PER_USER))
    marker = root / "_GENERATED.json"
    if not marker.exists():
        cmd = [sys.executable, "-m", "seqclust.cli", "generate", "--out", str(root), "--users", str(users), "--seed", str(seed)]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(REPO / "lib")), stdout=subprocess.DEVNULL)
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in (root / "events").glob("*.parquet"))


def run_pipeline(data: Path, out: Path, cores: int, extra: list[str]) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "seqclust.cli", "run", "--conf", str(REPO / "conf" / "local.yaml")]
    cmd += ["--input", str(data / "events"), "--labels", str(data / "personas"), "--output", str(out), "--run-id", "bench"]
    cmd += ["--set", f"spark.master=local[{cores}]"] + [x for s in extra for x in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "lib"), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    sampler = Sampler(proc.pid)
    sampler.start()
    stages: dict[str, float] = {}
    err_tail: list[str] = []

    log_path = out.parent / f"{out.name}.log"  # the run's whole log, for profiling a stage

    def pump_err() -> None:
        assert proc.stderr is not None
        with open(log_path, "w", buffering=1) as log_file:  # line-buffered: readable while it runs
            for line in proc.stderr:
                log_file.write(line)
                pump_line(line)

    def pump_line(line: str) -> None:
        m = STAGE_RE.search(line)
        if m:
            stages[m.group(1)] = float(m.group(2))
            print(f"    {m.group(1)}: {float(m.group(2)):.1f}s", flush=True)
        err_tail.append(line.rstrip())
        del err_tail[:-40]

    t = threading.Thread(target=pump_err, daemon=True)
    t.start()
    stdout = proc.stdout.read() if proc.stdout else ""
    code = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    t.join(5)
    if code != 0:
        raise SystemExit(f"pipeline failed (exit {code}):\n" + "\n".join(err_tail[-20:]))
    ari = re.search(r"^\s+ari\s+([-0-9.]+)\s+([-0-9.]+)\s+([-0-9.]+)", stdout, re.M)
    k = re.search(r"^\s+k = (\d+)", stdout, re.M)
    mb = 1024 * 1024
    return {
        "wall_s": round(wall, 1),
        "stage_s": stages,
        "driver_peak_rss_mb": round(sampler.peak["driver"] / mb),
        "jvm_peak_rss_mb": round(sampler.peak["jvm"] / mb),
        "workers_peak_rss_mb": round(sampler.peak["workers"] / mb),
        "log": str(log_path),
        "k": int(k.group(1)) if k else None,
        "ari": {"encoder": float(ari.group(1)), "bag_of_events": float(ari.group(2)), "random": float(ari.group(3))} if ari else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000", help="events per run, comma-separated")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(REPO / "build" / "bench_pipeline"))
    ap.add_argument("--set", action="append", default=[], help="config override for every run")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    root = Path(args.out)
    runs = []
    for size in sizes:
        data = root / f"data-{size}-seed{args.seed}"
        t0 = time.perf_counter()
        events = generate(data, size, args.seed)
        print(f"{events:,} events generated in {time.perf_counter() - t0:.0f}s ({data})", flush=True)
        r = run_pipeline(data, root / f"out-{size}", args.cores, args.set)
        r["events"] = events
        r["events_per_s"] = round(events / r["wall_s"])
        runs.append(r)
        print(
            f"  {events:,} events: {r['wall_s']:.0f}s ({r['events_per_s']:,} events/s); peak RSS driver {r['driver_peak_rss_mb']} MB, "
            f"JVM {r['jvm_peak_rss_mb']} MB, Python workers {r['workers_peak_rss_mb']} MB; k={r['k']}, ARI {r['ari']}",
            flush=True,
        )
    small, big = runs[0], runs[-1]
    result = {
        "events": big["events"],
        "wall_s": big["wall_s"],
        "driver_peak_rss_mb": big["driver_peak_rss_mb"],
        "jvm_peak_rss_mb": big["jvm_peak_rss_mb"],
        "driver_rss_ratio_10m_vs_1m": round(big["driver_peak_rss_mb"] / max(1, small["driver_peak_rss_mb"]), 3),
        "jvm_rss_ratio_10m_vs_1m": round(big["jvm_peak_rss_mb"] / max(1, small["jvm_peak_rss_mb"]), 3),
        "time_ratio_10m_vs_1m": round(big["wall_s"] / small["wall_s"], 3),
        "events_ratio": round(big["events"] / small["events"], 3),
        "cores": args.cores,
        "runs": runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
