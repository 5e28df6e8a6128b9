"""MLflow tracking and the model registry: every run, score and model version in MLflow.

Nothing here imports mlflow until a run is recorded or a model is looked up, so kernels and
the Jupyter server start without it.
"""
