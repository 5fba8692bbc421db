"""Databricks surface: the bundle's structure, and the notebooks run cell by cell against the
local session with `dbutils` stubbed (tables in the metastore, as on Unity Catalog; MLflow
tracking on, read back from its local store)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import seqclust.core.stages
from seqclust.app.notebook import WIDGETS, cli_args, run_id_for
from seqclust.datasets.generated import write_dataset

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))
STAGES = list(seqclust.core.stages.STAGES)  # the one list; the DAG and the bundle keep copies held to it here


class NotebookExit(Exception):
    pass


class _Widgets:
    def __init__(self, values: dict[str, str]):
        self.values, self.created = dict(values), {}

    def text(self, name, default, label=None):
        self.created[name] = label
        self.values.setdefault(name, default)  # a job parameter / earlier value wins, as on Databricks

    def get(self, name):
        if name not in self.created:
            raise ValueError(f"InputWidgetNotDefined: {name}")
        return self.values[name]


class _Notebook:
    def exit(self, value):
        raise NotebookExit(value)


class DBUtils:
    def __init__(self, values):
        self.widgets, self.notebook = _Widgets(values), _Notebook()


def run_cells(path: Path, dbutils: DBUtils, spark) -> tuple[dict, list]:
    src = path.read_text()
    assert src.startswith("# Databricks notebook source\n"), path
    shown: list = []
    ns = {"dbutils": dbutils, "spark": spark, "display": shown.append, "__name__": "__main__"}
    for i, cell in enumerate(src.split("\n# COMMAND ----------\n")):
        code = compile(cell, f"{path.name}[cell {i}]", "exec")
        try:
            exec(code, ns)
        except NotebookExit as e:
            ns["__exit__"] = e.args[0]
            break
    return ns, shown


def test_bundle_tasks_point_at_entry_points_and_run_in_order():
    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    entry_points = set(re.findall(r'"(\w+)=seqclust\.app\.cli:main"', (REPO / "setup.py").read_text()))
    job = bundle["resources"]["jobs"]["seqclust"]
    tasks = job["tasks"]
    assert [t["task_key"] for t in tasks] == STAGES
    from seqclust.app.cli import build_parser

    parser = build_parser()
    for i, t in enumerate(tasks):
        assert t.get("depends_on", []) == ([{"task_key": STAGES[i - 1]}] if i else [])
        w = t["python_wheel_task"]
        assert w["package_name"] == "seqclust" and w["entry_point"] in entry_points
        params = w["parameters"]
        assert params[0] == t["task_key"]
        assert params[params.index("--run-id") + 1] == "{{job.parameters.run_date}}"
        assert params[params.index("--conf") + 1].endswith("/conf/databricks.yaml")
        parser.parse_args(params)  # the CLI accepts the task's arguments as they are
        assert t["libraries"] == [{"whl": "./dist/*.whl"}] and t["job_cluster_key"] == job["job_clusters"][0]["job_cluster_key"]
    assert job["schedule"]["pause_status"] == "PAUSED"
    assert bundle["targets"]["dev"]["mode"] == "development"
    assert bundle["targets"]["prod"]["resources"]["jobs"]["seqclust"]["schedule"]["pause_status"] == "UNPAUSED"
    assert {"catalog", "schema"} <= set(bundle["variables"])
    assert (REPO / "conf" / "databricks.yaml").is_file()
    from seqclust.core.config import load_config

    cfg = load_config(REPO / "conf" / "databricks.yaml")
    assert cfg.tables.catalog and cfg.tables.schema and cfg.spark.master is None


def test_widget_arguments_and_run_id_from_the_date():
    import datetime as dt

    from seqclust.core.errors import ConfigError

    assert run_id_for("2026-11-27") == "2026-11-27" and run_id_for("", dt.date(2026, 1, 2)) == "2026-01-02"
    with pytest.raises(ConfigError, match="run_date"):
        run_id_for("yesterday")
    vals = {k: d for k, (d, _) in WIDGETS.items()} | {
        "run_date": "2026-11-27",
        "input": "/raw/date={run_date}",
        "overrides": "a.b=1; c.d=2",
    }
    args = cli_args(vals.get)
    assert args[:3] == ["run", "--run-id", "2026-11-27"] and "/raw/date=2026-11-27" in args
    assert args[-4:] == ["--set", "a.b=1", "--set", "c.d=2"]
    with pytest.raises(ConfigError, match="model_run"):
        cli_args((vals | {"command": "assign"}).get)
    with pytest.raises(ConfigError, match="not one of"):
        cli_args((vals | {"command": "drop"}).get)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_compile(nb):
    src = nb.read_text()
    assert src.startswith("# Databricks notebook source\n")
    for i, cell in enumerate(src.split("\n# COMMAND ----------\n")):
        compile(cell, f"{nb.name}[cell {i}]", "exec")


def test_notebooks_run_the_pipeline_into_metastore_tables_and_mlflow(spark, tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is a dev dependency (pip install -e '.[dev]')")
    from mlflow.tracking import MlflowClient

    data = tmp_path / "data"
    write_dataset(data, users=60, seed=5, bad_rate=0.01)
    schema = f"seqclust_nb{abs(hash(str(tmp_path))) % 10**8}"
    spark.sql(f"CREATE SCHEMA spark_catalog.{schema} LOCATION '{tmp_path / 'warehouse'}'")
    small = "encoder.epochs=2; encoder.embedding_dim=8; encoder.hidden=16; cluster.k=3; evaluate.bootstrap=20; spark.shuffle_partitions=2"
    values = {
        "conf": str(REPO / "conf" / "databricks.yaml"),
        "run_date": "2026-11-27",
        "input": str(data / "events"),
        "labels": str(data / "personas"),
        "output": str(tmp_path / "volume"),
        "catalog": "spark_catalog",
        "schema": schema,
        "overrides": small,
    }
    try:
        ns, shown = run_cells(REPO / "notebooks" / "seqclust_pipeline.py", DBUtils(values), spark)
        assert ns["__exit__"] == "2026-11-27"  # the run id is the run date
        (runs,) = shown
        rec = runs.first()
        assert rec["status"] == "succeeded" and rec["rows_input"] == rec["rows_clean"] + rec["rows_quarantined"] + rec["rows_duplicates"]
        clusters = spark.table(f"spark_catalog.{schema}.clusters").where("run_id = '2026-11-27'")
        assert clusters.where("granularity = 'coarse'").count() == clusters.where("granularity = 'leaf'").count() == 60
        assert not (tmp_path / "volume" / "clusters").exists()  # tables in the metastore, artifacts on the "volume"
        assert Path(rec["report_path"]).is_file()

        # MLflow: one run tagged with the run id, every method's metrics, the encoder and the report
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'volume' / '_mlflow' / 'mlflow.db'}")
        exp = client.get_experiment_by_name("/Shared/seqclust")
        (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`seqclust.run_id` = '2026-11-27'")
        assert run.info.run_id == rec["mlflow_run_id"] and run.info.status == "FINISHED"
        m = run.data.metrics
        for method in ("encoder", "bag_of_events", "random"):
            assert f"{method}.external.ari" in m and f"{method}.internal.silhouette" in m
        assert m["encoder.external.ari"] == pytest.approx(
            spark.table(f"spark_catalog.{schema}.metrics")
            .where("run_id = '2026-11-27' AND method = 'encoder' AND metric = 'ari'")
            .first()["value"]
        )
        assert any(k.endswith(".ci_low") for k in m) and run.data.params["conf.cluster.k"] == "3"
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"encoder", "report"} <= arts
        assert "report/report.html" in {a.path for a in client.list_artifacts(run.info.run_id, "report")}

        ns, shown = run_cells(REPO / "notebooks" / "seqclust_explore.py", DBUtils(values), spark)
        profiles, beside, sweep = shown
        assert profiles.count() == 3
        assert {"encoder", "bag_of_events", "random"} <= set(beside.columns)
        assert beside.where("metric = 'ari'").first()["encoder"] is not None
    finally:
        spark.sql(f"DROP SCHEMA spark_catalog.{schema} CASCADE")
