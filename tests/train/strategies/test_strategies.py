"""Training strategies on a real 2-worker LocalCluster: pipeline stages over gloo, a parameter
server in Dask actors (sync and async), and their failure handling."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import info as cluster_info
from jupyter_mlcloud.train import TrainingError
from jupyter_mlcloud.train.strategies.param_server import assign_shards
from jupyter_mlcloud.train.strategies.pipeline import stage_bounds
from tests.conftest import digest, ipython_shell, keep_rank1_worker_dead, make_fit

CLUSTER = {"name": "strategies", "workers": 2}


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True).sin()


def _trained_here() -> tuple[torch.nn.Module, list[float]]:
    """The same model trained on the same batches in this process, whole-batch, 2 epochs."""
    reference = _net()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    losses = []
    for _ in range(2):
        for start in range(0, len(x), 16):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(reference(x[start:start + 16]),
                                                y[start:start + 16])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return reference, losses


def pipeline_fit(ctx: Any, split: list[str] | None, epochs: int = 2) -> Any:
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stages = ctx.prepare(model, optimizer, split=split, loss_fn=torch.nn.MSELoss())
    losses = []
    for _ in ctx.epochs(epochs):
        for xb, yb in ctx.shard(_data(), batch_size=16, shuffle=False):
            optimizer.zero_grad()
            loss = stages.step(xb, yb)
            optimizer.step()
            ctx.report(loss=loss)
            losses.append(loss.item())
    return stages, losses


@pytest.mark.parametrize(("schedule", "split"), [("1f1b", None), ("gpipe", ["2"])])
def test_pipeline_matches_one_process(cluster: mlc.ClusterHandle, schedule: str,
                                      split: list[str] | None) -> None:
    run = mlc.train(pipeline_fit, split, cluster=cluster, strategy="pipeline", microbatches=4,
                    pipeline_schedule=schedule)
    model, losses = run.result(timeout=120)
    reference, expected = _trained_here()
    assert isinstance(model, torch.nn.Sequential)  # reassembled whole on the notebook side
    assert torch.allclose(torch.tensor(losses), torch.tensor(expected), rtol=1e-10, atol=0)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(),
                                 strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name
    bubbles = run.metrics.dropna(subset=["pipeline_bubble"])["pipeline_bubble"]
    assert len(bubbles) and ((bubbles >= 0) & (bubbles <= 1)).all()


def test_stage_bounds_balance_parameters() -> None:
    assert stage_bounds([10, 0, 10, 0, 10], 1) == [0]
    assert stage_bounds([1, 1, 100], 3) == [0, 1, 2]  # a child per stage, whatever the sizes
    assert stage_bounds([64, 0, 64, 0, 16], 2) == [0, 2]
    assert assign_shards({"a": 100, "b": 60, "c": 50}, 2) == {"a": 0, "b": 1, "c": 1}


def ps_fit(ctx: Any) -> Any:
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    net = ctx.prepare(model, optimizer)
    for _ in ctx.epochs(3):
        for xb, yb in ctx.shard(_data(), batch_size=8):
            loss = torch.nn.functional.mse_loss(net(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.report(loss=loss)
    return model


@pytest.mark.parametrize("ps_workers", [1, 2])
def test_ps_sync_follows_ddp(cluster: mlc.ClusterHandle, ps_workers: int) -> None:
    ddp = mlc.train(ps_fit, cluster=cluster).result(timeout=120)
    run = mlc.train(ps_fit, cluster=cluster, strategy="ps-sync", ps_workers=ps_workers)
    ps = run.result(timeout=120)
    for (name, got), want in zip(ps.state_dict().items(), ddp.state_dict().values(),
                                 strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), name
    assert (run.metrics["ps_pushes_per_s"].dropna() > 0).all()


def convex_fit(ctx: Any, slow_rank: int) -> Any:
    """Least squares; ``slow_rank`` is a straggler, so async updates arrive stale."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    net = ctx.prepare(model, optimizer)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    for _ in ctx.epochs(4):
        for xb, yb in ctx.shard((x, y), batch_size=8):
            if ctx.rank == slow_rank:
                time.sleep(0.01)
            loss = torch.nn.functional.mse_loss(net(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.report(loss=loss)
    return model


def test_ps_async_converges_and_staleness_is_bounded(cluster: mlc.ClusterHandle) -> None:
    free = mlc.train(convex_fit, 1, cluster=cluster, strategy="ps-async")
    model = free.result(timeout=120)
    target = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    assert torch.allclose(model.weight.detach(), target, atol=1e-3)  # converged
    stale = free.metrics.dropna(subset=["staleness_max"])
    # The straggler's gradients are many updates old without a bound...
    assert stale[stale["rank"] == 1]["staleness_max"].max() > 1
    # The same run under the stale-synchronous bound S = 0.
    run = mlc.train(convex_fit, 1, cluster=cluster, strategy="ps-async", max_staleness=0)
    model = run.result(timeout=120)
    assert torch.allclose(model.weight.detach(), target, atol=1e-3)
    stale = run.metrics.dropna(subset=["staleness_max"])
    # ...and at most (world - 1) * (2S + 1) = 1 with S = 0.
    assert len(stale) and stale["staleness_max"].max() <= 1
    assert {"staleness_p50", "staleness_p95"} <= set(stale.columns)


def test_killed_parameter_server_resumes_from_its_commit(cluster: mlc.ClusterHandle) -> None:
    expected = digest(mlc.train(make_fit(), cluster=cluster, strategy="ps-sync")
                      .result(timeout=300))
    # Rank 0's worker holds the server's actor: kill it at step 9.
    run = mlc.train(make_fit(kills=((0, 0, 9),)), cluster=cluster, strategy="ps-sync",
                    max_failures=1)
    model = run.result(timeout=300)
    assert [e["kind"] for e in run.events] == ["recovery"]
    assert run.events[0]["from_step"] > 0
    assert digest(model) == expected


def test_parameter_server_checkpoint_goes_through_dcp_and_resumes(
        cluster: mlc.ClusterHandle, tmp_path: Path) -> None:
    expected = digest(mlc.train(make_fit(), cluster=cluster, strategy="ps-sync")
                      .result(timeout=300))
    directory = tmp_path / "ckpt"
    mlc.train(make_fit(epochs=1), cluster=cluster, strategy="ps-sync", ps_workers=2,
              checkpoint_dir=str(directory), checkpoint_every=4).result(timeout=300)
    # Rank 0 wrote the state, the two servers' shards in it, through torch.distributed.checkpoint.
    (done,) = sorted(directory.glob("step-*.done"))[-1:]
    assert (directory / done.name.removesuffix(".done") / "state.dcp" / ".metadata").is_file()
    model = mlc.train(make_fit(), cluster=cluster, strategy="ps-sync", ps_workers=2,
                      checkpoint_dir=str(directory), resume=True).result(timeout=300)
    assert digest(model) == expected


@pytest.fixture
def shell(cluster: mlc.ClusterHandle) -> Iterator[InteractiveShell]:
    with ipython_shell() as ip:
        yield ip


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--strategy fsdp", "strategy 'fsdp' needs GPU workers .* use one of: ddp, pipeline,"
                            " ps-sync, ps-async"),
        ("--ps-workers 2", "ps_workers only applies to strategies 'ps-sync' and 'ps-async',"
                           " not 'ddp'"),
        ("--strategy ps-sync --max-staleness 2", "max_staleness only applies to strategy"
                                                 " 'ps-async', not 'ps-sync'"),
        ("--microbatches 4", "microbatches and pipeline_schedule only apply to strategy"
                             " 'pipeline', not 'ddp'"),
        ("--strategy pipeline --pipeline-schedule zigzag", "pipeline_schedule 'zigzag' is"
                                                           " unknown; allowed: 1f1b, gpipe"),
        ("--strategy ps-async --max-staleness -1", "max_staleness must be a whole number >= 0"),
        ("--strategy pipeline --compression fp16", "applies to strategy 'ddp' only"),
    ],
)
def test_bad_strategy_options_fail_before_anything_is_shipped(
        shell: InteractiveShell, line: str, message: str) -> None:
    from jupyter_mlcloud.train import active_runs

    with pytest.raises(UsageError, match=message):
        shell.run_cell_magic("distributed_train", line, "pass")
    assert active_runs() == []


def bad_pipeline(ctx: Any, split: Any, batch: int) -> None:
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stages = ctx.prepare(model, optimizer, split=split, loss_fn=torch.nn.MSELoss())
    for xb, yb in ctx.shard(_data(), batch_size=batch):
        stages.step(xb, yb)


@pytest.mark.parametrize(
    ("split", "batch", "message"),
    [
        (["decoder"], 16, "split point 'decoder' names no submodule a stage can start at;"
                          " allowed: 1, 2, 3, 4"),
        (["2", "4"], 16, "makes 3 stages but the run has 2 rank\\(s\\)"),
        (None, 10, "a batch of 10 samples does not split into --microbatches 4"),
    ],
)
def test_bad_pipelines_fail_with_one_sentence(cluster: mlc.ClusterHandle, split: Any,
                                              batch: int, message: str) -> None:
    run = mlc.train(bad_pipeline, split, batch, cluster=cluster, strategy="pipeline")
    with pytest.raises(TrainingError, match=message):
        run.result(timeout=120)


def pipeline_kill_fit(kills: tuple[tuple[int, int, int], ...] = ()) -> Any:
    """``pipeline_fit`` with momentum whose ``kills`` (attempt, rank, step) SIGKILL a worker
    once the launcher holds the commit before that step."""

    def fit(ctx: Any) -> Any:
        import os
        import signal

        model = _net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        stages = ctx.prepare(model, optimizer, loss_fn=torch.nn.MSELoss())
        for _ in ctx.epochs(3):
            for xb, yb in ctx.shard(_data(), batch_size=16):
                optimizer.zero_grad()
                loss = stages.step(xb, yb)
                optimizer.step()
                ctx.report(loss=loss)
                if (ctx.attempt, ctx.rank, ctx.step) in kills:
                    while ctx.committed_step < ctx.step - 1:
                        time.sleep(0.01)
                    os.kill(os.getpid(), signal.SIGKILL)
        return stages

    return fit


def test_killed_pipeline_stage_resumes_bit_identical(cluster: mlc.ClusterHandle) -> None:
    expected = digest(mlc.train(pipeline_kill_fit(), cluster=cluster, strategy="pipeline")
                      .result(timeout=300))
    # Rank 1 holds the second stage only: the commit must carry its slice of the model.
    run = mlc.train(pipeline_kill_fit(kills=((0, 1, 7),)), cluster=cluster,
                    strategy="pipeline", max_failures=1)
    model = run.result(timeout=300)
    assert [e["kind"] for e in run.events] == ["recovery"]
    assert digest(model) == expected


def test_pipeline_shrinks_to_one_stage() -> None:
    with mlc.up(workers=2, name="pipeline-shrink") as cluster, \
            dask.config.set({"mlcloud.train.replace-timeout": 2}):
        expected = mlc.train(pipeline_kill_fit(), cluster=cluster,
                             strategy="pipeline").result(timeout=300)
        keep_rank1_worker_dead(cluster)
        run = mlc.train(pipeline_kill_fit(kills=((0, 1, 7),)), cluster=cluster,
                        strategy="pipeline", max_failures=1, min_workers=1)
        model = run.result(timeout=300)
    assert run.events[0]["world_size"] == 1
    # One stage took the whole model over and went on with the same batches: every stage
    # sees every batch, so the elastic rules leave the batch size alone.
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values(),
                                 strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 needs GPU workers (NCCL)")
def test_fsdp_follows_ddp_on_gpus(cluster: mlc.ClusterHandle) -> None:
    with mlc.up(gpu=True, name="fsdp") as gpus:
        workers = min(2, len(cluster_info.workers(gpus.client)))
        ddp = mlc.train(ps_fit, cluster=gpus, workers=workers).result(timeout=300)
        fsdp = mlc.train(ps_fit, cluster=gpus, workers=workers, strategy="fsdp")
        model = fsdp.result(timeout=300)
    for (name, got), want in zip(model.state_dict().items(), ddp.state_dict().values(),
                                 strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-8), name


def test_pipeline_checkpoint_is_written_by_each_stage_and_resumes_on_fewer(
        cluster: mlc.ClusterHandle, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    mlc.train(pipeline_fit, ["2"], cluster=cluster, strategy="pipeline", microbatches=4,
              checkpoint_dir=str(directory), checkpoint_every=3,
              config={"epochs": 1}).result(timeout=120)
    # Rank 1 wrote its stage itself, through torch.distributed.checkpoint.
    (latest,) = sorted(directory.glob("step-*.done"))[-1:]
    step = directory / latest.name.removesuffix(".done")
    assert (step / "rank-0001.dcp" / ".metadata").is_file()
    assert (step / "state.dcp" / ".metadata").is_file()  # rank 0's, with its stage in it
    # One stage takes both halves over and finishes the second epoch as if never stopped.
    model, _ = mlc.train(pipeline_fit, None, cluster=cluster, workers=1, strategy="pipeline",
                         microbatches=4, checkpoint_dir=str(directory),
                         resume=True).result(timeout=120)
    reference, _ = _trained_here()
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(),
                                 strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), name
