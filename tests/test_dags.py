"""The Airflow DAGs load with Airflow's own DagBag, without import errors, in stage order.

Airflow lives in its own environment (.venv-airflow, made by `make airflow`; CI makes it):
its pins (pandas 3, SQLAlchemy 2.1, ...) are not ours, and a scheduler host does not need
Spark or TensorFlow to parse the DAG file.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import seqclust.stages

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_PY = Path(os.environ.get("SEQCLUST_AIRFLOW_PYTHON", REPO / ".venv-airflow" / "bin" / "python"))
STAGES = list(seqclust.stages.STAGES)  # the one list; the DAG and the bundle keep copies held to it here

PROBE = r"""
import json, sys
try:
    from airflow.dag_processing.dagbag import DagBag
except ImportError:
    from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag in bag.dags.values():
    tasks = {}
    for t in dag.tasks:
        d = {"upstream": sorted(t.upstream_task_ids), "type": type(t).__name__}
        for attr in ("application", "application_args", "idempotency_token", "run_name", "json", "tasks", "_spark_binary", "spark_binary"):
            if hasattr(t, attr):
                d[attr.lstrip("_")] = getattr(t, attr)
        tasks[t.task_id] = d
    out["dags"][dag.dag_id] = {"tasks": tasks, "schedule": str(getattr(dag, "schedule", None) or getattr(dag, "schedule_interval", None)), "max_active_runs": dag.max_active_runs}
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    if not AIRFLOW_PY.exists():
        pytest.skip(f"Airflow is not installed ({AIRFLOW_PY} missing; `make airflow` creates it, CI runs it)")
    home = tmp_path_factory.mktemp("airflow_home")
    env = dict(os.environ, AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False", SEQCLUST_HOME=str(REPO))
    r = subprocess.run([str(AIRFLOW_PY), "-c", PROBE, str(REPO / "dags")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_dags_load_without_import_errors(dagbag):
    assert dagbag["import_errors"] == {}
    assert set(dagbag["dags"]) == {"seqclust", "seqclust_databricks"}


def test_spark_dag_runs_each_stage_through_spark_submit_sh_in_order(dagbag):
    dag = dagbag["dags"]["seqclust"]
    assert dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert list(tasks) == STAGES or sorted(tasks) == sorted(STAGES)
    for i, stage in enumerate(STAGES):
        t = tasks[stage]
        assert t["type"] == "SparkSubmitOperator"
        assert t["upstream"] == ([STAGES[i - 1]] if i else [])
        assert Path(t["spark_binary"]) == REPO / "spark-submit.sh" and os.access(t["spark_binary"], os.X_OK)
        assert t["application"] == stage and (REPO / "jobs" / f"{stage}.py").is_file()
        args = t["application_args"]
        # the run id is the logical date: a retry rewrites the same run's rows
        assert args[args.index("--run-id") + 1] == "{{ ds }}"
        assert ("--input" in args) == (stage == "ingest")


def test_databricks_dag_submits_the_stages_with_an_idempotency_token(dagbag):
    (task,) = dagbag["dags"]["seqclust_databricks"]["tasks"].values()
    assert task["type"] == "DatabricksSubmitRunOperator"
    assert task["idempotency_token"] == "seqclust-{{ ds }}"
    assert task["json"]["job_clusters"][0]["job_cluster_key"] == "seqclust"
    tasks = task["tasks"]
    assert [t["task_key"] for t in tasks] == STAGES
    entry_points = set(re.findall(r'"(\w+)=seqclust\.cli:main"', (REPO / "setup.py").read_text()))
    for i, t in enumerate(tasks):
        assert t.get("depends_on", []) == ([{"task_key": STAGES[i - 1]}] if i else [])
        wheel = t["python_wheel_task"]
        assert wheel["package_name"] == "seqclust" and wheel["entry_point"] in entry_points
        assert wheel["parameters"][0] == STAGES[i] and wheel["parameters"][wheel["parameters"].index("--run-id") + 1] == "{{ ds }}"
