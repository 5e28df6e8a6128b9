"""The pipeline step a run is started in, so that its MLflow run is filed under that step.

The pipeline runner sets the step (:func:`in_step`) while it runs a step in this process; a
step run in a kernel of its own (a notebook step) gets the same facts as environment variables
(:func:`step_env`). Tracking reads :func:`run_tags` when it creates a run: the run becomes a
child of the step's MLflow run (``mlflow.parentRunId``) and carries ``mlcloud.pipeline``,
``mlcloud.pipeline.step`` and ``mlcloud.pipeline.run``. Nothing here imports MLflow.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

#: StepContext field -> the environment variable a step's own kernel reads it from.
ENV = {"pipeline": "MLCLOUD_PIPELINE", "step": "MLCLOUD_PIPELINE_STEP",
       "pipeline_run": "MLCLOUD_PIPELINE_RUN", "step_run": "MLCLOUD_PIPELINE_STEP_RUN"}


@dataclass
class StepContext:
    """A running pipeline step: names, its MLflow runs, and the runs started in it."""

    pipeline: str
    step: str
    pipeline_run: str | None = None  # the pipeline run's MLflow run
    step_run: str | None = None  # the step's MLflow run: the parent of runs started in it
    started: list[Any] = field(default_factory=list)  # run ids, or recorders (``.created()``)


_current: ContextVar[StepContext | None] = ContextVar("mlcloud_pipeline_step", default=None)


@contextlib.contextmanager
def in_step(step: StepContext) -> Iterator[StepContext]:
    """Make ``step`` the step that runs started in this thread (or task) belong to."""
    token = _current.set(step)
    try:
        yield step
    finally:
        _current.reset(token)


def active() -> StepContext | None:
    """The step running now: set by :func:`in_step`, else from the environment."""
    step = _current.get()
    if step is not None:
        return step
    pipeline, name = os.environ.get(ENV["pipeline"]), os.environ.get(ENV["step"])
    if pipeline and name:
        return StepContext(pipeline, name, os.environ.get(ENV["pipeline_run"]) or None,
                           os.environ.get(ENV["step_run"]) or None)
    return None


def step_env(step: StepContext) -> dict[str, str]:
    """The environment variables that carry ``step`` into another process."""
    return {var: str(getattr(step, key)) for key, var in ENV.items()
            if getattr(step, key) is not None}


def run_tags() -> dict[str, str]:
    """The MLflow tags of a run started now: empty outside a pipeline step."""
    step = active()
    if step is None:
        return {}
    tags = {"mlcloud.pipeline": step.pipeline, "mlcloud.pipeline.step": step.step}
    if step.pipeline_run:
        tags["mlcloud.pipeline.run"] = step.pipeline_run
    if step.step_run:
        tags["mlflow.parentRunId"] = step.step_run
    return tags


def started(run: Any) -> None:
    """Note a run started in the current step: its MLflow run id, or a recorder whose
    ``created(timeout)`` gives it. Outside a step (or in a step's own kernel), nothing."""
    step = _current.get()
    if step is not None:
        step.started.append(run)
