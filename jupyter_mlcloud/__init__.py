"""jupyter_mlcloud: distributed PyTorch on Dask clusters, from Jupyter cells.

    import jupyter_mlcloud as mlc
    cluster = mlc.up(workers=2)        # LocalCUDACluster on GPUs, else LocalCluster
    mlc.status()                       # every cluster this machine's Jupyter knows

In IPython: ``%load_ext jupyter_mlcloud`` then ``%mlcloud up --workers 2``.
"""

from __future__ import annotations

from typing import Any

from .cluster.api import (
    ClusterHandle,
    adapt,
    connect,
    current,
    down,
    get,
    list_clusters,
    scale,
    status,
    up,
)
from .cluster.hardware import gpu_count
from .cluster.tls import ClusterCertificates, cluster_certificates

# Eager, like ``train`` below: ``export`` is also a subpackage. It loads no torch or onnx.
from .export import ExportError, ExportResult, export
from .scoring.api import score
from .tracking.registry import register
from .tracking.registry import table as models

# Eager on purpose: ``train`` is also a subpackage, and a later import of it would otherwise
# bind the module in the function's place. Nothing here loads torch or pandas.
from .train import Run, TrainingError, train

__version__ = "0.1.0"

__all__ = [
    "ClusterCertificates",
    "ClusterHandle",
    "Endpoint",
    "ExportError",
    "ExportResult",
    "Run",
    "TrainContext",
    "TrainingError",
    "adapt",
    "cluster_certificates",
    "connect",
    "current",
    "down",
    "endpoints",
    "export",
    "get",
    "gpu_count",
    "list_clusters",
    "models",
    "pipeline",
    "register",
    "scale",
    "score",
    "serve",
    "status",
    "train",
    "tune",
    "up",
]


def __getattr__(name: str) -> Any:
    if name == "TrainContext":  # imports torch: only when asked for
        from .train.rank.context import TrainContext

        return TrainContext
    if name == "tune":  # optuna loads when a study starts, not with the package
        from .tuning.study import tune

        return tune
    if name == "pipeline":  # pipelines load mlflow when one runs, not with the package
        from .pipelines.pipeline import pipeline

        return pipeline
    if name in ("serve", "endpoints", "Endpoint"):  # serving loads on first use
        from .serving import api as serving_api

        return getattr(serving_api, name)
    raise AttributeError(name)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext jupyter_mlcloud``: register the magics."""
    from .magics import register

    register(ipython)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "jupyter-mlcloud"}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "jupyter_mlcloud.server"}]
