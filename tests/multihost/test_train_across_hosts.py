"""Ranks on different hosts find each other: a scheduler and two workers, each in its own
network namespace, train with ``%%distributed_train`` the same weights (the same SHA-256) as
two workers of one LocalCluster.

The hostname resolves to 127.0.0.1 on machines like these (and in many containers); unless a
rank binds gloo to its worker's own address, it advertises loopback and the rendezvous fails.
"""

from __future__ import annotations

from typing import Any

from IPython.core.interactiveshell import InteractiveShell

from tests.conftest import digest
from tests.multihost.conftest import SharedHosts

# A few DDP epochs of a float64 MLP; rank 0 brings back its model and where each rank bound.
CELL = """
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
ranks = [None] * ctx.world_size
dist.all_gather_object(ranks, here)
"""


def _train(shell: InteractiveShell, cluster: str) -> tuple[Any, list[dict[str, Any]]]:
    shell.user_ns.pop("net", None)
    shell.run_cell_magic("distributed_train", f"--cluster {cluster} --workers 2 --timeout 60"
                         " --no-track --out net,ranks", CELL)
    return shell.user_ns["net"], shell.user_ns["ranks"]


def _host(address: str) -> str:
    return address.split("//")[1].rsplit(":", 1)[0]


def test_ranks_in_separate_namespaces_train_what_one_host_trains(
        across: SharedHosts, one_host: Any, shell: InteractiveShell) -> None:
    model, ranks = _train(shell, across.handle.name)
    alone, alone_ranks = _train(shell, one_host.name)

    # Each rank bound gloo to the interface holding its own namespace's address.
    hosts = {h.address: h for h in across.dask.workers}
    assert sorted(_host(r["worker"]) for r in ranks) == sorted(hosts)
    for r in ranks:
        host = hosts[_host(r["worker"])]
        assert r["gloo"] == host.interface and host.address in r["gloo_addresses"], r
        assert r["master"] == _host(ranks[0]["worker"]) != "127.0.0.1"
    # One host: the workers listen on loopback, so loopback it is.
    assert {r["gloo"] for r in alone_ranks} == {"lo"}

    assert digest(model) == digest(alone), "weights differ across hosts"
