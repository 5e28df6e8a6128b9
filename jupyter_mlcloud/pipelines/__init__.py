"""Pipelines: notebook steps as a cached, scheduled chain.

    pipe = mlc.pipeline("digits-nightly")

    @pipe.step(outputs={"data": "work/digits.npz"})
    def prepare(data):                       # data: where to write (published on success)
        ...

    @pipe.step(inputs=["data"], params={"lr": 0.1}, outputs={"model": "work/model.pt"})
    def train(data, lr, model, cluster):     # cluster: the one pipe.run(cluster=...) got
        ...

    pipe.step("report.ipynb", inputs=["model"], outputs={"report": "work/report.md"})
    # a notebook step: values set after its cell tagged "parameters"

    result = pipe.run(cluster=cluster)       # unchanged steps are "cached"

Nothing here imports mlflow or torch until a pipeline runs.
"""

from __future__ import annotations

from .pipeline import Pipeline, Step, pipeline
from .record import history
from .runner import PipelineBusy, PipelineResult, StepResult, run

__all__ = ["Pipeline", "PipelineBusy", "PipelineResult", "Step", "StepResult", "history",
           "pipeline", "run"]
