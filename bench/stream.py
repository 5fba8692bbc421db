"""Live segments under load: events/s a `seqclust stream` sustains on this machine with a fixed
trigger, and the delay from a file's arrival to the live_segments update of the sessions it closed.

    python bench/stream.py [--users 20000] [--drops 8] [--trigger 10] [--interval 10]

1. generates ``--users`` users' events, trains a model run on them (small encoder settings:
   this bench measures the stream, not the model);
2. cuts the same events by time into ``--drops`` files and starts `seqclust stream --trigger-seconds
   T` on a landing folder holding the first one (as in production, a micro-batch takes every
   file that arrived since the last one: a stream that falls behind catches up in bigger
   batches; ``--max-files N`` caps it, ``stream.max_files_per_trigger``);
3. moves one file into the landing folder every ``--interval`` seconds (an atomic rename) and
   records when;
4. when every row has been processed, stops the stream and reads ``live_progress`` (per
   micro-batch its input rows, processing seconds and finish time) and the checkpoint's file
   log (which files each micro-batch read).

Figures: events/s **sustained** (input rows over the wall time from the first file's arrival to
the last batch's end) and **processing** (input rows over the batches' own seconds); the delay
of each closed session: its batch's finish time minus the arrival of the newest file that batch
read (the file whose events moved the watermark that closed it), p50/p95 weighted by sessions
closed. JSON last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
MODEL = [
    "encoder.epochs=3",
    "encoder.train_sample=5000",
    "cluster.n_init=1",
    "cluster.fine_k=null",
    "evaluate.downstream=false",
    "baseline.bag_of_events=false",
]


def _seqclust(*args: str, conf: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "seqclust.app.cli",
        *args,
        "--conf",
        str(REPO / "conf" / "local.yaml"),
        *[x for s in conf for x in ("--set", s)],
    ]


def model_run(work: Path, users: int, env: dict[str, str], model: bool = True) -> None:
    """``users`` generated users' events in ``work/gen`` and, with ``model``, the model run ``m``
    trained on them in ``work/out`` (small encoder settings); what an earlier invocation left in
    ``work`` is kept."""
    from seqclust.datasets.generated import write_dataset

    if not (work / "gen" / "events").exists():
        write_dataset(work / "gen", users=users, seed=21)
    if model and not (work / "out" / "centroids").is_dir():
        t0 = time.monotonic()
        subprocess.run(
            _seqclust("run", "--input", str(work / "gen" / "events"), "--output", str(work / "out"), "--run-id", "m", conf=MODEL),
            check=True,
            env=env,
            capture_output=True,
        )
        print(f"model run: {time.monotonic() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--drops", type=int, default=8)
    ap.add_argument("--trigger", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between two files")
    ap.add_argument("--max-files", type=int, help="at most this many files per micro-batch (default: every file there)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--work", help="working folder (default: a temporary one, removed)")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    from deltalake import DeltaTable
    from test_stream import _drops

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-stream-"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    try:
        out = work / "out"
        model_run(work, args.users, env)
        events = pq.read_table(work / "gen" / "events")
        for old in ("staged", "landing", "ck"):
            shutil.rmtree(work / old, ignore_errors=True)
        _drops(events, work / "staged", n=args.drops)
        landing = work / "landing"
        landing.mkdir()
        conf = [*MODEL, *([f"stream.max_files_per_trigger={args.max_files}"] if args.max_files else [])]
        live = f"live-{int(time.time())}"  # its own tables' rows: a reused --work folder keeps earlier streams'
        cmd = _seqclust(
            "stream", "--model", "m", "--run-id", live, "--input", str(landing), "--checkpoint", str(work / "ck"), "--output", str(out),
            "--trigger-seconds", str(args.trigger), "--format", "parquet", "--timeout", str(args.timeout), conf=conf,
        )  # fmt: skip
        # the stream learns the Parquet schema from the files there at start: the first drop
        staged = sorted((work / "staged").glob("drop-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
        arrivals: dict[str, float] = {}
        shutil.move(str(staged[0]), landing / staged[0].name)
        os.utime(landing / staged[0].name)  # arrival time = now: the file source takes files oldest first
        arrivals[staged[0].name] = time.time()
        log = open(work / "stream.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        for f in staged[1:]:
            time.sleep(args.interval)
            tmp = landing / f".{f.name}.tmp"  # hidden while copied, then one rename
            shutil.copy(f, tmp)
            os.rename(tmp, landing / f.name)
            arrivals[f.name] = time.time()
        total = sum(pq.read_metadata(landing / f.name).num_rows for f in staged)
        deadline = time.monotonic() + args.timeout
        prog = None
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            try:
                t = DeltaTable(str(out / "live_progress")).to_pyarrow_table(filters=[("run_id", "=", live)])
            except Exception:
                continue
            done = sum(r for r, b in zip(t.column("input_rows").to_pylist(), t.column("batch_id").to_pylist()) if b >= 0)
            if done >= total:
                prog = t
                break
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        if prog is None:
            raise SystemExit(f"the stream did not process all {total} rows in time; see {work / 'stream.log'}")
        rows = sorted(
            (b, n, s, c, f.timestamp())
            for b, n, s, c, f in zip(
                prog.column("batch_id").to_pylist(),
                prog.column("input_rows").to_pylist(),
                prog.column("seconds").to_pylist(),
                prog.column("closed_sessions").to_pylist(),
                prog.column("finished_at").to_pylist(),
            )
            if b >= 0
        )
        files: dict[int, list[str]] = {}  # micro-batch -> the files it read (the file source's own log)
        for log_file in (work / "ck" / "sources" / "0").glob("[0-9]*"):
            for line in log_file.read_text().splitlines()[1:]:
                entry = json.loads(line)
                files.setdefault(int(entry["batchId"]), []).append(Path(entry["path"]).name)
        delays, weights = [], []
        for b, _n, _s, closed, finished in rows:
            if closed and files.get(b):
                delays.append(finished - max(arrivals[f] for f in files[b]))
                weights.append(closed)
        order = np.argsort(delays)
        d, w = np.asarray(delays)[order], np.cumsum(np.asarray(weights)[order])

        def pct(q: float) -> float | None:
            return float(d[np.searchsorted(w, q * w[-1])]) if len(d) else None

        wall = rows[-1][4] - min(arrivals.values())
        result = {
            "bench": "stream",
            "events": int(total),
            "batches": len(rows),
            "trigger_s": args.trigger,
            "interval_s": args.interval,
            "max_files_per_batch": args.max_files,
            "events_per_s_sustained": round(total / wall, 1),
            "events_per_s_processing": round(total / sum(r[2] for r in rows), 1),
            "batch_seconds_p50": round(float(np.median([r[2] for r in rows])), 2),
            "delay_s_p50": pct(0.5),
            "delay_s_p95": pct(0.95),
            "sessions_closed": int(sum(r[3] for r in rows)),
            "goal_events_per_s": 50000,
            "goal_delay_s_p95": 2 * args.trigger,
            # the load offered (every event over the drops' schedule) and the delay in triggers
            "offered_events_per_s": round(total / (args.drops * args.interval), 1),
            "delay_triggers_p95": round(pct(0.95) / args.trigger, 2) if len(d) else None,
            "goal_delay_triggers_p95": 3,
        }
        for b, n, s, c, _ in rows:
            print(f"batch {b}: {n} rows ({len(files.get(b, []))} files), {s:.1f} s, {c} sessions closed", flush=True)
        print(json.dumps(result))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
