"""Retired workers (``retire_workers``, SIGTERM, a cloud's preemption notice) are planned
moves: every rank commits one same step at once, and the run hands over to a replacement from
that step without using any of ``max_failures`` (a real 3-worker LocalCluster, real gloo
groups). The runs here take no periodic commit, so the step a move resumes from can only be
the one committed at the retirement."""

from __future__ import annotations

import os
import signal
from typing import Any

import dask

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import info as cluster_info
from tests.conftest import MetadataServer, wait_for

CLUSTER = {"name": "preemption-tests", "workers": 3}
NO_PERIODIC_COMMIT = 1_000_000


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
            ctx.report(loss=loss.item())
            time.sleep(0.02)


def steps_done(run: Any) -> int:
    """The most steps rank 0 has reported (steps resume with their count after a move)."""
    frame = run.metrics
    steps = frame[frame["rank"] == 0]["step"] if len(frame) else frame
    return int(steps.max()) if len(steps) else 0  # rank 1's points may come first


def move(run: Any, attempt: int, retire: Any, what: str) -> int:
    """Retire one of the run's workers with ``retire`` once it has gone 5 steps further; check
    that the run moved as planned from a step committed then; return that step."""
    start = steps_done(run)
    wait_for(lambda: steps_done(run) >= start + 5, 120, f"5 more steps before {what}")
    seen = steps_done(run)
    retire()
    wait_for(lambda: run.attempt == attempt and run.status == "running", 120,
             f"the handover after {what}")
    record = run.events[-1]
    assert record["planned"] and record["from_step"] >= seen
    assert run.committed_step == record["from_step"]
    return int(record["from_step"])


def test_retire_workers_and_sigterm_commit_at_once_and_move_as_planned(
        cluster: mlc.ClusterHandle) -> None:
    client = cluster.client
    run = mlc.train(long_fit, cluster=cluster, workers=2, max_failures=1, track=False,
                    commit_every=NO_PERIODIC_COMMIT)
    try:
        first = move(run, 1, lambda: client.retire_workers([run.workers[1]], close_workers=True),
                     "retire_workers")

        cluster.scale(3)  # a spare again, for the next move
        wait_for(lambda: len(cluster_info.workers(client)) >= 3, 120, "a third worker")
        worker = run.workers[0]
        pid = client.run(os.getpid, workers=[worker])[worker]
        assert move(run, 2, lambda: os.kill(pid, signal.SIGTERM), "SIGTERM") > first
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
        run = mlc.train(long_fit, cluster=cluster, workers=2, max_failures=1, track=False,
                        commit_every=NO_PERIODIC_COMMIT)
    try:
        victim = run.workers[1]
        name = cluster_info.workers(client)[victim]["name"]
        # The cloud's notice, for that worker alone.
        move(run, 1, lambda: metadata_server.preempted.add(str(name)), "the notice")
        assert run.events[-1]["lost"] == [victim]
        assert run.failures == 0  # not counted as a failure
    finally:
        run.cancel()
        client.unregister_worker_plugin("mlcloud-preemption-notice")
    cluster.scale(3)
