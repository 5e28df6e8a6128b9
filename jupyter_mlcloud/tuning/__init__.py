"""Hyperparameter tuning: Optuna's ask/tell in the kernel, each trial an ordinary run.

``mlc.tune(fn, space=..., n_trials=..., metric=...)`` asks Optuna for a trial, starts it
with ``mlc.train`` on ``workers_per_trial`` free workers, feeds rank 0's ``ctx.report``
values to ``trial.report`` and cancels the run as soon as the pruner says so. Nothing here
imports optuna, torch or mlflow at module level: a kernel pays for them when it tunes.
"""

from __future__ import annotations

from .space import SpaceError, parse_space
from .study import tune

__all__ = ["SpaceError", "parse_space", "tune"]
