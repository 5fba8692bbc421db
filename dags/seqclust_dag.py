"""Airflow DAGs for seqclust (Airflow 2.10+ / 3.x with the apache-spark and databricks providers).

``seqclust``: one task per stage, each a SparkSubmitOperator that runs ``spark-submit.sh <stage>``
(the connection ``spark_seqclust`` gives the master: ``spark://host:7077``, ``yarn``, ``local[*]``).
``seqclust_databricks``: the same stages as one Databricks run (DatabricksSubmitRunOperator),
tasks chained with ``depends_on``, on a job cluster with the seqclust wheel.

Both derive the run id from the logical date (``{{ ds }}``): a retried task or a cleared DAG
run writes the same run id, and every stage replaces that run's rows, so retries are
idempotent; the Databricks submission also carries ``idempotency_token = seqclust-{{ ds }}``.

Settings (environment of the scheduler, or Airflow Variables of the same names):
SEQCLUST_HOME (the checkout with spark-submit.sh; default: this file's repository),
SEQCLUST_CONF (config file), SEQCLUST_INPUT (raw events, templated: ``.../date={{ ds }}``),
SEQCLUST_OUTPUT (tables root), SEQCLUST_DATABRICKS_WHEEL (wheel path on DBFS/volume).
This file does not import seqclust: DAG parsing stays light and needs no Spark.

Live segments (``seqclust stream``) are not a DAG: a stream is a long-lived process, not a
task with an end. Run ``spark-submit.sh stream --model RUN_ID --input PATH --checkpoint DIR``
under a supervisor that restarts it (systemd, Kubernetes, or the bundle's ``seqclust-live``
continuous job on Databricks); it resumes from its checkpoint. A scheduled alternative is a
task running ``stream ... --available-now`` every N minutes: it drains what arrived and stops.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

try:  # Airflow 3
    from airflow.sdk import DAG, chain
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.models.baseoperator import chain

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.databricks.operators.databricks import DatabricksSubmitRunOperator

STAGES = ("ingest", "sessionize", "train", "embed", "cluster", "evaluate")
HOME = Path(os.environ.get("SEQCLUST_HOME", Path(__file__).resolve().parents[1]))
CONF = os.environ.get("SEQCLUST_CONF", str(HOME / "conf" / "local.yaml"))
INPUT = os.environ.get("SEQCLUST_INPUT", str(HOME / "data" / "events" / "date={{ ds }}"))
OUTPUT = os.environ.get("SEQCLUST_OUTPUT", str(HOME / "out"))
RUN_ID = "{{ ds }}"

DEFAULT_ARGS = {"owner": "seqclust", "retries": 1, "retry_delay": timedelta(minutes=5)}


def stage_args(stage: str, conf: str = CONF, input_: str = INPUT, output: str = OUTPUT) -> list[str]:
    """The job arguments of one stage (the same for spark-submit.sh and the wheel's entry point)."""
    args = ["--run-id", RUN_ID, "--conf", conf, "--output", output]
    return args + (["--input", input_] if stage == "ingest" else [])


with DAG(
    dag_id="seqclust",
    description="Event logs to user segments and their evaluation, one Spark job per stage",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["seqclust"],
) as spark_dag:
    chain(
        *[
            SparkSubmitOperator(
                task_id=stage,
                conn_id="spark_seqclust",
                spark_binary=str(HOME / "spark-submit.sh"),  # ships the package, Delta and the conf file
                application=stage,  # spark-submit.sh takes the job name where spark-submit takes a file
                application_args=stage_args(stage),
                name=f"seqclust-{stage}",
                env_vars={"TF_CPP_MIN_LOG_LEVEL": "2"},
            )
            for stage in STAGES
        ]
    )

WHEEL = os.environ.get("SEQCLUST_DATABRICKS_WHEEL", "/Volumes/main/seqclust/artifacts/wheels/seqclust-0.1.0-py3-none-any.whl")
DBX_CONF = os.environ.get("SEQCLUST_DATABRICKS_CONF", "/Workspace/Shared/seqclust/conf/databricks.yaml")
DBX_INPUT = os.environ.get("SEQCLUST_DATABRICKS_INPUT", "/Volumes/main/raw/events/date={{ ds }}")
DBX_OUTPUT = os.environ.get("SEQCLUST_DATABRICKS_OUTPUT", "/Volumes/main/seqclust/artifacts")


def databricks_tasks() -> list[dict]:
    tasks = []
    for i, stage in enumerate(STAGES):
        params = [stage, *stage_args(stage, DBX_CONF, DBX_INPUT, DBX_OUTPUT)]
        task = {
            "task_key": stage,
            "job_cluster_key": "seqclust",
            "libraries": [{"whl": WHEEL}],
            "python_wheel_task": {"package_name": "seqclust", "entry_point": "seqclust", "parameters": params},
        }
        if i:
            task["depends_on"] = [{"task_key": STAGES[i - 1]}]
        tasks.append(task)
    return tasks


with DAG(
    dag_id="seqclust_databricks",
    description="The seqclust stages as one Databricks run",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["seqclust", "databricks"],
) as databricks_dag:
    DatabricksSubmitRunOperator(
        task_id="pipeline",
        databricks_conn_id="databricks_default",
        run_name="seqclust-{{ ds }}",
        idempotency_token="seqclust-{{ ds }}",
        json={
            "job_clusters": [
                {
                    "job_cluster_key": "seqclust",
                    "new_cluster": {
                        "spark_version": "16.4.x-cpu-ml-scala2.12",
                        "node_type_id": "i3.xlarge",
                        "num_workers": 2,
                        "spark_env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"},
                    },
                }
            ],
        },
        tasks=databricks_tasks(),
    )
