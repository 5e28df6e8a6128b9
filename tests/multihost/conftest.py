"""Fixtures: hosts in network namespaces, and a Dask scheduler and workers spread over them."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED, ModuleCluster

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


def _env() -> dict[str, str]:
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout first
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}


def start_dask(network: netns.Network, logs: Path, timeout: float = 60.0, *,
               workers: int | None = None, tls_args: Sequence[str] = ()) -> DaskHosts:
    """Start the scheduler on ``network.hosts[0]`` and a worker on each other host (the first
    ``workers`` of them, when given); return once the scheduler accepts connections (the
    workers join on their own, see ``Client.wait_for_workers``). They stop with the network.

    ``tls_args`` (``--tls-ca-file F --tls-cert F --tls-key F``) makes every listener TLS."""
    head, *others = network.hosts
    scheduler_log = logs / "scheduler.log"
    protocol = ["--protocol", "tls"] if tls_args else []
    scheduler = network.start(head, dask_command(
        "scheduler", "--host", head.address, "--port", str(SCHEDULER_PORT), "--no-dashboard",
        "--no-show", *protocol, *tls_args), log=scheduler_log, env=_env())
    netns.wait_for_port(head.address, SCHEDULER_PORT, timeout, watch=[scheduler],
                        log=scheduler_log)
    address = f"{'tls' if tls_args else 'tcp'}://{head.address}:{SCHEDULER_PORT}"
    hosts = others if workers is None else others[:workers]
    worker_logs = [start_worker(network, host, address, logs, tls_args) for host in hosts]
    return DaskHosts(network, address, hosts, [scheduler_log, *worker_logs])


def start_worker(network: netns.Network, host: netns.Host, address: str, logs: Path,
                 tls_args: Sequence[str] = ()) -> Path:
    """Start one worker process on ``host`` for the scheduler at ``address``; its log."""
    log = logs / f"worker-{host.address}.log"
    network.start(host, dask_command(
        "worker", address, "--host", host.address, "--nthreads", "1", "--nworkers", "1",
        "--no-dashboard", "--name", host.address, "--death-timeout", "120",
        "--preload-nanny", "jupyter_mlcloud.cluster.rejoin", *tls_args),
        log=log, env=_env())
    return log


class NamespaceCluster:
    """A cluster class for ``mlcloud.cluster.factory``: the scheduler on the network's first
    host at once, and ``scale(n)`` starts workers on the next ``n`` hosts (never fewer: a
    worker once started stays until ``close``). Dask config may hold the live ``network``."""

    def __init__(self, *, network: netns.Network, logs: str | Path,
                 tls_args: Sequence[str] = ()) -> None:
        from distributed.core import Status

        self._tls_args = list(tls_args)
        self.hosts = start_dask(network, Path(logs), workers=0, tls_args=self._tls_args)
        self.scheduler_address = self.hosts.address
        self.dashboard_link = ""
        self.status = Status.running

    def scale(self, n: int) -> None:
        """Start workers until ``n`` run (at most one per spare host)."""
        head, *others = self.hosts.network.hosts
        if n > len(others):
            raise ValueError(f"scale({n}): this network has room for {len(others)} workers.")
        for host in others[len(self.hosts.workers):n]:
            self.hosts.logs.append(start_worker(self.hosts.network, host, self.hosts.address,
                                                self.hosts.logs[0].parent, self._tls_args))
            self.hosts.workers.append(host)

    def close(self) -> None:
        """Stop every process started on the network (this cluster's, and any others')."""
        from distributed.core import Status

        self.hosts.network.stop()
        self.status = Status.closed


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


# ---------------------------------------------------------------- one cluster for the package

# A worker cut off the network is noticed by the scheduler's heartbeat check (worker-ttl; Dask's
# default is 5 minutes) and removed once its nanny cannot be reached either (the connect timeout).
FAULT_TIMEOUTS = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s",
                  "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s"}
WHOLE_S = 90.0  # a nanny restarting its worker on a loaded 2-core machine


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` holds ``values`` inside the block (processes started there inherit
    them); each variable is restored on the way out."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def runtime_dir(path: Path) -> contextlib.AbstractContextManager[None]:
    """``JUPYTER_RUNTIME_DIR`` is ``path`` inside the block: discovery files of clusters that
    outlive one test go there, never to the user's runtime dir."""
    return environ({"JUPYTER_RUNTIME_DIR": str(path)})


@dataclass
class SharedHosts:
    """The namespace cluster the package's tests share, and this process's handle on it."""

    dask: DaskHosts
    handle: Any  # a jupyter_mlcloud ClusterHandle attached by address

    def worker_count(self) -> int:
        """How many workers the scheduler has now."""
        from jupyter_mlcloud.cluster import info

        return len(info.workers(self.handle.client))

    def revive(self) -> list[netns.Host]:
        """Start ``dask worker`` again on each host whose worker process has exited, as a
        host's supervisor (systemd, Kubernetes) would; the hosts where it did."""
        revived = []
        for host in self.dask.workers:
            started = [p for p in self.dask.network.processes if host.namespace in p.args]
            if started and all(p.poll() is not None for p in started):
                self.dask.logs.append(start_worker(self.dask.network, host, self.dask.address,
                                                   self.dask.logs[0].parent))
                revived.append(host)
        return revived

    def whole(self, timeout: float = WHOLE_S) -> Any:
        """The handle, once every host's worker is in the cluster (reviving exited ones);
        fail with the logs if not."""
        deadline = time.monotonic() + timeout
        while self.worker_count() < len(self.dask.workers):
            self.revive()
            if time.monotonic() > deadline:
                pytest.fail(f"{self.worker_count()} of {len(self.dask.workers)} workers after"
                            f" {timeout:g} s\n{self.dask.log_tails()}")
            time.sleep(0.1)
        return self.handle

    def worker_on(self, host: netns.Host) -> str:
        """The address of the worker listening on ``host`` (fails if there is none)."""
        from jupyter_mlcloud.cluster import info

        found = [w for w in info.workers(self.handle.client)
                 if w.split("//")[-1].rsplit(":", 1)[0] == host.address]
        assert len(found) == 1, (host.address, found)
        return found[0]


@pytest.fixture(scope="package")
def shared_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedHosts]:
    """Three hosts (a scheduler, two workers) started once for every test that can share them;
    tests that break a worker wait, before they end, until it is back (``whole``)."""
    import jupyter_mlcloud as mlc

    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    netns.remove_stale()
    logs = tmp_path_factory.mktemp("shared-hosts")
    runtime = tmp_path_factory.mktemp("shared-hosts-runtime")
    with netns.hosts(3) as network:
        with environ(FAULT_TIMEOUTS):  # the scheduler's (and workers') Dask config
            dask_hosts = start_dask(network, logs)
        with runtime_dir(runtime):
            handle = mlc.connect(dask_hosts.address, name="netns-shared", timeout=60)
        SHARED.add(handle)
        try:
            shared = SharedHosts(dask_hosts, handle)
            shared.whole()
            yield shared
        finally:
            SHARED.discard(handle)
            with runtime_dir(runtime):
                handle.close()
            # Nothing is left to finish gracefully: workers that ran gloo take seconds to.
            network.stop(timeout=1.0)


@pytest.fixture
def across(shared_hosts: SharedHosts) -> SharedHosts:
    """The shared namespace cluster with both workers in it, at the start of each test."""
    shared_hosts.whole()
    return shared_hosts


@pytest.fixture(scope="package")
def one_host_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleCluster]:
    """Two workers of one LocalCluster: the one-host run that runs across hosts must equal."""
    box = ModuleCluster("one-host-reference", 2, {}, tmp_path_factory.mktemp("one-host"))
    yield box
    box.close()


@pytest.fixture
def one_host(one_host_cluster: ModuleCluster) -> Any:
    """The one-host cluster with both workers up."""
    return one_host_cluster.whole()
