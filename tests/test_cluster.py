"""The pipeline on a real Spark standalone cluster (a master and two 1-core workers, separate
JVMs on 127.0.0.1, free ports), submitted through spark-submit.sh, against a local[2] run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import standalone
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.app.cli import main
from seqclust.datasets.generated import write_dataset

REPO = Path(__file__).resolve().parents[1]

# small on purpose (the suite's time budget): every stage runs, with the k sweep and a
# stability refit, the bag-of-events and random baselines, labels and proxies; the
# next-session evaluation is left to the other tests (its bootstrap is partition-independent
# by construction, tested in test_downstream)
SETTINGS = [
    "encoder.epochs=3",
    "encoder.embedding_dim=16",
    "encoder.hidden=32",
    "cluster.k_min=3",
    "cluster.k_max=4",
    "cluster.stability_runs=1",
    "cluster.n_init=1",
    "evaluate.downstream=false",
    "spark.shuffle_partitions=2",
]
TABLES = ("events", "quarantine", "sessions", "session_quarantine", "embeddings", "clusters", "centroids", "cluster_profiles", "metrics")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    c = standalone.start(root, workers=2, cores=1, memory="2g")
    pids = [int(f.read_text()) for f in (root / "pids").glob("*.pid")]
    try:
        yield c
    finally:  # runs when the test fails too
        stopped = standalone.stop(root)
        assert sorted(stopped) == sorted(pids)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_stop_touches_only_its_own_pid_files(tmp_path):
    """A pid file of another cluster dir is not ours; a stale pid file is cleaned up."""
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "spark-seqclust-x-1.pid").write_text("999999999\n")
    assert standalone.stop(tmp_path) == [] and not list((tmp_path / "pids").iterdir())


def test_pipeline_on_a_two_worker_cluster_matches_local(spark, cluster, tmp_path):
    assert cluster.alive_workers() == 2
    data = tmp_path / "data"
    write_dataset(data, users=50, seed=11, bad_rate=0.01)
    common = ["--conf", str(REPO / "conf" / "local.yaml"), "--input", str(data / "events"), "--labels", str(data / "personas")]
    common += ["--run-id", "c1"] + [x for s in SETTINGS for x in ("--set", s)]

    t0 = time.monotonic()
    r = subprocess.run(
        [str(REPO / "spark-submit.sh"), "--master", cluster.master_url, "--executor-memory", "1g"]
        + ["--conf", "spark.executor.cores=1", "--conf", "spark.cores.max=2"]
        + ["pipeline", "--output", str(tmp_path / "on_cluster"), *common],
        capture_output=True,
        text=True,
        timeout=900,
    )
    cluster_s = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "c1: succeeded" in r.stdout

    # the work ran on the cluster: one application, an executor on each worker
    apps = list((cluster.root / "work").glob("app-*"))
    assert len(apps) == 1 and len(list(apps[0].iterdir())) == 2

    t0 = time.monotonic()
    assert main(["run", "--output", str(tmp_path / "local"), *common]) == 0  # the test session: local[2]
    local_s = time.monotonic() - t0
    print(f"pipeline wall time: 2-worker standalone cluster {cluster_s:.0f}s (incl. spark-submit start), local[2] {local_s:.0f}s")

    def table(root: str, name: str):
        df = spark.read.format("delta").load(str(tmp_path / root / name)).where("run_id = 'c1'").drop("run_id")
        for f in df.schema.fields:  # set operations refuse maps: compare their sorted entries
            if isinstance(f.dataType, T.MapType):
                df = df.withColumn(f.name, F.array_sort(F.map_entries(f.name)))
        return df

    for name in TABLES:
        a, b = table("on_cluster", name), table("local", name)
        assert a.count() == b.count(), name
        if name in ("events", "sessions", "session_quarantine", "clusters", "centroids"):
            drop = [c for c in a.columns if c in ("ingested_at", "window_start")]
            assert a.drop(*drop).exceptAll(b.drop(*drop)).count() == 0, name
    for name in ("embeddings",):
        a = {(r["entity_type"], r["entity_id"]): r["embedding"] for r in table("on_cluster", name).collect()}
        b = {(r["entity_type"], r["entity_id"]): r["embedding"] for r in table("local", name).collect()}
        assert a.keys() == b.keys()
        assert max(np.abs(np.asarray(a[x]) - np.asarray(b[x])).max() for x in a) < 1e-5

    # keyed by the segment too: the segment tree's tests share a metric name, one per segment
    def key(r) -> tuple:
        return (r["method"], r["family"], r["metric"], r["k"], json.loads(r["details"] or "{}").get("segment_path"))

    ma = {key(r): r["value"] for r in table("on_cluster", "metrics").collect()}
    mb = {key(r): r["value"] for r in table("local", "metrics").collect()}
    assert ma.keys() == mb.keys()

    def same(x, y) -> bool:  # a figure not measured is null on both sides
        return (x is None and y is None) or (
            x is not None and y is not None and bool(np.isclose(x, y, rtol=1e-6, atol=1e-9, equal_nan=True))
        )

    assert all(same(ma[x], mb[x]) for x in ma), [x for x in ma if ma[x] != mb[x]][:5]
    runs = {root: table(root, "runs").first() for root in ("on_cluster", "local")}
    assert runs["on_cluster"]["encoder_id"] == runs["local"]["encoder_id"]
    conf = {root: json.loads(runs[root]["config_json"]) for root in runs}
    assert conf["on_cluster"]["run"].pop("output") != conf["local"]["run"].pop("output")
    assert conf["on_cluster"] == conf["local"]  # the same configuration but for where it wrote


def test_fine_segments_are_fitted_on_a_bounded_sample_and_find_its_groups(spark, monkeypatch):
    """cluster.fine_fit_users bounds the fine KMeans' input (8 min on all 2.1M users at 100M
    events); the sample still finds well-separated groups, and without the bound every user is used."""
    import dataclasses

    import numpy as np
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from seqclust.core.config import ClusterConfig
    from seqclust.segment import cluster

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (6, 4))
    rows = [(f"u{i}", [float(v) for v in centres[i % 6] + rng.normal(0, 0.1, 4)]) for i in range(3000)]
    users = spark.createDataFrame(rows, "entity_id string, emb array<double>").withColumn("features", array_to_vector(F.col("emb")))
    seen = []
    real = cluster.fit_kmeans
    monkeypatch.setattr(cluster, "fit_kmeans", lambda df, *a, **k: seen.append(df.count()) or real(df, *a, **k))
    cfg = ClusterConfig(fine_k=6, fine_min_users=20, fine_fit_users=1000, n_init=1)
    got = np.array(cluster.fine_centers(users, 3000, 2, 0, cfg))
    assert 700 < seen[-1] < 1300  # about fine_fit_users of the 3,000
    nearest = np.linalg.norm(got[:, None, :] - centres[None, :, :], axis=2).min(axis=0)
    assert nearest.max() < 0.5  # every planted group has a fine centre on it
    cluster.fine_centers(users, 3000, 2, 0, dataclasses.replace(cfg, fine_fit_users=None))
    assert seen[-1] == 3000
