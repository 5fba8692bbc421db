"""MLflow tracking without Spark: what is logged, names MLflow accepts, one run per run id."""

from pathlib import Path

import pytest

from seqclust.core.config import load_config
from seqclust.runtime.tracking import TAG, log_run, metric_key, tracking_uri

mlflow = pytest.importorskip("mlflow", reason="MLflow is a dev dependency (pip install -e '.[dev]')")


def test_metric_keys_are_mlflow_safe():
    assert metric_key("encoder", "downstream", "hitrate@10_categories_own") == "encoder.downstream.hitrate_at_10_categories_own"
    assert metric_key("a", "b(c)") == "a.b_c_"


def test_log_run_records_metrics_with_baselines_and_replaces_a_rerun(tmp_path):
    cfg = load_config(None, overrides=[f"run.output={tmp_path / 'out'}", "tracking.mlflow=true", "tracking.experiment=exp1"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'out' / '_mlflow' / 'mlflow.db'}"
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.json").write_text("{}")
    report = tmp_path / "rep" / "report.html"
    report.parent.mkdir()
    report.write_text("<html></html>")
    rows = [
        {"method": "encoder", "family": "external", "metric": "ari", "value": 0.9, "k": 5, "ci_low": None, "ci_high": None},
        {"method": "random", "family": "external", "metric": "ari", "value": 0.001, "k": 5, "ci_low": None, "ci_high": None},
        {
            "method": "encoder",
            "family": "downstream",
            "metric": "hitrate@10_items_global",
            "value": 0.3,
            "k": 5,
            "ci_low": 0.25,
            "ci_high": 0.35,
        },
        {"method": "encoder", "family": "sweep", "metric": "silhouette", "value": 0.4, "k": 4, "ci_low": None, "ci_high": None},
        {"method": "encoder", "family": "sweep", "metric": "silhouette", "value": 0.5, "k": 5, "ci_low": None, "ci_high": None},
        {"method": "encoder", "family": "drift", "metric": "psi_cluster_shares", "value": None, "k": 5, "ci_low": None, "ci_high": None},
        # the segment tree's tests: one per segment, told apart by its path
        {"method": "leaf", "family": "hierarchy", "metric": "split_gap", "value": 0.2, "k": 3, "details": '{"segment_path": "1"}'},
        {"method": "leaf", "family": "hierarchy", "metric": "split_gap", "value": 0.01, "k": 2, "details": '{"segment_path": "1.2"}'},
        {
            "method": "leaf",
            "family": "hierarchy",
            "metric": "split_temporal_ari",
            "value": float("nan"),
            "k": 2,
            "details": '{"segment_path": "1.2"}',
        },
    ]
    record = {"status": "succeeded", "k": 5, "encoder_id": "abc", "stage_seconds": {"ingest": 1.5}, "rows_input": 10}
    first = log_run(cfg, "r1", record, rows, str(enc), str(report))
    client = mlflow.tracking.MlflowClient(tracking_uri(cfg))
    run = client.get_run(first)
    m = run.data.metrics
    assert m["encoder.external.ari"] == 0.9 and m["random.external.ari"] == 0.001
    assert m["encoder.downstream.hitrate_at_10_items_global.ci_low"] == 0.25
    assert [(x.step, x.value) for x in client.get_metric_history(first, "sweep.silhouette")] == [(4, 0.4), (5, 0.5)]
    assert m["stage_seconds.ingest"] == 1.5 and m["rows_input"] == 10
    assert not any("psi" in k for k in m)  # a missing value is not logged as a number
    assert m["leaf.hierarchy.split_gap.segment_1"] == 0.2 and m["leaf.hierarchy.split_gap.segment_1.2"] == 0.01
    assert not any("split_temporal_ari" in k for k in m)  # a test not measured is not logged
    assert run.data.params["conf.cluster.k_min"] == str(cfg.cluster.k_min) and run.data.tags[TAG] == "r1"
    assert {a.path for a in client.list_artifacts(first)} == {"encoder", "report"}
    assert run.info.status == "FINISHED"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "out" / "_mlflow")

    # the same run id again: its MLflow run is replaced, another run id is added beside it
    second = log_run(cfg, "r1", {**record, "status": "failed"}, rows, None, None)
    other = log_run(cfg, "r2", record, rows, None, None)
    exp = client.get_experiment_by_name("exp1")
    live = {r.info.run_id: r.data.tags[TAG] for r in client.search_runs([exp.experiment_id])}
    assert live == {second: "r1", other: "r2"}
    assert client.get_run(second).info.status == "FAILED"
