"""Distributed training on Dask workers: launch, the ``ctx`` user code sees, runs.

torch is imported only where training code runs (workers) or when ``TrainContext`` is asked
for, so the Jupyter server extension loads fast.
"""

from typing import Any

from .launch import active_runs, launch, train
from .run import Run, TrainingError

__all__ = ["Run", "TrainContext", "TrainingError", "active_runs", "launch", "train"]


def __getattr__(name: str) -> Any:
    if name == "TrainContext":
        from .context import TrainContext

        return TrainContext
    raise AttributeError(name)
