"""Distributed training on Dask workers: launch, the ``ctx`` user code sees, runs."""

from .context import TrainContext
from .launch import active_runs, launch, train
from .run import Run, TrainingError

__all__ = ["Run", "TrainContext", "TrainingError", "active_runs", "launch", "train"]
