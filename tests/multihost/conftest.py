"""Fixtures: hosts in network namespaces, and a Dask scheduler and workers spread over them."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import netns

REPO = Path(__file__).resolve().parents[2]
SCHEDULER_PORT = 8786  # each host is its own namespace: no other process holds its ports


def dask_command(*args: str) -> list[str]:
    """The ``dask`` CLI of the Python running the tests (its venv's ``bin``)."""
    exe = Path(sys.executable).parent / "dask"
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "dask", *args]


@dataclass
class DaskHosts:
    """A scheduler on the first host and one worker process on each of the others."""

    network: netns.Network
    address: str  # the scheduler's, tcp://host:port
    workers: list[netns.Host]
    logs: list[Path]

    def log_tails(self, chars: int = 2000) -> str:
        """The end of every process's output, for failure messages."""
        return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in self.logs)


def start_dask(network: netns.Network, logs: Path, timeout: float = 60.0) -> DaskHosts:
    """Start the scheduler on ``network.hosts[0]`` and a worker on each other host; return
    once the scheduler accepts connections (the workers join on their own, see
    ``Client.wait_for_workers``). They stop with the network."""
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    head, *others = network.hosts
    scheduler_log = logs / "scheduler.log"
    scheduler = network.start(head, dask_command(
        "scheduler", "--host", head.address, "--port", str(SCHEDULER_PORT), "--no-dashboard",
        "--no-show"), log=scheduler_log, env=env)
    netns.wait_for_port(head.address, SCHEDULER_PORT, timeout, watch=[scheduler],
                        log=scheduler_log)
    address = f"tcp://{head.address}:{SCHEDULER_PORT}"
    worker_logs = []
    for host in others:
        log = logs / f"worker-{host.address}.log"
        network.start(host, dask_command(
            "worker", address, "--host", host.address, "--nthreads", "1", "--nworkers", "1",
            "--no-dashboard", "--name", host.address, "--death-timeout", "120"), log=log, env=env)
        worker_logs.append(log)
    return DaskHosts(network, address, others, [scheduler_log, *worker_logs])


@pytest.fixture
def network() -> Iterator[netns.Network]:
    """Three hosts: one for a scheduler, two for workers."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    netns.remove_stale()
    with netns.hosts(3) as built:
        yield built


@pytest.fixture
def dask_hosts(network: netns.Network, tmp_path: Path) -> DaskHosts:
    return start_dask(network, tmp_path)
