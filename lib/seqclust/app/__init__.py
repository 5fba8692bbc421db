"""Entry points: the pipeline, the command line and the notebook helpers."""
