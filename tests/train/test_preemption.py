"""Retired workers (``retire_workers``, SIGTERM, a cloud's preemption notice) are planned
moves: the run hands over to a replacement from its last commit without using any of
``max_failures`` (a real 3-worker LocalCluster, real gloo groups)."""

from __future__ import annotations

import os
import signal
from typing import Any

import dask

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import info as cluster_info
from tests.conftest import MetadataServer, wait_for

CLUSTER = {"name": "preemption-tests", "workers": 3}


def long_fit(ctx: Any) -> None:
    import time

    import torch

    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ddp = ctx.prepare(model, optimizer)
    x = torch.randn(64, 4)
    for _ in ctx.epochs(400):
        for xb in ctx.shard(x, batch_size=8):
            loss = ddp(xb).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            time.sleep(0.02)


def test_a_retired_and_a_sigtermed_worker_are_planned_moves_not_failures(
        cluster: mlc.ClusterHandle) -> None:
    client = cluster.client
    run = mlc.train(long_fit, cluster=cluster, workers=2, max_failures=1, track=False)
    try:
        wait_for(lambda: run.committed_step >= 3, 120, "a first commit")
        client.retire_workers([run.workers[1]], close_workers=True)
        wait_for(lambda: run.attempt == 1 and run.status == "running"
                 and run.committed_step > run.events[-1]["from_step"], 120, "the handover")
        assert run.events[-1]["planned"]

        cluster.scale(3)  # a spare again, for the next move
        wait_for(lambda: len(cluster_info.workers(client)) >= 3, 120, "a third worker")
        worker = run.workers[0]
        pid = client.run(os.getpid, workers=[worker])[worker]
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: run.attempt == 2 and run.status == "running"
                 and run.committed_step > run.events[-1]["from_step"], 120,
                 "the handover after SIGTERM")
        assert run.events[-1]["planned"]
        # Two moves, one allowed failure: neither was counted as one.
        assert run.failures == 0
    finally:
        run.cancel()
    cluster.scale(3)


def test_a_preemption_notice_retires_its_worker_and_the_run_moves_as_planned(
        cluster: mlc.ClusterHandle, metadata_server: MetadataServer) -> None:
    client = cluster.client
    wait_for(lambda: len(cluster_info.workers(client)) >= 3, 120, "three workers")
    url = metadata_server.url + "/notice/{name}"
    with dask.config.set({"mlcloud.preemption.notice": url, "mlcloud.preemption.every": 0.2}):
        run = mlc.train(long_fit, cluster=cluster, workers=2, max_failures=1, track=False)
    try:
        wait_for(lambda: run.committed_step >= 3, 120, "a first commit")
        victim = run.workers[1]
        name = cluster_info.workers(client)[victim]["name"]
        metadata_server.preempted.add(str(name))  # the cloud's notice, for that worker alone
        wait_for(lambda: run.attempt == 1 and run.status == "running"
                 and run.committed_step > run.events[-1]["from_step"], 120,
                 "the handover after the notice")
        assert run.events[-1]["planned"] and run.events[-1]["lost"] == [victim]
        assert run.failures == 0  # not counted as a failure
    finally:
        run.cancel()
        client.unregister_worker_plugin("mlcloud-preemption-notice")
    cluster.scale(3)
