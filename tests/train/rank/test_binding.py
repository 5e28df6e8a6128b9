"""A rank's training thread bound to a core when the user asks: on real workers, with the
collective threads left free, and given back when the rank ends."""

from __future__ import annotations

import os
import threading
from typing import Any

import dask
import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.train.rank import binding

CLUSTER = {"name": "binding", "workers": 2}
CPUS = sorted(os.sched_getaffinity(0))


def in_thread(fn: Any) -> Any:
    """``fn()`` on a thread of its own (binding changes the calling thread's mask)."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    return out[0]


def test_a_thread_is_bound_to_its_local_ranks_core_and_given_its_mask_back() -> None:
    def bind_and_release() -> tuple[int | None, set[int], set[int]]:
        bound = binding.CoreBinding(local_rank=len(CPUS) - 1, local_world_size=len(CPUS))
        core, during = bound.core, os.sched_getaffinity(0)
        bound.release()
        return core, during, os.sched_getaffinity(0)

    core, during, after = in_thread(bind_and_release)
    assert core == CPUS[-1] and during == {CPUS[-1]} and after == set(CPUS)
    assert os.sched_getaffinity(0) == set(CPUS)  # this thread was never touched


def test_more_ranks_than_cores_stay_unbound() -> None:
    def bind() -> tuple[int | None, set[int]]:
        bound = binding.CoreBinding(local_rank=0, local_world_size=len(CPUS) + 1)
        return bound.core, os.sched_getaffinity(0)

    assert in_thread(bind) == (None, set(CPUS))


def masks(ctx: Any) -> dict[str, list[int]]:
    """Rank 0's core mask, and its collective threads', at its first step."""
    import os

    import torch

    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(ctx.prepare(model).parameters(), lr=0.01)
    optimizer.zero_grad()
    model(torch.ones(4, 8)).sum().backward()
    optimizer.step()
    gloo = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if "gloo" in f.read():
                gloo.update(os.sched_getaffinity(int(tid)))
    return {"mine": sorted(os.sched_getaffinity(0)), "gloo": sorted(gloo)}


def task_thread_mask() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CPUS) < 2, reason="binding 2 ranks needs 2 cores")
def test_a_rank_trains_on_its_own_core_and_its_worker_thread_is_free_again(
        cluster: mlc.ClusterHandle) -> None:
    with dask.config.set({"mlcloud.train.bind-cores": True}):
        run = mlc.train(masks, cluster=cluster, workers=2)
        seen = run.result(timeout=120)
    # Rank 0 is its host's local rank 0; the group's threads run on any core.
    assert seen == {"mine": [CPUS[0]], "gloo": CPUS}
    worker = run.workers[0]
    after = cluster.client.submit(task_thread_mask, workers=[worker], pure=False)
    assert after.result(timeout=60) == CPUS  # the thread's next task runs unbound


def test_ranks_are_unbound_unless_asked(cluster: mlc.ClusterHandle) -> None:
    seen = mlc.train(masks, cluster=cluster, workers=2).result(timeout=120)
    assert seen == {"mine": CPUS, "gloo": CPUS}
