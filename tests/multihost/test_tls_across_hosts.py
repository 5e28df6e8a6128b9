"""A TLS cluster across hosts: the scheduler and two workers, each in its own network
namespace, started with certificates from ``mlc.cluster_certificates``. Only a client with a
certificate of that authority gets in; DDP over it trains what one host trains.

The gloo traffic between ranks is not encrypted (gloo has no TLS): only Dask's own
connections are.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import torch

import jupyter_mlcloud as mlc
from tests.multihost import netns
from tests.multihost.conftest import SCHEDULER_PORT, start_dask


def _make_train() -> Any:
    """The training function, made inside a function so that it travels by value."""

    def _train(ctx: Any) -> dict[str, Any]:
        """A few DDP epochs of a float64 MLP; returns rank 0's model and each rank's worker."""
        import torch
        import torch.distributed as dist
        from distributed import get_worker

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 1)).double()
        model = ctx.prepare(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(64, 8, generator=g, dtype=torch.float64)
        y = x.sum(1, keepdim=True)
        for _ in ctx.epochs(3):
            for xb, yb in ctx.shard((x, y), batch_size=8, seed=3):
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        everyone: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(everyone, get_worker().address)
        return {"model": net, "workers": everyone}

    return _train


def test_tls_scheduler_and_workers_on_hosts_train_and_refuse_plain_tcp(
        network: netns.Network, tmp_path: Path) -> None:
    certs = mlc.cluster_certificates(tmp_path / "certs", hosts=[h.address for h in network.hosts])
    assert stat.S_IMODE(certs.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.key_file.parent.stat().st_mode) == 0o700
    hosts = start_dask(network, tmp_path, tls_args=certs.cli_args())
    head = network.hosts[0].address
    assert hosts.address == f"tls://{head}:{SCHEDULER_PORT}"

    # Refused: plain TCP on the same port, TLS without certificates, and another authority's.
    with pytest.raises(ValueError, match="could not reach a Dask scheduler"):
        mlc.connect(f"tcp://{head}:{SCHEDULER_PORT}", timeout=2)
    with pytest.raises(ValueError, match="speaks TLS: pass security="):
        mlc.connect(hosts.address)
    stranger = mlc.cluster_certificates(tmp_path / "stranger")
    with pytest.raises(ValueError, match="could not reach a Dask scheduler"):
        mlc.connect(hosts.address, security=stranger, timeout=2)

    with mlc.connect(hosts.address, name="netns-tls", security=certs.key_file.parent) as handle:
        try:
            handle.wait_for_workers(2, timeout=120)
        except TimeoutError:
            raise AssertionError(f"the workers never joined\n{hosts.log_tails()}") from None
        across = mlc.train(_make_train(), cluster=handle, timeout=60,
                           track=False).result(timeout=240)
        handle.client.shutdown()  # a clean exit of every process, not the harness's SIGTERM
    # Each rank ran on a worker of its own host, listening for TLS only.
    assert sorted(w.rsplit(":", 1)[0] for w in across["workers"]) == sorted(
        f"tls://{h.address}" for h in hosts.workers)

    # The same certificates secure a cluster of this machine: the one-host reference.
    with mlc.up(workers=2, name="one-host-tls", tls=certs) as local:
        assert local.address.startswith("tls://127.0.0.1:")
        alone = mlc.train(_make_train(), cluster=local, timeout=60,
                          track=False).result(timeout=240)
    mine, theirs = across["model"].state_dict(), alone["model"].state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "weights differ across hosts"
