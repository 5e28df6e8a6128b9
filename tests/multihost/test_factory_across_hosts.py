"""``mlcloud.cluster.factory`` with a class that starts a real deployment: a scheduler and
workers in their own network namespaces, as a Slurm or Kubernetes class would on real hosts.
``mlc.up`` imports the class by name, builds it, scales it and closes it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dask
from distributed.core import Status

import jupyter_mlcloud as mlc
from tests.multihost import netns
from tests.multihost.conftest import SCHEDULER_PORT, NamespaceCluster


def _network_namespace() -> str:
    return os.readlink("/proc/self/ns/net")


def test_up_builds_the_configured_class_and_runs_on_its_hosts(network: netns.Network,
                                                              tmp_path: Path) -> None:
    spec = {"module": "tests.multihost.conftest", "class": "NamespaceCluster",
            "kwargs": {"network": network, "logs": str(tmp_path)}}
    head, *spare = network.hosts
    with dask.config.set({"mlcloud.cluster.factory": spec}):
        with mlc.up(workers=2, name="netns-factory") as handle:
            built = handle.cluster
            assert handle.kind == "factory" and isinstance(built, NamespaceCluster)
            assert handle.address == f"tcp://{head.address}:{SCHEDULER_PORT}"
            try:
                handle.wait_for_workers(2, timeout=120)
            except TimeoutError:
                raise AssertionError(f"no workers\n{built.hosts.log_tails()}") from None
            # Each worker is a process on its own host: its address, its network namespace.
            spaces = handle.client.run(_network_namespace)
            assert sorted(a.split("//")[1].split(":")[0] for a in spaces) == sorted(
                h.address for h in spare[:2])
            assert len({*spaces.values(), _network_namespace()}) == 3
            assert handle.client.submit(lambda x: x + 1, 41, pure=False).result(60) == 42
    # Closing the handle closed the deployment: its scheduler no longer listens.
    assert built.status == Status.closed
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((head.address, SCHEDULER_PORT)) != 0
