"""A run's lifecycle: its state machine, and cancels at every phase of real runs (a 2-worker
LocalCluster, real gloo groups, a SIGKILLed worker), each followed by a run on both workers."""

from __future__ import annotations

import importlib
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import info as cluster_info
from jupyter_mlcloud.train.rank import cancel
from jupyter_mlcloud.train.run import Run
from tests.conftest import wait_for
from tests.conftest import wait_for_workers as wait_until_workers

# The module (the package exports its ``launch`` function under the same name).
launch_module = importlib.import_module("jupyter_mlcloud.train.launch")
run_module = importlib.import_module("jupyter_mlcloud.train.run")

STATES = ["pending", "running", "recovering", "cancelling", "finished", "error", "cancelled"]
ALLOWED = {
    ("pending", "running"), ("pending", "cancelling"), ("pending", "error"),
    ("running", "recovering"), ("running", "cancelling"), ("running", "finished"),
    ("running", "error"),
    ("recovering", "running"), ("recovering", "cancelling"), ("recovering", "error"),
    ("cancelling", "cancelled"),
}
PATHS = {  # legal moves from pending to each state
    "pending": [], "running": ["running"], "recovering": ["running", "recovering"],
    "cancelling": ["cancelling"], "finished": ["running", "finished"],
    "error": ["running", "error"], "cancelled": ["cancelling", "cancelled"],
}


def unit_run(state: str = "pending") -> Run:
    """A Run without a cluster, moved to ``state``."""
    run = Run("unit", None, ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"])
    for step in PATHS[state]:
        assert run._transition(step), step
    assert run.status == state
    return run


# ---------------------------------------------------------------- the state machine alone


def test_every_transition_is_allowed_or_refused_as_the_table_says() -> None:
    for start, target in itertools.product(STATES, STATES):
        run = unit_run(start)
        allowed = (start, target) in ALLOWED
        assert run._transition(target) is allowed, (start, target)
        assert run.status == (target if allowed else start), (start, target)


def test_a_final_state_is_never_left() -> None:
    for final in ("finished", "error", "cancelled"):
        run = unit_run(final)
        run.cancel(wait=False)
        run._end("error", mlc.TrainingError("late"))
        run._end("finished", result=1)
        assert run.status == final and run._result is None


def test_a_cancel_in_any_unfinished_state_ends_as_cancelled() -> None:
    for state in ("pending", "running", "recovering"):
        for ending in ("finished", "error"):
            run = unit_run(state)
            run.cancel(wait=False)
            assert run.status == "cancelling"
            # What the watcher does next: go back to running (a recovery that completed),
            # then end as the ranks did; neither may overwrite the cancel.
            assert not run._transition("running")
            run._end(ending, mlc.TrainingError("rank 1 failed"), result=42)
            assert run.status == "cancelled", (state, ending)
            assert run._result is None and "cancelled" in str(run._error)


def test_after_the_end_cancel_changes_nothing() -> None:
    run = unit_run("running")
    run._end("finished", result={"model": 1})
    run._close()
    run.cancel()  # returns at once: the run is done
    assert run.status == "finished" and run.result(timeout=1) == {"model": 1}


def test_an_unknown_state_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="run state 'paused' is unknown; allowed: pending,"):
        unit_run()._transition("paused")


def test_a_cancel_before_start_stops_the_run_without_ranks() -> None:
    run = unit_run()
    run.cancel(wait=False)
    run.start([])
    assert run.wait(30) and run.status == "cancelled"
    with pytest.raises(mlc.TrainingError, match="the run was cancelled"):
        run.result(timeout=1)


def test_done_callbacks_run_once_each_even_when_one_raises() -> None:
    run = unit_run("running")
    calls: list[tuple[str, Any]] = []

    def failing(done: Run) -> None:
        calls.append(("failing", done.status))
        raise RuntimeError("a broken display")

    run.add_done_callback(failing)
    run.add_done_callback(lambda done: calls.append(("second", done.status)))
    assert calls == []
    run._end("finished", result=1)
    run._close()
    assert calls == [("failing", "finished"), ("second", "finished")]
    run.add_done_callback(lambda done: calls.append(("late", done.status)))  # called at once
    assert calls[-1] == ("late", "finished") and len(calls) == 3
    with pytest.raises(ValueError, match="add_done_callback needs a function taking the run"):
        run.add_done_callback("not callable")  # type: ignore[arg-type]


def test_callbacks_added_while_the_run_ends_are_each_called_exactly_once() -> None:
    for _ in range(20):
        run = unit_run("running")
        counts = [0] * 16
        start = threading.Barrier(len(counts) + 1)

        def add(i: int, run: Run = run, counts: list[int] = counts,
                start: threading.Barrier = start) -> None:
            start.wait()
            run.add_done_callback(lambda _: counts.__setitem__(i, counts[i] + 1))

        threads = [threading.Thread(target=add, args=(i,)) for i in range(len(counts))]
        for t in threads:
            t.start()
        start.wait()
        run._end("finished")
        run._close()
        for t in threads:
            t.join(10)
        assert counts == [1] * len(counts)


def test_a_listener_added_with_replay_gets_every_line_once_while_lines_arrive() -> None:
    for _ in range(20):
        run = unit_run("running")
        sent = [{"rank": i % 2, "stream": "stdout", "line": str(i)} for i in range(400)]
        got: list[str] = []
        half = threading.Event()

        def arrive(run: Run = run, half: threading.Event = half,
                   sent: list[dict[str, Any]] = sent) -> None:
            for i, item in enumerate(sent):  # one event per line, as a subscription delivers
                run._on_logs((0.0, {"items": [item]}))
                if i == len(sent) // 2:
                    half.set()

        feeder = threading.Thread(target=arrive)
        feeder.start()
        half.wait(10)
        run.add_listener(lambda kind, items, got=got: got.extend(i["line"] for i in items),
                         replay=True)
        feeder.join(10)
        assert got == [item["line"] for item in sent]


# ---------------------------------------------------------------- real runs


CLUSTER = {"name": "lifecycle", "workers": 2}  # the shared module cluster (conftest)


def wait_for_workers(cluster: mlc.ClusterHandle, n: int) -> list[str]:
    """Until ``n`` workers are up (conftest's wait); their addresses, sorted."""
    wait_until_workers(cluster, n)
    return sorted(cluster_info.workers(cluster.client))


def endless(ctx: Any, kill_at: int = 0) -> None:
    """DDP steps until cancelled (allreduces in every backward). ``kill_at``: at that step of
    the first attempt, rank 1 SIGKILLs its own worker."""
    import os
    import signal

    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ddp = ctx.prepare(model, optimizer)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    for _ in ctx.epochs(10**9):
        for xb in ctx.shard(x, batch_size=8):
            loss = ddp(xb).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.report(loss=loss)
            if kill_at and ctx.attempt == 0 and ctx.rank == 1 and ctx.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


def _rank_state() -> tuple[bool, list[str]]:
    import torch.distributed as dist

    from jupyter_mlcloud.train.rank import cancel

    return dist.is_initialized(), cancel.busy_with()


def _allreduce_world(ctx: Any) -> float:
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t)


def check_cancelled_and_workers_free(run: Run, cluster: mlc.ClusterHandle,
                                     expected: str = "cancelled") -> None:
    """``run`` ended as ``expected``, its ranks are gone from the workers it used, and both
    workers of the cluster take the next run together."""
    assert run.done() and run.status == expected, run
    if expected == "cancelled":
        with pytest.raises(mlc.TrainingError, match="the run was cancelled"):
            run.result(timeout=1)
    # Done means every rank ended (not given up on): nothing of it is left on any worker.
    states = cluster.client.run(_rank_state)
    assert all(state == (False, []) for state in states.values()), states
    workers = wait_for_workers(cluster, 2)
    following = mlc.train(_allreduce_world, cluster=cluster, workers=2)
    assert following.result(timeout=120) == 2.0 and sorted(following.workers) == workers


def test_cancel_right_after_train_returns(cluster: mlc.ClusterHandle) -> None:
    for _ in range(6):  # lands before the ranks start, in the rendezvous or at a first step
        run = mlc.train(endless, cluster=cluster, timeout=600)
        run.cancel()
        check_cancelled_and_workers_free(run, cluster)


def test_cancel_while_pending_before_the_ranks_were_submitted(
        cluster: mlc.ClusterHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    original = launch_module.RankStarter.__call__
    seen: list[str] = []

    def then_cancel(self: Any, *args: Any) -> list[Any]:
        futures = original(self, *args)
        if self.payload.fn is endless:  # not the run that checks the workers afterwards
            (run,) = launch_module.active_runs()
            seen.append(run.status)
            run.cancel(wait=False)  # inside launch: the run has not been started yet
        return futures

    monkeypatch.setattr(launch_module.RankStarter, "__call__", then_cancel)
    for _ in range(3):
        run = mlc.train(endless, cluster=cluster, timeout=600)
        assert run.wait(120)
        assert seen[-1] == "pending"
        check_cancelled_and_workers_free(run, cluster)


def _early_cancels() -> list[tuple[str, int]]:
    from jupyter_mlcloud.train.rank import cancel

    with cancel._lock:
        return list(cancel._early_cancels)


def _hold(started: str, gate: str) -> None:
    """Occupies its worker's only thread until ``gate`` exists."""
    import os

    open(started, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("held", [(1,), (0,), (0, 1)])
def test_cancel_during_the_rendezvous(cluster: mlc.ClusterHandle, tmp_path: Path,
                                      held: tuple[int, ...]) -> None:
    """The held ranks' tasks wait behind another task on their workers, so a free peer sits in
    the rendezvous; the cancel reaches the held ranks before their tasks start."""
    for attempt in range(3):
        workers = wait_for_workers(cluster, 2)
        gate = tmp_path / f"gate-{attempt}"
        blockers = []
        for rank in held:
            started = tmp_path / f"started-{attempt}-{rank}"
            blockers.append(cluster.client.submit(
                _hold, str(started), str(gate), workers=[workers[rank]],
                allow_other_workers=False, pure=False))
            wait_for(started.exists, timeout=60, what="the blocking task to start")
        run = mlc.train(endless, cluster=cluster, timeout=600)
        assert run.workers == workers
        for peer in (w for rank, w in enumerate(workers) if rank not in held):
            wait_for(lambda run=run, peer=peer: run.id in cluster.client.run(
                         cancel.busy_with, workers=[peer])[peer],
                     timeout=60, what="the free rank to reach the rendezvous")
        run.cancel(wait=False)
        assert run.status == "cancelling"
        # Only once the cancel reached the held workers (kept there for the rank that has not
        # started yet) may their tasks start.
        for rank in held:
            wait_for(lambda run=run, w=workers[rank]: (run.id, 0) in cluster.client.run(
                         _early_cancels, workers=[w])[w],
                     timeout=60, what="the cancel to reach the held worker")
        gate.touch()
        cluster.client.gather(blockers)
        assert run.wait(120)
        check_cancelled_and_workers_free(run, cluster)


def test_cancel_mid_step(cluster: mlc.ClusterHandle) -> None:
    for _ in range(6):
        run = mlc.train(endless, cluster=cluster, timeout=600)
        wait_for(lambda run=run: len(run.metrics) > 0, timeout=120, what="a first metric point")
        run.cancel()
        check_cancelled_and_workers_free(run, cluster)


def test_a_result_that_times_out_says_where_each_rank_is(cluster: mlc.ClusterHandle) -> None:
    run = mlc.train(endless, cluster=cluster, timeout=600)
    try:
        wait_for(lambda: len(run.metrics) > 0, timeout=120, what="a first metric point")
        with pytest.raises(TimeoutError, match=r"^run \w+ is still running after 0\.1 s:"
                                               r" rank 0 has done \d+ step\(s\), rank 1 has"
                                               r" done \d+ step\(s\)\.$"):
            run.result(timeout=0.1)
    finally:
        run.cancel()
    check_cancelled_and_workers_free(run, cluster)


def test_a_cancel_reaches_the_ranks_before_the_watcher_looks(
        cluster: mlc.ClusterHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """cancel() tells the ranks itself: the watcher, which looks this time only every 300 s,
    wakes when their tasks end (a pruned trial frees its workers that much sooner)."""
    monkeypatch.setattr(run_module, "WATCH_INTERVAL_S", 300.0)
    run = mlc.train(endless, cluster=cluster, timeout=600)
    wait_for(lambda: len(run.metrics) > 0, timeout=120, what="a first metric point")
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 150  # not the watcher's 300 s
    check_cancelled_and_workers_free(run, cluster)


def blocked_in_a_collective(ctx: Any) -> None:
    """Rank 0 waits in an allreduce that rank 1 never joins; rank 1 loops on ``ctx.report``."""

    import torch
    import torch.distributed as dist

    ctx.report(ready=1)
    if ctx.rank == 0:
        dist.all_reduce(torch.ones(1))
    while True:
        ctx.report(waiting=1)
        time.sleep(0.01)


def test_cancel_releases_a_rank_blocked_in_a_collective(cluster: mlc.ClusterHandle) -> None:
    for _ in range(3):
        run = mlc.train(blocked_in_a_collective, cluster=cluster, timeout=600)
        wait_for(lambda run=run: {0, 1} <= set(run.metrics["rank"]), timeout=120,
                 what="both ranks to report")
        run.cancel()  # rank 1 stops at its report; its closed group releases rank 0
        check_cancelled_and_workers_free(run, cluster)


def torchrun_style(ctx: Any, marker: str) -> None:
    """A pasted torchrun script: DDP and its optimizer, and nothing of ``ctx``."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.get_rank() == 0:
        open(marker, "w").close()
    ddp = DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    while True:
        ddp(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_cancel_stops_a_loop_that_only_steps_its_optimizer(cluster: mlc.ClusterHandle,
                                                           tmp_path: Path) -> None:
    for attempt in range(3):
        marker = tmp_path / f"training-{attempt}"
        run = mlc.train(torchrun_style, str(marker), cluster=cluster, timeout=600)
        wait_for(marker.exists, timeout=120, what="the script to start training")
        run.cancel()
        check_cancelled_and_workers_free(run, cluster)


def test_cancel_during_recovery(cluster: mlc.ClusterHandle) -> None:
    for _ in range(3):
        run = mlc.train(endless, 5, cluster=cluster, max_failures=1, timeout=600)
        wait_for(lambda run=run: run.status != "running", timeout=120,
                 what="the recovery to start")
        assert run.status == "recovering"
        run.cancel()
        assert run.attempt <= 1
        check_cancelled_and_workers_free(run, cluster)


def test_cancel_just_after_the_end_keeps_finished(cluster: mlc.ClusterHandle) -> None:
    for _ in range(5):
        run = mlc.train(_allreduce_world, cluster=cluster)
        assert run.result(timeout=120) == 2.0
        run.cancel()
        assert run.result(timeout=1) == 2.0
        check_cancelled_and_workers_free(run, cluster, expected="finished")


def test_the_loss_panel_learns_the_end_from_a_done_callback(cluster: mlc.ClusterHandle) -> None:
    run = mlc.train(endless, cluster=cluster, timeout=600)
    wait_for(lambda: len(run.metrics) > 0, timeout=120, what="a first metric point")
    widget = run.monitor()
    notices: list[str] = []
    run.add_done_callback(lambda done: notices.append(done.status))
    assert not any(t.name.startswith("panel-") for t in threading.enumerate())
    run.cancel()
    notice = widget.live.layout.select_one({"name": "notice"})
    # Callbacks run on the watcher thread right after the run is done: wait for them.
    wait_for(lambda: notices == ["cancelled"] and notice.text == f"run {run.id} cancelled",
             timeout=30, what="the done callbacks")
    check_cancelled_and_workers_free(run, cluster)
