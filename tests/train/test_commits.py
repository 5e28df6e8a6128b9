"""Commits stay on the workers: a big model's state never passes through the kernel."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from distributed.comm.tcp import TCP

import jupyter_mlcloud as mlc
from jupyter_mlcloud.train.checkpoint import Position
from jupyter_mlcloud.train.commits import CommitIndex
from jupyter_mlcloud.train.launch import pick_buddies
from jupyter_mlcloud.train.rank.ring import Entry

CLUSTER = {"name": "commits", "workers": 2, "config": {"mlcloud.train.replace-timeout": 120}}
MIB = 2**20


def big_fit(ctx: Any, kill: bool = True) -> str:
    """SGD on Linear(10000, 10000), 381 MiB of float32; with ``kill``, rank 1 kills its worker
    at step 5 of attempt 0, once the launcher knows of step 4. Returns the final weights'
    SHA-256."""
    import hashlib
    import signal
    import time

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(10_000, 10_000)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    ddp = ctx.prepare(model, optimizer)
    x = torch.randn(8 * 8 * ctx.world_size, 10_000, generator=torch.Generator().manual_seed(1))
    for xb in ctx.shard(x, batch_size=8, shuffle=False):
        optimizer.zero_grad()
        ddp(xb).square().mean().backward()
        optimizer.step()
        ctx.report()
        if kill and ctx.attempt == 0 and ctx.rank == 1 and ctx.step == 5:
            while ctx.committed_step < 4:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
    return hashlib.sha256(model.weight.detach().numpy().tobytes()).hexdigest()


@pytest.fixture
def sent_sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The size of every message this process (the scheduler and the client) writes."""
    sizes: list[int] = []
    original = TCP.write

    async def write(self: TCP, msg: Any, serializers: Any = None,
                    on_error: str = "message") -> int:
        n = await original(self, msg, serializers, on_error)
        sizes.append(n)
        return n

    monkeypatch.setattr(TCP, "write", write)
    yield sizes


def test_a_big_model_is_committed_and_recovered_without_the_kernel(
        cluster: mlc.ClusterHandle, sent_sizes: list[int]) -> None:
    process, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    before = process.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = mlc.train(big_fit, cluster=cluster, max_failures=1)
        checksum = run.result(timeout=600)
    finally:
        stop.set()
        sampler.join()
    assert [e["kind"] for e in run.events] == ["recovery"] and run.events[0]["from_step"] >= 4
    # The weights came back from the survivor's copy exactly as if nothing had happened.
    assert checksum == mlc.train(big_fit, cluster=cluster, config={"kill": False}).result(600)
    growth = (peak[0] - before) / MIB
    commits = sum(s["commits"] for s in run.store.stats.values()) / run.world_size
    assert growth <= 64, f"the kernel grew by {growth:.0f} MiB during the run"
    assert run.store.pulled_bytes / commits <= 4096
    # Nothing near the model's size went through the scheduler or the client.
    assert max(sent_sizes) < MIB, f"a {max(sent_sizes) / MIB:.0f} MiB message crossed"


def test_buddies_are_on_another_host_when_there_is_one() -> None:
    hosts = {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c": "C"}
    assert pick_buddies(["a1", "a2", "b1", "b2"], hosts, []) == ["b1", "b1", "a1", "a1"]
    assert pick_buddies(["a1", "a2"], hosts, ["b1"]) == ["a2", "a1"]  # one host: the next
    assert pick_buddies(["a1"], hosts, ["a2", "c"]) == ["c"]  # a single rank: outside the run
    assert pick_buddies(["a1"], hosts, []) == [None]


def _entry(rank: int, step: int, state: bool, attempt: int = 0) -> Entry:
    return Entry(rank, attempt, Position(steps=step), state)


def test_the_index_resumes_from_the_newest_step_every_rank_committed() -> None:
    index = CommitIndex("r", world_size=2, base_world=2, replicated=True)
    held = {"w0": [_entry(0, 4, True), _entry(0, 5, True)],
            "w1": [_entry(1, 4, True), _entry(0, 4, False)]}  # rank 1 has not reached step 5
    meta, source = index._consistent(held)  # type: ignore[misc]
    assert (meta.step, source.holders, source.state_rank) == (4, {0: "w0", 1: "w1"}, None)
    # Not replicated: only rank 0's part holds the whole state; rank 1's copy lives on w0.
    index = CommitIndex("r", world_size=2, base_world=2, replicated=False)
    held = {"w0": [_entry(0, 6, True), _entry(1, 6, False)], "w1": [_entry(1, 7, True)]}
    meta, source = index._consistent(held)  # type: ignore[misc]
    assert (meta.step, source.holders, source.state_holder) == (6, {0: "w0", 1: "w0"}, "w0")
    assert index._consistent({"w0": [_entry(0, 6, False)]}) is None


def mid_fit(ctx: Any, manual: bool = False, kill: bool = True) -> str:
    """A 4 MiB model, so its commits are copied off the training thread; with ``manual`` the
    update is hand-written (no ``optimizer.step()`` to wait at). Rank 1 kills its worker at
    step 7 of attempt 0. Returns the final weights' SHA-256."""
    import hashlib
    import signal
    import time

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.Tanh(),
                                torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    ddp = ctx.prepare(model, optimizer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16 * 12 * ctx.world_size, 64, generator=g)
    y = x.sum(1, keepdim=True).sin()
    for xb, yb in ctx.shard((x, y), batch_size=16, shuffle=False):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(xb), yb).backward()
        if manual:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-1e-2)
        else:
            optimizer.step()
        ctx.report()
        if kill and ctx.attempt == 0 and ctx.rank == 1 and ctx.step == 7:
            while ctx.committed_step < 6:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("manual", [False, True], ids=["optimizer-step", "hand-written-update"])
def test_commits_copied_off_the_training_thread_are_never_torn(
        cluster: mlc.ClusterHandle, manual: bool) -> None:
    run = mlc.train(mid_fit, cluster=cluster, max_failures=1, config={"manual": manual})
    checksum = run.result(timeout=300)
    assert [e["kind"] for e in run.events] == ["recovery"]
    expected = mlc.train(mid_fit, cluster=cluster,
                         config={"manual": manual, "kill": False}).result(300)
    assert checksum == expected
    stats = list(run.store.stats.values())
    assert sum(s["deferred"] for s in stats) > 0
    torn = sum(s["torn"] for s in stats)
    # A hand-written update changes the weights while they are copied: every such copy is
    # dropped, and the rank copies at once from then on.
    assert (torn > 0) if manual else (torn == 0)
