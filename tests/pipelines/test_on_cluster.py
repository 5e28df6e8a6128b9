"""A step that computes on the cluster it is given; a cached rerun submits nothing to it; a
training run a step starts is filed under the step's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distributed import get_task_stream

import jupyter_mlcloud as mlc
from jupyter_mlcloud.pipelines import pipeline
from jupyter_mlcloud.tracking import store

CLUSTER = {"name": "pipelines", "workers": 1}


def test_a_cached_rerun_costs_the_cluster_nothing(cluster: Any, tmp_path: Path,
                                                  name: str) -> None:
    pipe = pipeline(name, root=tmp_path)

    @pipe.step(params={"n": 100}, outputs=["total"])
    def total(n: int, cluster: Any) -> int:
        return int(cluster.client.submit(sum, range(n), pure=False).result())

    with get_task_stream(cluster.client) as first:
        assert pipe.run(cluster=cluster).outputs == {"total": 4950}
    assert len(first.data) == 1
    with get_task_stream(cluster.client) as second:
        result = pipe.run(cluster=cluster)
    assert result["total"].state == "cached" and result.outputs == {"total": 4950}
    assert second.data == []


def test_a_training_run_in_a_step_is_a_child_of_the_steps_run(cluster: Any, tmp_path: Path,
                                                              name: str) -> None:
    pipe = pipeline(name, root=tmp_path)

    def fit(ctx: Any) -> int:
        return int(ctx.rank) + 1

    @pipe.step(outputs=["run"])
    def train(cluster: Any) -> str:
        run = mlc.train(fit, cluster=cluster, workers=1)
        assert run.result() == 1
        return str(run.id)

    result = pipe.run(cluster=cluster)
    step = result["train"]
    assert result.ok, step.error
    assert len(step.runs) == 1
    client = store.client()
    trained = client.get_run(step.runs[0])
    assert trained.data.tags["mlcloud.run_id"] == result.outputs["run"]
    assert trained.data.tags["mlflow.parentRunId"] == step.mlflow_run_id
    assert trained.data.tags["mlcloud.pipeline"] == name
    assert trained.data.tags["mlcloud.pipeline.step"] == "train"
    assert trained.data.tags["mlcloud.pipeline.run"] == result.mlflow_run_id
    record = client.get_run(step.mlflow_run_id)
    assert json.loads(record.data.tags["mlcloud.step_runs"]) == step.runs
    assert record.data.tags["mlcloud.step_state"] == "done"
    assert record.info.status == "FINISHED"
