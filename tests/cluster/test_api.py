"""The cluster API on real LocalClusters with worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import dask
import psutil
import pytest
from distributed import Client, LocalCluster

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import api as clusters
from jupyter_mlcloud.cluster import discovery
from jupyter_mlcloud.cluster import info as cluster_info
from tests.conftest import child_processes, discovery_files, read_line, wait_for


def test_up_starts_cpu_workers_and_cleans_up_on_close() -> None:
    with mlc.up(workers=2, name="alpha") as cluster:
        assert cluster.kind == "local-cpu"  # no GPU here: the CPU fallback
        info = cluster.info()
        assert (info["workers"], info["threads"], info["gpus"]) == (2, 2, 0)
        assert info["dashboard"].startswith("http")
        assert mlc.current() is cluster
        assert os.environ.get("MALLOC_TRIM_THRESHOLD_") is None
        assert cluster.client.submit(lambda: 1 + 1).result() == 2
        record = json.loads((discovery.discovery_dir() / "alpha.json").read_text())
        assert record["address"] == cluster.address
        assert record["pid"] == os.getpid() and record["status"] == "running"
        assert len(child_processes()) >= 2
    assert cluster.closed
    assert discovery_files() == []
    wait_for(lambda: not child_processes(), what="worker processes to exit")


def test_workers_run_without_the_nanny_malloc_trim_setting() -> None:
    with mlc.up(workers=1) as cluster:
        env = cluster.client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert list(env.values()) == [None]


def _kill_the_worker(cluster: mlc.ClusterHandle) -> str:
    (first,) = cluster_info.workers(cluster.client)
    os.kill(cluster.client.run(os.getpid)[first], signal.SIGKILL)
    return first


def _back_and_working(cluster: mlc.ClusterHandle, gone: str) -> None:
    wait_for(lambda: set(cluster_info.workers(cluster.client)) - {gone}, timeout=60,
             what="a worker in place of the killed one")
    assert len(cluster_info.workers(cluster.client)) == 1
    assert cluster.client.submit(lambda: 1 + 1, pure=False).result(timeout=30) == 2


def test_a_worker_whose_nanny_restart_failed_is_started_again() -> None:
    with mlc.up(workers=1, name="revive") as cluster, \
            dask.config.set({"mlcloud.cluster.revive-after": 3}):
        (nanny,) = cluster.cluster.workers.values()

        async def fails() -> Any:
            raise RuntimeError("the worker could not start")  # the nanny gives up here

        nanny.instantiate = fails
        _back_and_working(cluster, _kill_the_worker(cluster))
        wait_for(lambda: cluster.cluster._mlcloud_watcher.replaced == 1, what="one replacement")
        wait_for(lambda: str(nanny.status) == "Status.closed", what="the old nanny closed")


def test_a_worker_process_that_hangs_at_start_is_ended_and_started_again(tmp_path: Any) -> None:
    flag = tmp_path / "hang-next-start"
    preload = tmp_path / "hang_once.py"
    preload.write_text("import os, time\n"
                       f"if os.path.exists({str(flag)!r}):\n"
                       f"    os.remove({str(flag)!r})\n"
                       "    time.sleep(3600)\n")
    with dask.config.set({"distributed.worker.preload": [str(preload)],
                          "mlcloud.cluster.revive-after": 3}), \
            mlc.up(workers=1, name="hang") as cluster:
        (nanny,) = cluster.cluster.workers.values()
        flag.write_text("")
        gone = _kill_the_worker(cluster)
        wait_for(lambda: not flag.exists(), what="the restarted process to start hanging")
        hung = nanny.pid
        _back_and_working(cluster, gone)
        wait_for(lambda: cluster.cluster._mlcloud_watcher.replaced == 1, what="one replacement")
        wait_for(lambda: not psutil.pid_exists(hung) or psutil.Process(hung).status()
                 == psutil.STATUS_ZOMBIE, what="the hung process to be ended")


def test_a_worker_dropped_from_the_cluster_is_started_again() -> None:
    with mlc.up(workers=1, name="dropped") as cluster, \
            dask.config.set({"mlcloud.cluster.revive-after": 3}):
        (first,) = cluster_info.workers(cluster.client)

        async def drop() -> None:  # what SpecCluster's close-on-lost timer does
            (name,) = list(cluster.cluster.workers)
            await cluster.cluster.workers.pop(name).close()

        cluster.cluster.sync(drop)
        _back_and_working(cluster, first)


def test_a_slow_nanny_restart_is_not_closed_by_the_lost_worker_timeout() -> None:
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0.2s",
                          "mlcloud.cluster.revive-after": 1000}), \
            mlc.up(workers=1, name="slow") as cluster:
        (nanny,) = cluster.cluster.workers.values()
        start = nanny.instantiate

        async def slow() -> Any:
            await asyncio.sleep(2)  # longer than the lost-worker timeout
            return await start()

        nanny.instantiate = slow
        _back_and_working(cluster, _kill_the_worker(cluster))
        assert list(cluster.cluster.workers.values()) == [nanny]  # its own restart, kept
        assert cluster.cluster._mlcloud_watcher.replaced == 0


def test_scale_and_adapt() -> None:
    with mlc.up(workers=1, name="elastic") as cluster:
        mlc.scale(2)
        wait_for(lambda: cluster.info()["workers"] == 2, what="2 workers")
        cluster.scale(1)
        wait_for(lambda: cluster.info()["workers"] == 1, what="1 worker")
        mlc.adapt(0, 2, name="elastic")
        assert cluster.cluster._adaptive is not None
        assert (cluster.cluster._adaptive.minimum, cluster.cluster._adaptive.maximum) == (0, 2)


def test_adapt_option_starts_adaptive_cluster() -> None:
    with mlc.up(adapt="1:3") as cluster:
        adaptive = cluster.cluster._adaptive
        assert (adaptive.minimum, adaptive.maximum) == (1, 3)
        wait_for(lambda: cluster.info()["workers"] >= 1, what="the minimum worker")


def test_tls_cluster_uses_tls_everywhere() -> None:
    pytest.importorskip("cryptography")
    with mlc.up(workers=1, tls=True) as cluster:
        assert cluster.address.startswith("tls://")
        assert cluster.client.submit(lambda: 41 + 1).result() == 42
        assert discovery.get(cluster.name).tls is True


def test_default_names_are_unique_and_down_all_closes_every_cluster() -> None:
    a = mlc.up(workers=1)
    b = mlc.up(workers=1)
    assert (a.name, b.name) == ("cluster-1", "cluster-2")
    assert mlc.current() is b
    table = mlc.status()
    assert list(table["name"]) == ["cluster-1", "cluster-2"]
    assert list(table["workers"]) == [1, 1]
    assert list(table["current"]) == [False, True]
    assert sorted(mlc.down(all=True)) == ["cluster-1", "cluster-2"]
    assert discovery_files() == []


def test_connect_by_address_by_name_and_by_objects() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as outside:
        by_address = mlc.connect(outside.scheduler_address, name="outside")
        assert by_address.kind == "remote" and by_address.info()["workers"] == 1
        # Attached by address: visible to the sidebar, but not ours to scale or stop.
        assert discovery.get("outside").address == outside.scheduler_address
        with pytest.raises(ValueError, match="attached by address"):
            by_address.scale(2)
        # Another handle on the same scheduler, found by its discovered name.
        by_name = mlc.connect("outside", name="same-again")
        assert by_name.address == outside.scheduler_address
        by_name.close()
        by_address.close()
        assert discovery_files() == []

        by_cluster = mlc.up(cluster=outside)
        by_cluster.scale(2)
        wait_for(lambda: len(outside.workers) == 2, what="scale through the Cluster object")
        by_cluster.close()
        assert outside.status.name == "running"  # attached, so closing leaves it running

        with Client(outside) as client:
            by_client = mlc.connect(client)
            by_client.close()
            assert client.status == "running"  # the caller's client stays open


def test_connect_with_scheduler_file(tmp_path: Any) -> None:
    path = tmp_path / "scheduler.json"
    with LocalCluster(n_workers=1, processes=True, dashboard_address=":0",
                      scheduler_kwargs={"scheduler_file": str(path)}) as outside:
        wait_for(path.exists, what="scheduler file")
        with mlc.up(scheduler_file=str(path)) as handle:
            assert handle.address == outside.scheduler_address


def test_factory_from_dask_config_builds_the_named_class() -> None:
    spec = {
        "module": "distributed",
        "class": "LocalCluster",
        "args": [],
        "kwargs": {"n_workers": 1, "threads_per_worker": 1, "processes": True,
                   "dashboard_address": ":0"},
    }
    with dask.config.set({"mlcloud.cluster.factory": spec}):
        with mlc.up(workers=2, name="from-config") as cluster:
            assert cluster.kind == "factory"
            assert type(cluster.cluster).__name__ == "LocalCluster"
            wait_for(lambda: cluster.info()["workers"] == 2, what="factory cluster scaled to 2")
        # --cpu / --gpu overrides the factory.
        with mlc.up(workers=1, gpu=False) as local:
            assert local.kind == "local-cpu"


def test_gpu_machine_picks_local_cuda_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: NVML and LocalCUDACluster are stood in for; the choice logic is real."""
    import dask_cuda

    made: dict[str, Any] = {}

    class FakeCUDACluster(LocalCluster):
        def __init__(self, n_workers: int, CUDA_VISIBLE_DEVICES: str, **kwargs: Any) -> None:
            made.update(n_workers=n_workers, devices=CUDA_VISIBLE_DEVICES)
            super().__init__(n_workers=n_workers, processes=True, **kwargs)

    monkeypatch.setattr("jupyter_mlcloud.cluster.api.gpu_count", lambda: 2)
    monkeypatch.setattr(dask_cuda, "LocalCUDACluster", FakeCUDACluster)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with mlc.up() as cluster:
        assert cluster.kind == "local-gpu"
        assert made == {"n_workers": 2, "devices": "0,1"}
    with pytest.raises(ValueError, match="more than the 2 visible GPU"):
        mlc.up(workers=3, gpu=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be an integer >= 1, got 0"),
        ({"workers": -2}, "workers must be an integer >= 1, got -2"),
        ({"threads_per_worker": 0}, "threads_per_worker must be an integer >= 1"),
        ({"adapt": "3:1"}, "adapt must be MIN:MAX .* got '3:1'"),
        ({"adapt": "two:four"}, "adapt must be MIN:MAX .* got 'two:four'"),
        ({"memory_limit": "lots"}, "memory_limit 'lots' is not understood"),
        ({"gpu": True}, "NVML sees no NVIDIA GPU"),
        ({"name": "no spaces"}, "cluster name 'no spaces' is not allowed"),
        ({"address": "tcp://127.0.0.1:9", "timeout": 1}, "could not reach a Dask scheduler at"),
        ({"address": "tcp://127.0.0.1:9", "workers": 2}, "attach to an existing cluster"),
    ],
)
def test_bad_input_is_one_sentence_and_leaves_nothing(kwargs: dict, message: str) -> None:
    before = {p.pid for p in child_processes()}
    with pytest.raises(ValueError, match=message) as err:
        mlc.up(**kwargs)
    assert "\n" not in str(err.value)
    assert discovery_files() == []
    assert clusters.handles() == []
    wait_for(lambda: {p.pid for p in child_processes()} <= before, what="no new processes")


def test_duplicate_name_is_refused_across_processes(runtime_dir: Any) -> None:
    import subprocess

    code = (
        "import sys, jupyter_mlcloud as mlc\n"
        "c = mlc.up(workers=1, name='shared')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "c.close()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and read_line(proc, what="ready").strip() == "ready"
        with pytest.raises(ValueError, match="a cluster named 'shared' already exists"):
            mlc.up(workers=1, name="shared")
        assert discovery.get("shared").pid == proc.pid  # the other process's file is untouched
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    assert discovery_files() == []


def test_down_refuses_other_process_cluster_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="no cluster in this process"):
        mlc.down()
    with pytest.raises(ValueError, match="no cluster named 'ghost'"):
        mlc.down(name="ghost")
    foreign = discovery.ClusterRecord(name="foreign", kind="local-cpu", pid=os.getppid(),
                                      status="running")
    discovery.write(foreign)
    with pytest.raises(ValueError, match=f"belongs to another process \\(pid {os.getppid()}"):
        mlc.down(name="foreign")
    discovery.remove("foreign")
