"""The stages of a run, in order: the one list every entry point reads.

The CLI's subcommands, the pipeline's registry of stage functions, the notebook's commands and
``jobs/`` come from here; the Airflow DAG (``dags/``, which must not import seqclust) and the
Databricks bundle (``databricks.yml``) keep their own copy, and ``tests/test_dags.py`` /
``tests/test_notebooks.py`` hold both to this one. No heavy imports: the CLI reads it before
Spark starts.
"""

from __future__ import annotations

STAGES: tuple[str, ...] = ("ingest", "sessionize", "train", "embed", "cluster", "evaluate")

ABOUT = {
    "ingest": "read the source, validate, quarantine bad rows, de-duplicate: events",
    "sessionize": "cut each user's events into sessions: sessions, session_quarantine",
    "train": "train the sequence encoder on a sample: a versioned artifact",
    "embed": "session and user vectors on the executors: embeddings",
    "cluster": "choose k, fit the personas and fine segments: clusters, centroids, cluster_profiles",
    "evaluate": "every metric family beside the baselines: metrics",
}
assert tuple(ABOUT) == STAGES
