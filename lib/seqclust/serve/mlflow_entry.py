"""MLflow's models-from-code entry for seqclust's segments model (``serve.mlflow_model``):
MLflow runs this file to make the model object instead of unpickling one."""

from mlflow.models import set_model

from seqclust.serve.mlflow_model import SegmentsModel

set_model(SegmentsModel())
