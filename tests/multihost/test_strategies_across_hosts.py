"""The pipeline and parameter-server strategies with their ranks on two hosts (network
namespaces) train exactly what they train on two workers of one host."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import jupyter_mlcloud as mlc
from tests.conftest import digest
from tests.multihost.conftest import SharedHosts


def _make_fit(strategy: str) -> Any:
    """A few float64 steps under ``strategy``, made inside a function so that it travels by
    value; returns rank 0's whole model and its losses."""

    def fit(ctx: Any) -> Any:
        import torch

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 1)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 4, generator=g, dtype=torch.float64)
        y = x.sum(1, keepdim=True).sin()
        losses = []
        if strategy == "pipeline":
            stages = ctx.prepare(model, optimizer, loss_fn=torch.nn.MSELoss())
            for _ in ctx.epochs(2):
                for xb, yb in ctx.shard((x, y), batch_size=16, shuffle=False):
                    optimizer.zero_grad()
                    loss = stages.step(xb, yb)
                    optimizer.step()
                    losses.append(loss.item())
            return stages, losses
        net = ctx.prepare(model, optimizer)
        for _ in ctx.epochs(2):
            for xb, yb in ctx.shard((x, y), batch_size=8):
                loss = torch.nn.functional.mse_loss(net(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return model, losses

    return fit


@pytest.mark.parametrize("strategy", ["pipeline", "ps-sync"])
def test_strategy_across_hosts_equals_one_host(across: SharedHosts, one_host: Any,
                                               strategy: str) -> None:
    options: dict[str, Any] = {"microbatches": 4} if strategy == "pipeline" else {}
    run = mlc.train(_make_fit(strategy), cluster=across.handle, strategy=strategy, timeout=60,
                    track=False, **options)
    model, losses = run.result(timeout=180)
    alone, alone_losses = mlc.train(_make_fit(strategy), cluster=one_host, strategy=strategy,
                                    timeout=60, track=False, **options).result(timeout=180)

    # The ranks ran on the two hosts, one each.
    assert sorted(run.workers) == sorted(across.worker_on(h) for h in across.dask.workers)
    assert isinstance(model, torch.nn.Sequential)  # the stages gathered whole to rank 0
    assert losses == alone_losses and len(losses) == 8
    assert digest(model) == digest(alone), "weights differ from the one-host run"
