"""MLflow tracking of a run (``tracking.mlflow: true``).

One MLflow run per seqclust run id, tagged ``seqclust.run_id``: rerunning an id replaces its
MLflow run (the old one is deleted), as every Delta table replaces that run's rows. Logged:
the flattened configuration as params; every metric of the ``metrics`` table as
``<method>.<family>.<metric>`` (so each number sits beside its baselines, with ``.ci_low`` /
``.ci_high`` where there is an interval; the k sweep as ``sweep.<metric>`` with step = k);
the encoder artifact; the HTML report with its charts.

Where: ``tracking.tracking_uri``, else the workspace's server on Databricks, else a SQLite
store under ``<run.output>/_mlflow`` (MLflow's file store is in maintenance mode).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seqclust.core.config import PipelineConfig
from seqclust.core.errors import ConfigError

log = logging.getLogger(__name__)

TAG = "seqclust.run_id"
_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name ('@' and other characters MLflow refuses become '_')."""
    return _BAD.sub("_", ".".join(p.replace("@", "_at_") for p in parts))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def tracking_uri(cfg: PipelineConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if "DATABRICKS_RUNTIME_VERSION" in os.environ:  # pragma: no cover - Databricks only
        return "databricks"
    if "://" in cfg.run.output:
        raise ConfigError("tracking.tracking_uri: set it when run.output is not a local folder")
    root = Path(cfg.run.output).absolute() / "_mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def registry_uri(cfg: PipelineConfig) -> str:
    """Where models are registered: ``tracking.registry_uri``, else Unity Catalog on
    Databricks, else the tracking store."""
    if cfg.tracking.registry_uri:
        return cfg.tracking.registry_uri
    if "DATABRICKS_RUNTIME_VERSION" in os.environ:  # pragma: no cover - Databricks only
        return "databricks-uc"
    return tracking_uri(cfg)


def use_tracking(cfg: PipelineConfig) -> None:
    """Point MLflow's fluent API and client at this configuration's stores."""
    _require_mlflow()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_registry_uri(registry_uri(cfg))


def _require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("tracking.mlflow is on but MLflow is not installed: pip install 'seqclust[mlflow]'") from None


def _metrics(metric_rows: list[dict[str, Any]], record: dict[str, Any], ts: int) -> list[Any]:
    """The MLflow metrics of a run: every measured ``metrics`` row (the sweep with k as the
    step; the segment tree's tests and the per-segment confidence one name per segment; a
    figure not measured left out), the stage seconds and the row counts."""
    from mlflow.entities import Metric

    metrics: list[Any] = []
    for r in metric_rows:
        if r["value"] is None:
            continue
        if r["family"] == "sweep":
            metrics.append(Metric(metric_key("sweep", r["metric"]), float(r["value"]), ts, int(r["k"] or 0)))
            continue
        base = metric_key(r["method"], r["family"], r["metric"])
        if r["family"] in ("hierarchy", "confidence"):  # a figure per segment: the segment's path in the name
            d = json.loads(r.get("details") or "{}")
            path = d.get("segment_path", d.get("segment"))
            if path is not None:
                base = metric_key(r["method"], r["family"], r["metric"], f"segment_{path}")
        if math.isnan(float(r["value"])):
            continue
        metrics.append(Metric(base, float(r["value"]), ts, 0))
        for end in ("ci_low", "ci_high"):
            if r.get(end) is not None:
                metrics.append(Metric(f"{base}.{end}", float(r[end]), ts, 0))
    for stage, secs in (record.get("stage_seconds") or {}).items():
        metrics.append(Metric(metric_key("stage_seconds", stage), float(secs), ts, 0))
    for name in ("rows_input", "rows_clean", "rows_quarantined", "rows_duplicates", "sessions", "users"):
        if record.get(name) is not None:
            metrics.append(Metric(name, float(record[name]), ts, 0))
    return metrics


def log_run(
    cfg: PipelineConfig,
    run_id: str,
    record: dict[str, Any],
    metric_rows: list[dict[str, Any]],
    encoder_path: str | None,
    report_path: str | None,
    also: Callable[[], None] | None = None,
) -> str:
    """Log one seqclust run to MLflow; return the MLflow run id. ``also``: more to log into
    the same MLflow run while it is active (the fluent API's run: the segments model)."""
    _require_mlflow()
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    for old in client.search_runs([exp_id], filter_string=f"tags.`{TAG}` = '{run_id}'"):
        client.delete_run(old.info.run_id)  # one live MLflow run per seqclust run id
        log.info("mlflow: replaced run %s of %s", old.info.run_id, run_id)
    run = client.create_run(exp_id, run_name=run_id, tags={TAG: run_id, "seqclust.status": str(record.get("status"))})
    mid = run.info.run_id
    try:
        params = _flatten(cfg.to_dict(), "conf.")
        params.update(
            {
                "encoder_id": str(record.get("encoder_id")),
                "k": str(record.get("k")),
                "input_path": str(record.get("input_path"))[:500],
                "git_commit": str(record.get("git_commit")),
            }
        )
        items = sorted(params.items())

        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(mid, params=[Param(k, v) for k, v in items[i : i + 100]])
        metrics = _metrics(metric_rows, record, int(time.time() * 1000))
        for i in range(0, len(metrics), 1000):
            client.log_batch(mid, metrics=metrics[i : i + 1000])
        if encoder_path and Path(encoder_path).is_dir():
            client.log_artifacts(mid, encoder_path, "encoder")
        if report_path and Path(report_path).is_file():
            client.log_artifacts(mid, str(Path(report_path).parent), "report")
        if also is not None:
            import mlflow

            use_tracking(cfg)
            with mlflow.start_run(run_id=mid):
                also()
        client.set_terminated(mid, "FINISHED" if record.get("status") == "succeeded" else "FAILED")
    except Exception:
        client.set_terminated(mid, "FAILED")
        raise
    log.info(
        "mlflow: run %s logged as %s (experiment %s, %s): %d params, %d metrics",
        run_id,
        mid,
        cfg.tracking.experiment,
        uri,
        len(items),
        len(metrics),
    )
    return mid
