"""A model run as an MLflow model: a ``pyfunc`` a search or recommendation service calls with
the events of one or more users and gets their segments back (``seqclust.serve.request``).

Logged from code (``mlflow_entry.py``, MLflow's models-from-code: the Python object is not
pickled), with the model run's folder (``serve.bundle``: the encoder's files and
``segments.json``) as its one artifact and this package as its code, a signature and an input
example. Registered under ``tracking.registered_model`` (locally the SQLite registry beside
the tracking store; on Databricks a Unity Catalog name ``catalog.schema.model``), one version
per model run, tagged with the seqclust run id; ``seqclust promote`` sets an alias on it
(``champion``), which ``mlflow models serve -m models:/<name>@champion`` and Databricks Model
Serving resolve.

A bad request (``request.BadRequest``) becomes MLflow's ``INVALID_PARAMETER_VALUE``: HTTP 400
with the one-line reason, and the server keeps serving.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

from seqclust.serve.request import OPTIONAL, OUTPUT, REQUIRED, BadRequest

log = logging.getLogger(__name__)

ENTRY = Path(__file__).with_name("mlflow_entry.py")
ARTIFACT = "model"  # the model run's folder, inside the MLflow model
TAG = "seqclust.run_id"


class SegmentsModel(PythonModel):
    """``predict(events)`` -> one row per user (``request.OUTPUT``)."""

    def load_context(self, context: Any) -> None:
        from seqclust.serve.request import Segmenter

        self.segmenter = Segmenter(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # MLflow reads hints as a schema
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            return self.segmenter.score(frame)
        except BadRequest as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    kinds = {"price": "double"}
    inputs = Schema([ColSpec(kinds.get(c, "string"), c, required=c in REQUIRED) for c in (*REQUIRED, *OPTIONAL)])
    out_kinds = {
        "cluster_id": "integer",
        "leaf_id": "integer",
        "distance_to_centroid": "double",
        "confidence": "double",
        "leaf_confidence": "double",
        "sessions": "long",
        "events": "long",
    }
    outputs = Schema([ColSpec(out_kinds.get(c, "string"), c) for c in OUTPUT])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """What a fresh serving environment installs: this package's libraries at the versions
    that made the model (the package itself travels as the model's code)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow-skinny", "numpy", "pandas", "pyarrow", "scikit-learn", "keras", "tensorflow-cpu", "torch", "pyspark", "PyYAML"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


def log_segments_model(folder: str | Path, run_id: str, registered_model: str | None, example: Any = None) -> tuple[str, str | None]:
    """Log the model run's ``folder`` as an MLflow model in the active MLflow run; register it
    under ``registered_model`` (a version per call) tagged with ``run_id``. Returns the model's
    URI and the registered version (None when not registered)."""
    import mlflow.pyfunc

    import seqclust

    package = Path(seqclust.__file__).parent
    # MLflow 3 names a logged model ``name``; MLflow 2 (the 16.4 / 17.3 LTS ML runtimes) ``artifact_path``
    where = {"name": "segments"} if int(mlflow.__version__.split(".")[0]) >= 3 else {"artifact_path": "segments"}
    info = mlflow.pyfunc.log_model(
        **where,
        python_model=str(ENTRY),
        artifacts={ARTIFACT: str(folder)},
        code_paths=[str(package)],
        signature=signature(),
        input_example=example,
        pip_requirements=requirements(),
        registered_model_name=registered_model,
    )
    version = None
    if registered_model:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        version = getattr(info, "registered_model_version", None)
        if version is None:  # older MLflow: the newest version of this MLflow run
            mine = [v for v in client.search_model_versions(f"name='{registered_model}'") if v.run_id == info.run_id]
            version = max(mine, key=lambda v: int(v.version)).version if mine else None
        if version is not None:
            version = str(version)
            client.set_model_version_tag(registered_model, version, TAG, run_id)
    log.info("mlflow: model of run %s logged as %s%s", run_id, info.model_uri, f", {registered_model} version {version}" if version else "")
    return info.model_uri, version


def promote(registered_model: str, run_id: str, alias: str) -> str:
    """Point ``alias`` of ``registered_model`` at the version made by seqclust run ``run_id``;
    return that version. A clear error when the run has no registered version."""
    from mlflow.tracking import MlflowClient

    from seqclust.core.errors import InputError

    client = MlflowClient()
    versions = [v for v in client.search_model_versions(f"name='{registered_model}'") if (v.tags or {}).get(TAG) == run_id]
    if not versions:
        raise InputError(f"promote: no version of model {registered_model} was registered by run {run_id} (was tracking.mlflow on?)")
    newest = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(registered_model, alias, newest.version)
    log.info("mlflow: %s@%s -> version %s (run %s)", registered_model, alias, newest.version, run_id)
    return str(newest.version)
