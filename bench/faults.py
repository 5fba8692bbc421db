"""Worker loss on a real cluster: a lost executor JVM or Python worker mid-stage costs time, never rows.

On a Spark standalone cluster on this machine (a master and two 1-core workers, separate JVMs,
``standalone``), the pipeline is submitted through ``spark-submit.sh`` once undisturbed,
then once per fault case with the same run id, data and settings into its own output folder.
In each faulted run a watcher reads the job's log; when the named stage has started it waits
until a target process is busy (CPU time rising) and SIGKILLs it:

  - ``executor_embed``:        one executor JVM (CoarseGrainedExecutorBackend), stage embed;
  - ``python_embed``:          one busy Python worker (a child of pyspark.daemon), stage embed;
  - ``executor_sessionize``:   one executor JVM, stage sessionize (its shuffle output is lost
                               with it: the map stage is recomputed);
  - ``python_sessionize``:     one busy Python worker, stage sessionize (if the stage runs any
                               Python on the executors; otherwise reported as not applicable);
  - ``executor_sessionize_late``: one executor JVM 60% into sessionize (its finished shuffle
                               output is lost with it: a fetch failure, the map stage rerun).

Every faulted run must succeed, and every Delta table of the run must equal the undisturbed
run's (the same checks as tests/test_cluster.py: row counts, exact rows for the deterministic
tables, embeddings within 1e-5, metrics within 1e-6). The Spark event log of each run is read
for evidence that the fault hit work in flight: failed task attempts and their reasons, and
executors removed.

Time to recover: the faulted run's wall time over the faster of two undisturbed runs (one
before the cases, one after), and the hit stage's time over the same stage undisturbed.

This is a bench, not a suite test: seven cluster runs take ~18 minutes, beyond the suite's
budget. Usage: python bench/faults.py [--users 600] [--out DIR] [--cases a,b,...]
Last line: JSON {"cases", "passed", "rows_lost", "per_case": {case: {...}}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
sys.path.insert(0, str(REPO / "tests"))  # the standalone-cluster helper lives with the tests

log = logging.getLogger("bench.faults")

# case -> (what to kill, in which stage, how far into the stage: a share of its undisturbed time)
CASES = {
    "executor_embed": ("executor", "embed", 0.0),
    "python_embed": ("python", "embed", 0.0),
    "executor_sessionize": ("executor", "sessionize", 0.0),
    "python_sessionize": ("python", "sessionize", 0.0),
    # late in the stage: the killed executor's finished shuffle output is lost with it
    "executor_sessionize_late": ("executor", "sessionize", 0.6),
}
SETTINGS = [
    "encoder.epochs=2",
    "cluster.k_min=3",
    "cluster.k_max=5",
    "cluster.stability_runs=1",
    "evaluate.downstream=false",
    "spark.shuffle_partitions=4",
]
TABLES = ("events", "quarantine", "sessions", "session_quarantine", "embeddings", "clusters", "centroids", "cluster_profiles", "metrics")
EXACT = ("events", "sessions", "session_quarantine", "clusters", "centroids")
STAGE_START = re.compile(r"stage (\w+): start")
STAGE_DONE = re.compile(r"stage (\w+): done")
STAGE_TIME = re.compile(r"stage (\w+): done in ([0-9.]+)s")


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _targets(kind: str, cluster_root: Path) -> list[psutil.Process]:
    """The executor JVMs of the cluster (their cwd is under the cluster's work dir), or the
    Python workers they forked (children of a pyspark.daemon; the daemon itself is left alone)."""
    out = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "CoarseGrainedExecutorBackend" not in cmd or not str(p.info["cwd"] or "").startswith(str(cluster_root)):
                continue
            if kind == "executor":
                out.append(p)
            else:
                for c in p.children(recursive=True):
                    if "pyspark.daemon" in " ".join(c.cmdline()) and c.parent() and c.parent().pid != p.pid:
                        out.append(c)  # a forked worker (its parent is the daemon)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


class Killer(threading.Thread):
    """Waits for ``stage <stage>: start`` in the job's log, then SIGKILLs the first target
    process seen busy (CPU time up by 0.2 s within 0.5 s) while the stage runs."""

    def __init__(self, kind: str, stage: str, cluster_root: Path, delay_s: float = 0.0):
        super().__init__(daemon=True)
        self.kind, self.stage, self.root, self.delay_s = kind, stage, cluster_root, delay_s
        self.started = threading.Event()
        self.done = threading.Event()
        self.killed: dict | None = None

    def on_line(self, line: str) -> None:
        m = STAGE_START.search(line)
        if m and m.group(1) == self.stage:
            self.started.set()
        m = STAGE_DONE.search(line)
        if m and m.group(1) == self.stage:
            self.done.set()

    def run(self) -> None:
        self.started.wait()
        t_start = time.monotonic()
        self.done.wait(self.delay_s)
        while not self.done.is_set():
            before = {}
            for p in _targets(self.kind, self.root):
                try:
                    before[p.pid] = (p, _cpu(p))
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.5)
            for pid, (p, c0) in before.items():
                try:
                    busy = _cpu(p) - c0
                    if busy >= 0.2 and not self.done.is_set():
                        cmd = " ".join(p.cmdline())[:80]
                        p.kill()
                        self.killed = {"pid": pid, "cmd": cmd, "after_stage_start_s": round(time.monotonic() - t_start, 1)}
                        log.info(
                            "faults: killed %s pid %d (%s) %.1fs into stage %s",
                            self.kind,
                            pid,
                            cmd,
                            self.killed["after_stage_start_s"],
                            self.stage,
                        )
                        return
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue


def _stage_times(log_text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in STAGE_TIME.finditer(log_text)}


def _submit(cluster, out: Path, common: list[str], events_dir: Path, killer: Killer | None) -> tuple[int, float, str, dict[str, float]]:
    events_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(REPO / "spark-submit.sh"), "--master", cluster.master_url, "--executor-memory", "1g"]
    cmd += ["--conf", "spark.executor.cores=1", "--conf", "spark.cores.max=2"]
    cmd += ["--conf", "spark.eventLog.enabled=true", "--conf", f"spark.eventLog.dir={events_dir}"]
    cmd += ["--conf", "spark.eventLog.rolling.enabled=false", "--conf", "spark.eventLog.compress=false"]  # one JSON-lines file
    cmd += ["pipeline", "--output", str(out), *common]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    if killer:
        killer.start()
    tail: list[str] = []
    stages: dict[str, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        stages.update(_stage_times(line))
        if killer:
            killer.on_line(line)
        if "stage " in line or "error" in line.lower() and "seqclust" in line:
            log.info("  | %s", line.rstrip()[:160])
    rc = proc.wait()
    if killer:
        killer.started.set()  # release a watcher whose stage never started
        killer.done.set()
        killer.join(5)
    return rc, time.monotonic() - t0, "".join(tail), stages


def _evidence(events_dir: Path) -> dict:
    """Failed task attempts (by reason) and removed executors, from the Spark event log."""
    failed: dict[str, int] = {}
    removed = 0
    stages_resubmitted = 0
    for f in sorted(p for p in events_dir.rglob("*") if p.is_file() and not p.name.startswith("appstatus")):
        for line in f.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            kind = e.get("Event")
            if kind == "SparkListenerTaskEnd":
                reason = (e.get("Task End Reason") or {}).get("Reason", "Success")
                if reason != "Success":
                    failed[reason] = failed.get(reason, 0) + 1
            elif kind == "SparkListenerExecutorRemoved":
                removed += 1
            elif kind == "SparkListenerStageSubmitted" and (e.get("Stage Info") or {}).get("Stage Attempt ID", 0) > 0:
                stages_resubmitted += 1
    return {"failed_tasks": failed, "executors_removed": removed, "stage_attempts_retried": stages_resubmitted}


def _compare(spark, base: Path, other: Path, run_id: str) -> dict:
    """Differences between two outputs of the same run id (empty = equal)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    def table(root: Path, name: str):
        df = spark.read.format("delta").load(str(root / name)).where(F.col("run_id") == run_id).drop("run_id")
        for f in df.schema.fields:
            if isinstance(f.dataType, T.MapType):
                df = df.withColumn(f.name, F.array_sort(F.map_entries(f.name)))
        return df

    diffs: dict[str, str] = {}
    rows: dict[str, int] = {}
    lost = 0
    for name in TABLES:
        a, b = table(base, name), table(other, name)
        na, nb = a.count(), b.count()
        rows[name] = nb
        if na != nb:
            diffs[name] = f"{nb} rows, undisturbed {na}"
            lost += max(0, na - nb)
            continue
        if name in EXACT:
            drop = [c for c in a.columns if c in ("ingested_at", "window_start")]
            n = a.drop(*drop).exceptAll(b.drop(*drop)).count()
            if n:
                diffs[name] = f"{n} rows differ"
                lost += n
    ea = {(r["entity_type"], r["entity_id"]): np.asarray(r["embedding"]) for r in table(base, "embeddings").collect()}
    eb = {(r["entity_type"], r["entity_id"]): np.asarray(r["embedding"]) for r in table(other, "embeddings").collect()}
    if ea.keys() != eb.keys():
        diffs["embeddings"] = "different entities"
    elif ea and max(float(np.abs(ea[k] - eb[k]).max()) for k in ea) >= 1e-5:
        diffs["embeddings"] = "vectors differ by 1e-5 or more"
    ma = {(r["method"], r["family"], r["metric"], r["k"]): r["value"] for r in table(base, "metrics").collect()}
    mb = {(r["method"], r["family"], r["metric"], r["k"]): r["value"] for r in table(other, "metrics").collect()}
    if ma.keys() != mb.keys():
        diffs["metrics"] = "different metric rows"
    else:
        bad = [k for k in ma if not np.isclose(ma[k], mb[k], rtol=1e-6, atol=1e-9, equal_nan=True)]
        if bad:
            diffs["metrics"] = f"{len(bad)} values differ, e.g. {bad[:3]}"
    return {"diffs": diffs, "rows": rows, "rows_lost": lost}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--out", default="build/bench-faults")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    cases = [c for c in a.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")

    import standalone

    from seqclust.core.config import SparkConfig
    from seqclust.datasets.generated import write_dataset
    from seqclust.runtime.spark import get_spark

    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = out / "data"
    write_dataset(data, users=a.users, seed=11, bad_rate=0.01)
    common = ["--conf", str(REPO / "conf" / "local.yaml"), "--input", str(data / "events"), "--labels", str(data / "personas")]
    common += ["--run-id", "f1"] + [x for s in SETTINGS for x in ("--set", s)]

    cluster = standalone.start(out / "cluster", workers=2, cores=1, memory="2g")
    results: dict[str, dict] = {}
    try:
        log.info("faults: undisturbed run")
        rc, base_s, tail, base_stages = _submit(cluster, out / "base", common, out / "eventlog" / "base", None)
        if rc != 0:
            log.error("faults: the undisturbed run failed:\n%s", tail)
            return 1
        log.info("faults: undisturbed run %.0fs", base_s)
        spark = None
        for case in cases:
            kind, stage, share = CASES[case]
            log.info(
                "faults: case %s (kill one %s during stage %s)", case, "executor JVM" if kind == "executor" else "Python worker", stage
            )
            killer = Killer(kind, stage, out / "cluster", share * base_stages.get(stage, 0.0))
            rc, wall, tail, stages = _submit(cluster, out / case, common, out / "eventlog" / case, killer)
            r: dict = {"kind": kind, "stage": stage, "exit_code": rc, "wall_s": round(wall, 1), "stage_s": stages.get(stage)}
            r["killed"] = killer.killed
            r["evidence"] = _evidence(out / "eventlog" / case)
            if rc != 0:
                r["outcome"] = "run failed"
                r["log_tail"] = tail[-1500:]
            else:
                spark = spark or get_spark(SparkConfig(master="local[2]", shuffle_partitions=2, log_level="ERROR"))
                cmp = _compare(spark, out / "base", out / case, "f1")
                r["diffs"], r["rows"] = cmp["diffs"], cmp["rows"]
                r["rows_lost"] = cmp["rows_lost"]  # undisturbed rows missing or changed (must be 0)
                if killer.killed is None:
                    r["outcome"] = f"not applicable: no busy {kind} process during stage {stage}"
                else:
                    r["outcome"] = "equal to the undisturbed run" if not cmp["diffs"] else "tables differ"
            results[case] = r
            log.info("faults: %s -> %s (wall %.0fs, stage %s %ss; %s)", case, r["outcome"], wall, stage, r["stage_s"], r["evidence"])
        # a second undisturbed run: the recovery time is measured against the faster of the two
        # (one slow baseline would hide the cost of a fault)
        log.info("faults: undisturbed run again")
        _, base2_s, _, base2_stages = _submit(cluster, out / "base2", common, out / "eventlog" / "base2", None)
        if spark is not None:
            spark.stop()
    finally:
        cluster.stop()
    base_s = min(base_s, base2_s)
    for r in results.values():
        refs = [x for x in (base_stages.get(r["stage"]), base2_stages.get(r["stage"])) if x is not None]
        r["recover_s"] = round(r["wall_s"] - base_s, 1)  # the whole run, against the faster undisturbed one
        r["stage_recover_s"] = round(r["stage_s"] - min(refs), 1) if r.get("stage_s") is not None and refs else None

    applicable = {c: r for c, r in results.items() if r.get("killed")}
    passed = sum(1 for r in applicable.values() if r["exit_code"] == 0 and not r.get("diffs"))
    print("case | killed | outcome | failed task attempts | executors removed | +s")
    for c, r in results.items():
        print(
            f"{c} | {(r['killed'] or {}).get('cmd', '-')[:40]} | {r['outcome']} | {r['evidence']['failed_tasks']} | {r['evidence']['executors_removed']} | {r['recover_s']}"
        )
    summary = {
        "cases": len(applicable),
        "passed": passed,
        "rows_lost": sum(r.get("rows_lost", 0) for r in applicable.values()),
        "undisturbed_s": round(base_s, 1),
        "per_case": results,
    }
    print(json.dumps(summary))
    return 0 if passed == len(applicable) else 1


if __name__ == "__main__":
    sys.exit(main())
