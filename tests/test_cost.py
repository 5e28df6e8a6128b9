"""What runs cost: worker-seconds against the run's own wall time, a price table, MLflow
metrics, the progress line, and budgets (a planned stop that commits and says so), on a real
2-worker cluster with a real SQLite MLflow store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dask
import pytest
from mlflow import MlflowClient

import jupyter_mlcloud as mlc
from jupyter_mlcloud import cost as costs
from jupyter_mlcloud.train.checkpoint import CheckpointDir
from jupyter_mlcloud.train.run import TrainingError

CLUSTER = {"name": "cost-tests", "workers": 2}
PRICES = {"cpu-worker": 36.0, "a100": 3.0}  # 36 per hour: 0.01 per worker-second


@pytest.fixture
def uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    value = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    return value


def steady(ctx: Any, steps: int = 30, pause: float = 0.02) -> None:
    """A small DDP model trained for ``steps`` batches (``pause`` s each) per epoch."""
    import time

    import torch

    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ddp = ctx.prepare(model, optimizer)
    x = torch.randn(steps * 2 * 4, 4)
    for _ in ctx.epochs():
        for xb in ctx.shard(x, batch_size=4):
            loss = ddp(xb).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.report(loss=loss)
            time.sleep(pause)
    return None


# ---------------------------------------------------------------- units


@pytest.mark.parametrize("bad", ["2 hours", "h", "0h", "-1m", "", "2d", True, [1], 0, -3.0])
def test_a_bad_budget_is_refused_in_one_sentence_naming_the_forms(bad: Any) -> None:
    with pytest.raises(ValueError) as info:
        costs.parse_budget(bad, prices=PRICES)
    text = str(info.value)
    assert "'2h', '30m' or '90s'" in text and "cost" in text and text.count(". ") == 0


def test_budget_forms_and_a_cost_needs_prices() -> None:
    assert costs.parse_budget("2h", {}).amount == 7200
    assert costs.parse_budget(" 30m", {}).amount == 1800
    assert costs.parse_budget("90s", {}).kind == "worker_seconds"
    assert costs.parse_budget(1.5, PRICES) == costs.Budget("cost", 1.5, "1.5")
    with pytest.raises(ValueError, match="mlcloud.cost.prices holds no price table"):
        costs.parse_budget(2, prices={})


def test_kinds_and_prices_come_from_the_workers_description() -> None:
    gpu = {"gpu": {"name": "NVIDIA A100-SXM4-80GB", "memory-total": 1}}
    assert costs.worker_kind(gpu) == "NVIDIA A100-SXM4-80GB"
    assert costs.worker_kind({"metrics": {"cpu": 3}}) == "cpu-worker"
    with dask.config.set({"mlcloud.cost.cpu-kind": "m5.large"}):
        assert costs.worker_kind({}) == "m5.large"
    assert costs.price_of("NVIDIA A100-SXM4-80GB", PRICES) == 3.0
    meter = costs.Meter(PRICES)
    meter.open(["cpu-worker", "NVIDIA A100-SXM4-80GB"], at=100.0)
    meter.close(at=110.0)
    spent = meter.cost()
    assert (spent.worker_seconds, spent.gpu_seconds) == (20.0, 10.0)
    assert spent.cost == pytest.approx(10 * 36 / 3600 + 10 * 3 / 3600)
    assert costs.Meter({}).cost().cost is None


# ---------------------------------------------------------------- real runs


def test_a_run_records_worker_seconds_and_cost_against_its_own_wall_time(
        cluster: mlc.ClusterHandle, uri: str) -> None:
    with dask.config.set({"mlcloud.cost.prices": PRICES}):
        before = time.time()
        run = mlc.train(steady, cluster=cluster, workers=2, epochs=1)
        live = run.cost  # while it runs
        assert run.wait(120)
        after = time.time()
    assert run.status == "finished"
    spent = run.cost
    assert live.worker_seconds <= spent.worker_seconds
    # Two ranks held for the attempt's wall time: no more than the time around the call, and
    # no less than the time between the ranks' first and last reported points.
    times = run.metrics["time"]
    assert 2 * (times.max() - times.min()) <= spent.worker_seconds <= 2 * (after - before)
    assert spent.gpu_seconds == 0
    assert spent.cost == pytest.approx(spent.worker_seconds * 36 / 3600)
    assert run.stop_reason is None

    from jupyter_mlcloud.widgets import RunMonitor

    assert "worker-s" in RunMonitor(run).label.value  # the progress line shows run.cost

    assert run.tracking.recorder.wait(120)
    metrics = MlflowClient(uri).get_run(run.mlflow_run_id).data.metrics
    assert metrics["worker_seconds"] == pytest.approx(spent.worker_seconds)
    assert metrics["cost"] == pytest.approx(spent.cost)
    assert metrics["gpu_seconds"] == 0


def test_a_run_reaching_its_budget_commits_checkpoints_and_says_so(
        cluster: mlc.ClusterHandle, uri: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run = mlc.train(steady, cluster=cluster, workers=2, epochs=50, budget="2s",
                    checkpoint_dir=str(ckpt), max_failures=1)
    assert run.wait(120)
    assert run.status == "cancelled"
    reason = run.stop_reason
    assert reason is not None and "reached its budget" in reason and reason.count(". ") == 0
    assert run.cost.worker_seconds >= 2.0
    with pytest.raises(TrainingError, match="reached its budget"):
        run.result()
    latest = CheckpointDir(str(ckpt)).latest()
    assert latest is not None
    assert f"committed at step {latest.step}" in reason and f"(step {latest.step})" in reason
    assert f"stopped on every rank at step {latest.step}" in reason
    assert run.tracking.recorder.wait(120)
    record = MlflowClient(uri).get_run(run.mlflow_run_id)
    assert record.info.status == "KILLED"
    assert record.data.tags["mlcloud.stop_reason"] == reason
    assert record.data.metrics["worker_seconds"] >= 2.0
    # The workers are free again: the next run takes both.
    again = mlc.train(steady, cluster=cluster, workers=2, epochs=1, track=False,
                      config={"steps": 4})
    assert again.wait(120) and again.status == "finished"


def test_train_refuses_a_bad_budget_before_anything_starts(cluster: mlc.ClusterHandle) -> None:
    with pytest.raises(ValueError, match="'2h', '30m' or '90s'"):
        mlc.train(steady, cluster=cluster, budget="two hours")
    with pytest.raises(ValueError, match="holds no price table"):
        mlc.train(steady, cluster=cluster, budget=1.0)


def test_a_scoring_job_records_what_it_cost(cluster: mlc.ClusterHandle, uri: str,
                                            tmp_path: Path) -> None:
    import numpy as np
    import torch

    data = np.random.default_rng(0).normal(size=(4000, 4)).astype("float32")
    with dask.config.set({"mlcloud.cost.prices": PRICES}):
        report = mlc.score(torch.nn.Linear(4, 1), data, output=str(tmp_path / "s.zarr"),
                           progress=False)
    summary = report.summary
    # Both workers held for the job: within its own measured time.
    assert 0 < summary["worker_seconds"] <= 2 * summary["seconds"]
    assert summary["cost"] == pytest.approx(summary["worker_seconds"] * 36 / 3600)
    assert report.cost is not None and report.cost.gpu_seconds == 0
    metrics = MlflowClient(uri).get_run(report.mlflow_run_id).data.metrics
    assert metrics["worker_seconds"] == pytest.approx(summary["worker_seconds"])
    with pytest.raises(ValueError, match="give output= too"):
        mlc.score(torch.nn.Linear(4, 1), data, budget="1h")


def test_a_study_sums_its_trials_cost_and_stops_starting_them_at_its_budget(
        cluster: mlc.ClusterHandle) -> None:
    def trial(ctx: Any) -> float:
        import time

        time.sleep(0.5)
        return float(ctx.params["x"])

    with dask.config.set({"mlcloud.cost.prices": PRICES}):
        study = mlc.tune(trial, space="x=uniform(0,1)", n_trials=12, cluster=cluster,
                         concurrency=2, budget="3s", track=False)
    trials = study.get_trials(deepcopy=False)
    each = [t.user_attrs["mlcloud.cost"] for t in trials]
    assert 2 <= len(trials) < 12  # stopped by the budget, not by n_trials
    total = study.user_attrs["cost"]
    assert total["worker_seconds"] == pytest.approx(sum(c["worker_seconds"] for c in each))
    assert total["cost"] == pytest.approx(total["worker_seconds"] * 36 / 3600)
    # No trial started once what was used plus an ended trial's mean passed the budget: at
    # most the two trials running then go beyond it.
    assert total["worker_seconds"] <= 3.0 + 2 * max(c["worker_seconds"] for c in each)
