"""Ranks on different hosts find each other: a scheduler and two workers, each in its own
network namespace, train the same weights as two workers of one LocalCluster.

The hostname resolves to 127.0.0.1 on machines like these (and in many containers); unless a
rank binds gloo to its worker's own address, it advertises loopback and the rendezvous fails.
"""

from __future__ import annotations

from typing import Any

import torch

import jupyter_mlcloud as mlc
from tests.multihost.conftest import DaskHosts


def _make_train() -> Any:
    """The training function, made inside a function so that it travels by value."""

    def _train(ctx: Any) -> dict[str, Any]:
        """A few DDP epochs of a float64 MLP; returns rank 0's model and where each rank bound."""
        import os

        import psutil
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
        gloo = os.environ.get("GLOO_SOCKET_IFNAME")
        owned = [a.address for a in psutil.net_if_addrs().get(gloo or "", [])]
        here = {"worker": get_worker().address, "gloo": gloo, "gloo_addresses": owned,
                "master": os.environ["MASTER_ADDR"]}
        everyone: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(everyone, here)
        return {"model": net, "ranks": everyone}

    return _train


def test_ranks_in_separate_namespaces_train_what_one_host_trains(dask_hosts: DaskHosts) -> None:
    with mlc.connect(dask_hosts.address, name="netns-hosts") as handle:
        try:
            handle.client.wait_for_workers(2, timeout=120)
        except TimeoutError:
            raise AssertionError(f"the workers never joined\n{dask_hosts.log_tails()}") from None
        across = mlc.train(_make_train(), cluster=handle, timeout=60).result(timeout=240)
    with mlc.up(workers=2, name="one-host") as local:
        alone = mlc.train(_make_train(), cluster=local, timeout=60).result(timeout=240)

    # Each rank bound gloo to the interface holding its own namespace's address.
    ranks = across["ranks"]
    hosts = {h.address: h for h in dask_hosts.workers}
    assert [r["worker"].split("//")[1].split(":")[0] for r in ranks] == sorted(hosts)
    for r in ranks:
        host = hosts[r["worker"].split("//")[1].split(":")[0]]
        assert r["gloo"] == host.interface and host.address in r["gloo_addresses"], r
        assert r["master"] == ranks[0]["worker"].split("//")[1].split(":")[0]
    # One host: the workers listen on loopback, so loopback it is.
    assert {r["gloo"] for r in alone["ranks"]} == {"lo"}

    mine, theirs = across["model"].state_dict(), alone["model"].state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), "weights differ across hosts"
