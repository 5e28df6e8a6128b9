"""Faults of one host of two (network namespaces): its worker process SIGKILLed, or its link
cut in the middle of a run. Each test leaves the shared cluster whole again."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dask
import torch

import jupyter_mlcloud as mlc
from jupyter_mlcloud.train.run import describe_recovery
from tests.conftest import digest, make_fit, wait_for
from tests.multihost import netns
from tests.multihost.conftest import SharedHosts


def _host_of(across: SharedHosts, worker: str) -> netns.Host:
    return next(h for h in across.dask.workers if across.worker_on(h) == worker)


def _pids_in(host: netns.Host) -> set[int]:
    return {int(p) for p in netns.ip("netns", "pids", host.namespace).split()}


def test_a_sigkilled_worker_process_recovers_as_on_one_host(across: SharedHosts,
                                                            one_host: Any) -> None:
    client = across.handle.client
    expected = digest(mlc.train(make_fit(), cluster=one_host, track=False).result(timeout=120))
    with dask.config.set({"mlcloud.train.replace-timeout": 90}):
        # Rank 1 SIGKILLs its own worker process at step 9; the host's nanny starts another.
        run = mlc.train(make_fit(kills=((0, 1, 9),)), cluster=across.handle, max_failures=1,
                        timeout=60, track=False)
        victim = run.workers[1]
        host = _host_of(across, victim)
        pid = client.run(os.getpid, workers=[victim])[victim]
        assert pid in _pids_in(host)  # the process killed lives in that host's namespace
        model = run.result(timeout=240)

    assert digest(model) == expected, "the recovered run differs from one host's"
    (record,) = run.events
    assert record["kind"] == "recovery" and record["lost"] == [victim]
    assert record["lost_ranks"] == [1] and record["world_size"] == 2
    assert record["from_step"] > 0  # from a commit, not from scratch
    replacement = across.worker_on(host)  # the nanny's new worker, on the same host
    assert replacement != victim and replacement in run.workers
    new_pid = client.run(os.getpid, workers=[replacement])[replacement]
    assert new_pid != pid and new_pid in _pids_in(host)


def _gated_fit(ready: str, gate: str) -> Any:
    """DDP steps, made inside a function so that it travels by value. On the first attempt,
    rank 0 writes ``ready`` at step 5 and waits for ``gate``: the run cannot end before the
    test has cut a link; a resumed attempt goes straight through."""

    def fit(ctx: Any) -> Any:
        import os
        import time

        import torch

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 1)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        ddp = ctx.prepare(model, optimizer)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 8, generator=g, dtype=torch.float64)
        y = x.sum(1, keepdim=True).sin()
        losses = []
        for _ in ctx.epochs(2):
            for xb, yb in ctx.shard((x, y), batch_size=16):
                loss = torch.nn.functional.mse_loss(ddp(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ctx.report(loss=loss)  # counts ctx.step
                losses.append(loss.item())
                if ctx.attempt == 0 and ctx.rank == 0 and ctx.step == 5:
                    with open(ready, "w"):
                        pass
                    deadline = time.monotonic() + 120  # bounded, should the test die
                    while not os.path.exists(gate) and time.monotonic() < deadline:
                        time.sleep(0.02)
        return model, losses

    return fit


def test_a_cut_link_is_detected_and_the_run_goes_on_with_one_worker(across: SharedHosts,
                                                                     tmp_path: Path) -> None:
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    with dask.config.set({"mlcloud.train.replace-timeout": 2}):
        run = mlc.train(_gated_fit(str(ready), str(gate)), cluster=across.handle,
                        max_failures=1, min_workers=1, timeout=20, track=False)
        victim = run.workers[1]
        host = _host_of(across, victim)
        wait_for(lambda: ready.exists() or run.status not in ("pending", "running"), 120,
                 "rank 0 at step 5")
        assert ready.exists(), (run.status, run.logs)
        netns.ip("-n", host.namespace, "link", "set", host.interface, "down")
        cut = time.time()
        try:
            gate.touch()
            model, losses = run.result(timeout=180)
        finally:
            netns.ip("-n", host.namespace, "link", "set", host.interface, "up")

    (record,) = run.events
    assert record["lost"] == [victim] and record["lost_ranks"] == [1]
    assert record["world_size"] == 1 and run.world_size == 1 and record["from_step"] >= 5
    # Noticed through the configured timeouts: the scheduler's worker-ttl and connect timeout
    # (5 s each; about 13 s here), else the run's collective timeout (20 s) and the grace the
    # scheduler then gets to report the departure (5 s).
    assert record["phases"]["detected"] - cut < 30, record["phases"]
    sentence = describe_recovery(record)
    assert sentence.startswith(f"[mlcloud] lost rank(s) [1]; recovery 1 resumes from step"
                               f" {record['from_step']} on 1 worker(s):"), sentence
    assert isinstance(model, torch.nn.Module) and all(map(torch.isfinite, map(torch.tensor,
                                                                               losses)))

    # Back on the network, the host rejoins: the scheduler had dropped its worker for silence,
    # so its nanny (the rejoin preload) starts a fresh worker in the same `dask worker` process.
    old = [p for p in across.dask.network.processes if host.namespace in p.args]
    wait_for(lambda: across.worker_count() == 2, 120, "the cut-off host's worker to rejoin")
    assert all(p.poll() is None for p in old), across.dask.log_tails()
    (log,) = [log for log in across.dask.logs if log.name == f"worker-{host.address}.log"]
    assert "starting a fresh worker to rejoin the cluster" in log.read_text()
    assert across.worker_on(host) != victim
