"""Training runs and scoring jobs recorded in real MLflow stores, from a real 2-worker cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import jupyter_mlcloud as mlc
from jupyter_mlcloud.tracking.runs import find_model, training_params
from tests.conftest import make_fit
from tests.tracking.conftest import mlflow_server

CLUSTER = {"name": "tracking-tests", "workers": 2}
STEPS = 3 * 256 // 16 // 2  # make_fit: 3 epochs of 256 samples, batches of 16 on 2 ranks


@pytest.fixture
def uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store of this test's own."""
    value = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    return value


def recorded(run: mlc.Run, uri: str) -> Any:
    """The MLflow run of ``run`` once its record is complete."""
    run.wait(120)
    assert run.tracking.recorder.wait(120), "the MLflow record did not complete"
    return MlflowClient(uri).get_run(run.mlflow_run_id)


def test_a_run_is_recorded_with_params_metrics_tags_system_figures_and_model(
        cluster: mlc.ClusterHandle, uri: str) -> None:
    def fit(ctx: Any, width: int, seed: int) -> Any:  # config may reuse an option's name
        return make_fit()(ctx)

    run = mlc.train(fit, cluster=cluster, config={"width": 32, "seed": 7}, max_failures=1)
    model = run.result()
    record = recorded(run, uri)
    params = record.data.params
    assert params["workers"] == "2" and params["strategy"] == "ddp"
    assert params["max_failures"] == "1" and params["compression"] == "none"
    assert params["width"] == "32" and params["config.seed"] == "7" and params["seed"] == "0"
    tags = record.data.tags
    assert tags["mlcloud.run_id"] == run.id and tags["mlcloud.cluster"] == cluster.name
    assert tags["mlcloud.cluster_kind"] == "local-cpu" and tags["mlcloud.kind"] == "train"
    assert record.info.status == "FINISHED"
    client = MlflowClient(uri)
    history = client.get_metric_history(run.mlflow_run_id, "loss")
    rank0 = run.metrics[run.metrics["rank"] == 0]
    assert sorted((m.step, m.value) for m in history) == sorted(
        zip(rank0["step"], rank0["loss"], strict=True))
    assert len(history) == STEPS
    assert "system/rank_1_cpu_utilization_percentage" in record.data.metrics
    events = client.download_artifacts(run.mlflow_run_id, "mlcloud/events.json")
    assert json.loads(Path(events).read_text()) == {"events": []}

    loaded = mlflow.pytorch.load_model(run.tracking.model_uri)
    x = torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))
    info = mlflow.models.get_model_info(run.tracking.model_uri)
    assert info.signature is not None
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float64",
                                                                 "shape": (-1, 8)}
    assert info.saved_input_example_info is not None  # rank 0's first rows


def test_failed_and_cancelled_runs_end_failed_and_killed(cluster: mlc.ClusterHandle,
                                                         uri: str, tmp_path: Path) -> None:
    def broken(ctx: Any) -> None:
        raise RuntimeError("boom")

    run = mlc.train(broken, cluster=cluster)
    with pytest.raises(mlc.TrainingError, match="boom"):
        run.result()
    assert recorded(run, uri).info.status == "FAILED"

    gate = tmp_path / "gate"  # rank 0 waits there, mid-run, until the cancel is asked for
    run = mlc.train(make_fit(gate=str(gate)), cluster=cluster)
    assert run.tracking.recorder.created(60)
    run.cancel(wait=False)
    gate.touch()
    assert run.wait(120) and run.status == "cancelled"
    assert recorded(run, uri).info.status == "KILLED"


def test_track_false_records_nothing(cluster: mlc.ClusterHandle, uri: str) -> None:
    run = mlc.train(make_fit(epochs=1), cluster=cluster, track=False)
    run.result()
    assert run.mlflow_run_id is None and run.tracking is None
    assert MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()]) == []
    with pytest.raises(ValueError, match="track must be True or False, got 'no'"):
        mlc.train(make_fit(), cluster=cluster, track="no")


def test_recoveries_and_checkpoints_are_recorded(cluster: mlc.ClusterHandle, uri: str,
                                                 tmp_path: Path) -> None:
    run = mlc.train(make_fit(kills=((0, 1, 9),)), cluster=cluster, max_failures=1,
                    checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=10)
    run.result()
    record = recorded(run, uri)
    client = MlflowClient(uri)
    recovery = client.get_metric_history(run.mlflow_run_id, "recovery_from_step")
    assert [(m.step, m.value) for m in recovery] == [(1, run.events[0]["from_step"])]
    assert record.data.tags["mlcloud.recoveries"] == "1"
    checkpoints = client.get_metric_history(run.mlflow_run_id, "checkpoint_step")
    assert {int(m.value) for m in checkpoints} >= {10, 20}
    saved = json.loads(Path(client.download_artifacts(
        run.mlflow_run_id, "mlcloud/events.json")).read_text())["events"]
    assert saved[0]["lost_ranks"] == [1] and "first step" in saved[0]["phases"]


def test_a_shared_tracking_server_over_http(cluster: mlc.ClusterHandle, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with mlflow_server(tmp_path / "server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
        run = mlc.train(make_fit(epochs=1), cluster=cluster, seed=5)
        model = run.result()
        record = recorded(run, server)  # read back over HTTP, by MLflow's own client
        assert record.data.params["seed"] == "5"
        assert len(MlflowClient(server).get_metric_history(run.mlflow_run_id, "loss")) \
            == STEPS // 3
        loaded = mlflow.pytorch.load_model(run.tracking.model_uri)
        x = torch.randn(3, 8, dtype=torch.float64)
        assert torch.equal(loaded(x), model(x))


def test_a_written_scoring_job_is_recorded(cluster: mlc.ClusterHandle, uri: str,
                                           tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1).double()
    rows = np.random.default_rng(0).normal(size=(200, 3))
    report = mlc.score(model, rows, output=str(tmp_path / "s.zarr"), cluster=cluster,
                       progress=False)
    record = MlflowClient(uri).get_run(report.mlflow_run_id)
    assert record.data.tags["mlcloud.kind"] == "score"
    assert record.data.params["output"] == str(tmp_path / "s.zarr")
    assert record.data.metrics["rows"] == 200
    quiet = mlc.score(model, rows, output=str(tmp_path / "t.zarr"), cluster=cluster,
                      progress=False, track=False)
    assert quiet.mlflow_run_id is None


def test_params_and_model_lookup_rules() -> None:
    assert training_params({"seed": 0, "workers": 2}, {"seed": 3, "lr": 1}) == {
        "seed": 0, "workers": 2, "config.seed": 3, "lr": 1}
    net = torch.nn.Linear(1, 1)
    assert find_model(net) is net
    assert find_model({"other": torch.nn.ReLU(), "model": net}) is net
    assert find_model((1, net)) is net
    assert find_model({"loss": 0.1}) is None and find_model(3) is None


def test_the_cell_magic_tracks_unless_told_not_to(cluster: mlc.ClusterHandle, uri: str,
                                                  shell: Any) -> None:
    cell = "result = ctx.rank\n"
    runs = {flags: shell.run_cell_magic("distributed_train",
                                        f"--cluster {cluster.name} --workers 1 --noblock {flags}",
                                        cell)
            for flags in ("", "--no-track")}
    assert recorded(runs[""], uri).data.tags["mlcloud.run_id"] == runs[""].id
    runs["--no-track"].result()
    assert runs["--no-track"].mlflow_run_id is None
