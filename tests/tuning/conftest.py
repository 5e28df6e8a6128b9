"""Studies written straight into an MLflow store, laid out as ``mlc.tune`` records them (a
parent run per study, a child run per trial): for the tests that read studies back without
running one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

import pytest


@pytest.fixture
def experiment(monkeypatch: pytest.MonkeyPatch) -> str:
    """An MLflow experiment of this test's own in the session's store: what the listings
    read (a fresh store per test costs seconds of schema setup)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return name


@pytest.fixture
def client(experiment: str) -> Any:
    """An ``MlflowClient`` on the store in force (the session's, unless a test names one)."""
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def make_study(client: Any, name: str, trials: Sequence[dict[str, Any]], *,
               direction: str = "minimize", status: str = "RUNNING",
               experiment: str | None = None) -> tuple[str, list[str]]:
    """A study ``name`` whose trials are ``{"state": COMPLETE|PRUNED|FAIL|None (running),
    "value", "x", "run_id" (a training run id), "losses"}``; its parent's and the trials'
    MLflow run ids."""
    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", "jupyter_mlcloud")
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    parent = client.create_run(experiment_id, run_name=f"study-{name}", tags={
        "mlcloud.kind": "study", "mlcloud.study": name}).info.run_id
    for key, value in {"n_trials": len(trials), "metric": "loss", "direction": direction,
                       "space": repr({"x": "FloatDistribution(low=0, high=10)"})}.items():
        client.log_param(parent, key, value)
    children = []
    for number, trial in enumerate(trials):
        tags = {"mlcloud.kind": "train", "mlflow.parentRunId": parent, "mlcloud.study": name,
                "mlcloud.trial": str(number), "mlcloud.run_id": trial.get("run_id", "")}
        if trial.get("state"):
            tags["mlcloud.trial_state"] = trial["state"]
        if trial.get("value") is not None:
            tags["mlcloud.trial_value"] = repr(trial["value"])
        child = client.create_run(experiment_id, run_name=f"train-{number}",
                                  tags=tags).info.run_id
        client.log_param(child, "x", trial.get("x", number))
        client.log_param(child, "epochs", 3)  # a run option: not one of the study's values
        for step, loss in enumerate(trial.get("losses", [])):
            client.log_metric(child, "loss", loss, step=step)
        if "cost" in trial:
            client.log_metric(child, "cost", trial["cost"])
        if trial.get("state"):
            client.set_terminated(child, "FAILED" if trial["state"] == "FAIL" else "FINISHED")
        children.append(child)
    if status != "RUNNING":
        client.set_terminated(parent, status)
    return parent, children
