"""Distributed training on Dask workers.

The kernel side lives here: :mod:`.launch` (``mlc.train``, picking workers, starting ranks,
recovery), :mod:`.options` (every run option, checked without torch), :mod:`.run` (the
``Run`` handle and its lifecycle), :mod:`.commits` (which workers hold which commit: metadata
only), :mod:`.checkpoint` (what a commit is made of, and the checkpoint directory),
:mod:`.registry` (the active runs) and :mod:`.cell` (a ``%%distributed_train`` cell as a
payload). What runs on the workers is in :mod:`.rank` and :mod:`.strategies`.

torch is imported only where training code runs (workers) or when ``TrainContext`` is asked
for, so the Jupyter server extension loads fast.
"""

from typing import Any

from .launch import active_runs, launch, train
from .run import Run, TrainingError

__all__ = ["Run", "TrainContext", "TrainingError", "active_runs", "launch", "train"]


def __getattr__(name: str) -> Any:
    if name == "TrainContext":
        from .rank.context import TrainContext

        return TrainContext
    raise AttributeError(name)
