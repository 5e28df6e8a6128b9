"""Data-parallel training on a real 2-worker LocalCluster with real gloo process groups."""

from __future__ import annotations

import _thread
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import api as clusters
from jupyter_mlcloud.cluster.timers import RANK_WORKER as QUIET_TIMERS
from tests.conftest import ipython_shell, wait_for

SCRIPT = textwrap.dedent(
    """
    import hashlib, os
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    net = net.double()
    ddp = DDP(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(20):
        x = torch.randn(32, 8, generator=g, dtype=torch.float64)
        loss = torch.nn.functional.mse_loss(ddp(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
    digest = hashlib.sha256(b"".join(
        v.numpy().tobytes() for v in net.state_dict().values())).hexdigest()
    if rank == 0 and os.environ.get("DIGEST_FILE"):
        open(os.environ["DIGEST_FILE"], "w").write(digest)
    # The DDP reducer must go before the group: the other order aborts the process at exit
    # now and then ("terminate called without an active exception"), under torchrun too.
    del ddp, opt
    import gc
    gc.collect()
    dist.destroy_process_group()
    """
)


CLUSTER = {"name": "train-tests", "workers": 2}


@pytest.fixture
def shell(cluster: mlc.ClusterHandle) -> Iterator[InteractiveShell]:
    with ipython_shell() as ip:
        yield ip


def _worker_state(cluster: mlc.ClusterHandle) -> dict[str, Any]:
    def probe() -> tuple[bool, int, int, list[str]]:
        import threading

        import psutil
        import torch.distributed as dist

        from jupyter_mlcloud.train.rank import cancel

        return (dist.is_initialized(), threading.active_count(), psutil.Process().num_fds(),
                cancel.busy_with())

    return cluster.client.run(probe)


def test_cell_equals_torchrun_bit_for_bit(shell: InteractiveShell, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    digest_file = tmp_path / "digest"
    env = {**os.environ, "DIGEST_FILE": str(digest_file), "OMP_NUM_THREADS": "1"}
    # The peer, with a static rendezvous on loopback: --standalone's c10d rendezvous goes
    # through the hostname and a port torchrun picks, which a busy machine can lose.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "2",
         str(script)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shell.run_cell_magic("distributed_train", "--workers 2 --out digest", SCRIPT)
    assert shell.user_ns["digest"] == digest_file.read_text()


SHARD_KINDS = ["tensor", "numpy", "dataset", "xarray", "xarray-dataset", "dask"]


def _data(kind: str, n: int) -> Any:
    ids = np.arange(n)
    if kind == "tensor":
        return torch.arange(n)
    if kind == "numpy":
        return ids
    if kind == "dataset":
        return torch.utils.data.TensorDataset(torch.arange(n))
    import dask.array as da
    import xarray as xr

    lazy = da.from_array(ids, chunks=7)
    if kind == "dask":
        return lazy
    array = xr.DataArray(lazy, dims=["sample"], coords={"sample": ids})
    if kind == "xarray":
        return array
    return xr.Dataset({"id": array, "double": array * 2})


@pytest.mark.parametrize("kind", SHARD_KINDS)
def test_shards_are_disjoint_and_cover_the_data(cluster: mlc.ClusterHandle, kind: str) -> None:
    def each_rank_sees(ctx: Any, data: Any) -> list[list[int]]:
        import torch.distributed as dist

        seen = []
        for batch in ctx.shard(data, batch_size=8, seed=3):
            if isinstance(batch, (list, tuple)):
                if len(batch) == 2 and not isinstance(data, torch.utils.data.Dataset):
                    assert torch.equal(batch[1], batch[0] * 2)  # Dataset variables stay aligned
                batch = batch[0]
            seen.extend(int(i) for i in batch)
        everyone: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(everyone, seen)
        return everyone

    per_rank = mlc.train(each_rank_sees, _data(kind, 40), cluster=cluster).result(timeout=120)
    assert len(per_rank) == 2 and all(len(r) == 20 for r in per_rank)
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40))


def test_streamed_output_metrics_and_out_names(shell: InteractiveShell,
                                               capsys: pytest.CaptureFixture) -> None:
    shell.run_cell("import torch\nX = torch.randn(64, 4)\ny = X.sum(1, keepdim=True)")
    shell.run_cell_magic("distributed_train", "--out model,steps --epochs 2", textwrap.dedent("""
        model = ctx.prepare(torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = 0
        for epoch in ctx.epochs():
            for xb, yb in ctx.shard((X, y), batch_size=16):
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                opt.zero_grad(); loss.backward(); opt.step()
                ctx.report(loss=loss)
                steps += 1
        print(f"rank {ctx.rank} of {ctx.world_size} did {steps} steps")
    """))
    out = capsys.readouterr().out
    assert "[rank 0] rank 0 of 2 did 4 steps" in out
    assert "[rank 1] rank 1 of 2 did 4 steps" in out
    model = shell.user_ns["model"]
    assert type(model) is torch.nn.Linear  # unwrapped from DDP
    assert model.weight.device.type == "cpu" and shell.user_ns["steps"] == 4


def test_a_monitor_made_after_the_ranks_printed_still_shows_every_line(
        cluster: mlc.ClusterHandle, capsys: pytest.CaptureFixture) -> None:
    from jupyter_mlcloud.widgets import RunMonitor

    def fn(ctx: Any) -> None:
        print(f"hello from rank {ctx.rank}")

    run = mlc.train(fn, cluster=cluster)
    assert run.wait(120) and run.status == "finished"
    RunMonitor(run).follow()  # as a slow cell would: made once every line had arrived
    out = capsys.readouterr().out
    assert out.count("[rank 0] hello from rank 0") == 1
    assert out.count("[rank 1] hello from rank 1") == 1


def test_noblock_run_metrics_and_torchrun_environment(cluster: mlc.ClusterHandle) -> None:
    def fn(ctx: Any) -> dict[str, str]:
        for step in range(5):
            ctx.report(loss=1.0 / (step + 1), lr=0.1)
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT")
        return {k: os.environ[k] for k in keys}

    run = mlc.train(fn, cluster=cluster)
    env = run.result(timeout=120)
    assert run.status == "finished"
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    frame = run.metrics
    assert {"rank", "step", "time", "epoch", "loss", "lr"} <= set(frame.columns)
    assert len(frame) == 10 and sorted(frame["rank"].unique()) == [0, 1]
    assert list(frame[frame["rank"] == 0]["step"]) == [1, 2, 3, 4, 5]
    # The torchrun variables are gone from the warm worker after the run.
    leftover = cluster.client.run(lambda: [k for k in env if k in os.environ])
    assert all(v == [] for v in leftover.values())


def test_exception_on_one_rank_fails_fast_and_frees_every_worker(
    cluster: mlc.ClusterHandle,
) -> None:
    def fn(ctx: Any) -> None:
        import torch.distributed as dist

        if ctx.rank == 1:
            raise KeyError("only rank 1 breaks")
        dist.barrier()  # rank 0 would wait here for a collective timeout without cancellation

    run = mlc.train(fn, cluster=cluster, timeout=600)
    with pytest.raises(mlc.TrainingError, match=r"\[rank 1\] KeyError: 'only rank 1 breaks'"):
        run.result(timeout=120)
    assert run.status == "error" and run.done()
    assert all(not initialized and busy == [] for initialized, _, _, busy
               in _worker_state(cluster).values())
    assert mlc.train(lambda ctx: ctx.rank, cluster=cluster).result(timeout=120) == 0


def test_ctrl_c_cancels_every_rank(shell: InteractiveShell, cluster: mlc.ClusterHandle,
                                   capsys: pytest.CaptureFixture) -> None:
    from jupyter_mlcloud.train import active_runs

    def interrupt_once_running() -> None:
        wait_for(lambda: active_runs() and not active_runs()[0].metrics.empty, timeout=120,
                 what="the run to report")
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    shell.run_cell_magic("distributed_train", "", textwrap.dedent("""
        import time
        while True:
            ctx.report(alive=1)
            time.sleep(0.01)
    """))
    assert "cancelled: every rank stopped" in capsys.readouterr().out
    assert active_runs() == []
    assert all(busy == [] for *_, busy in _worker_state(cluster).values())


def _timers(cluster: mlc.ClusterHandle) -> dict[str, dict[str, tuple[bool, float]]]:
    """Per worker: (running, callback_time in ms) of the periodic callbacks a rank quiets."""
    def probe(dask_worker: Any) -> dict[str, tuple[bool, float]]:
        return {name: (pc.is_running(), pc.callback_time)
                for name, pc in dask_worker.periodic_callbacks.items()
                if name in QUIET_TIMERS}

    return cluster.client.run(probe)


def test_a_rank_quiets_the_workers_timers_and_teardown_restores_them(
    cluster: mlc.ClusterHandle,
) -> None:
    before = _timers(cluster)
    assert all(t[name][0] for t in before.values() for name in QUIET_TIMERS), before

    def fn(ctx: Any, fail: bool) -> dict[str, tuple[bool, float]]:
        import time

        from distributed import get_worker

        callbacks = get_worker().periodic_callbacks
        deadline = time.monotonic() + 30
        while callbacks["profile"].is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
        if fail:
            raise RuntimeError("failing after the timers were quiet")
        return {name: (pc.is_running(), pc.callback_time) for name, pc in callbacks.items()}

    during = mlc.train(fn, False, cluster=cluster).result(timeout=120)
    for name, interval in QUIET_TIMERS.items():
        if interval is None:
            assert not during[name][0], name
        else:
            assert during[name][0] and during[name][1] >= interval * 1000, (name, during[name])
    wait_for(lambda: _timers(cluster) == before, timeout=30, what="the timers restored")
    with pytest.raises(mlc.TrainingError, match="failing after the timers were quiet"):
        mlc.train(fn, True, cluster=cluster).result(timeout=120)
    wait_for(lambda: _timers(cluster) == before, timeout=30, what="the timers restored")


def test_concurrent_runs_on_disjoint_workers(cluster: mlc.ClusterHandle) -> None:
    def fn(ctx: Any) -> tuple[int, str]:
        import torch.distributed as dist
        from distributed import get_worker

        dist.barrier()
        return dist.get_world_size(), get_worker().address

    first = mlc.train(fn, cluster=cluster, workers=1)
    second = mlc.train(fn, cluster=cluster, workers=1)
    (size_a, where_a), (size_b, where_b) = first.result(120), second.result(120)
    assert size_a == size_b == 1 and where_a != where_b


def test_ten_reruns_leak_nothing(shell: InteractiveShell, cluster: mlc.ClusterHandle) -> None:
    warm_up = "import torch\nctx.prepare(torch.nn.Linear(2, 2))"
    shell.run_cell_magic("distributed_train", "", warm_up)
    before = _worker_state(cluster)
    for _ in range(10):
        shell.run_cell_magic("distributed_train", "--out n", textwrap.dedent("""
            import torch
            model = ctx.prepare(torch.nn.Linear(2, 2))
            model(torch.ones(1, 2)).sum().backward()
            n = ctx.world_size
        """))
        assert shell.user_ns["n"] == 2
    after = _worker_state(cluster)
    for address, (initialized, threads, fds, busy) in after.items():
        assert not initialized and busy == []
        assert threads <= before[address][1] and fds <= before[address][2] + 2


@pytest.mark.parametrize(
    ("line", "cell", "message"),
    [
        ("", "x = = 1", "syntax error on line 1"),
        ("", "print(not_defined_anywhere)", "'not_defined_anywhere', which the notebook"),
        ("--workers 3", "pass", "workers=3 but the cluster has 2 worker"),
        ("--out nothing", "pass", "--out names \\['nothing'\\] are never assigned"),
        ("--strategy tensor", "pass",
         "strategy 'tensor' is not available; allowed: ddp, fsdp, pipeline, ps-sync, ps-async"),
        ("--compression zip", "pass", "compression 'zip' is not available; allowed: none,"),
        ("--compression powersgd:0", "pass", "needs a whole PowerSGD rank >= 1"),
        ("--checkpoint-dir nope://x", "pass", "unknown protocol 'nope'"),
        ("--checkpoint-dir /proc/mlcloud-ckpt", "pass", "is not writable"),
        ("--max-failures 1 --min-workers 3 --workers 2", "pass",
         "min_workers=3 is more than workers=2"),
        ("--min-workers 1", "pass", "add max_failures >= 1"),
        ("--max-failures -1", "pass", "max_failures must be a whole number >= 0, got -1"),
        ("--commit-every 0", "pass", "commit_every must be a whole number >= 1, got 0"),
        ("--resume", "pass", "resume needs checkpoint_dir"),
        ("--max-failures 1 --elastic wild", "pass", "elastic rule 'wild' is unknown"),
        ("--backend nccl", "pass", "backend 'nccl' needs a GPU"),
        ("--backend mpi", "pass", "backend 'mpi' is not supported"),
        ("--cluster nope", "pass", "no cluster named 'nope'"),
        ("--workers", "pass", "expected one argument"),
    ],
)
def test_bad_cells_fail_before_anything_is_shipped(shell: InteractiveShell, line: str,
                                                   cell: str, message: str) -> None:
    from jupyter_mlcloud.train import active_runs

    with pytest.raises(UsageError, match=message):
        shell.run_cell_magic("distributed_train", line, cell)
    assert active_runs() == []


def test_no_cluster_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clusters, "_current", [])
    with pytest.raises(ValueError, match="%mlcloud up --workers 2"):
        mlc.train(lambda ctx: None)



def test_a_killed_worker_fails_the_run_fast_with_its_rank() -> None:
    with mlc.up(workers=2, name="doomed") as cluster:
        def fn(ctx: Any) -> None:
            import time

            import torch.distributed as dist

            ctx.report(started=1)
            if ctx.rank == 1:
                os.kill(os.getpid(), 9)  # the worker process dies, as on a lost node
            while True:
                dist.barrier()
                time.sleep(0.01)

        run = mlc.train(fn, cluster=cluster, timeout=600)
        with pytest.raises(mlc.TrainingError, match=r"rank 1"):
            run.result(timeout=120)
        assert run.status == "error"
        # The nanny brings a fresh worker back; the cluster trains again.
        cluster.wait_for_workers(2, timeout=60)
        assert mlc.train(lambda ctx: ctx.world_size, cluster=cluster).result(120) == 2


def test_noblock_magic_returns_a_run_at_once(shell: InteractiveShell, tmp_path: Path) -> None:
    shell.user_ns.pop("seen", None)
    gate = tmp_path / "gate"
    shell.user_ns["gate_path"] = str(gate)
    # Were --noblock to block, this would end the wait, and the run would come back done.
    valve = threading.Timer(60, gate.write_text, ("",))
    valve.start()
    run = shell.run_cell_magic("distributed_train", "--noblock --epochs 2 --out seen",
                               textwrap.dedent("""
        import os, time
        seen = []
        for epoch in ctx.epochs():
            ctx.report(epoch_seen=epoch)
            seen.append(epoch)
        while not os.path.exists(gate_path):  # only the test opens it, after --noblock returned
            time.sleep(0.02)
    """))
    assert isinstance(run, mlc.Run) and not run.done()  # the cell waits on a gate: at once
    gate.write_text("")
    valve.cancel()
    assert run.result(timeout=120) == {"seen": [0, 1]} and run.status == "finished"
    wait_for(lambda: shell.user_ns.get("seen") == [0, 1], what="--out names in the notebook")
    frame = run.metrics
    assert sorted(frame[frame["rank"] == 0]["epoch_seen"]) == [0.0, 1.0]


def test_long_lived_objects_are_frozen_and_a_runs_cycles_still_collected(
    cluster: mlc.ClusterHandle,
) -> None:
    def fn(ctx: Any) -> None:
        import weakref

        from distributed import get_worker

        class Node:
            pass

        node = Node()
        node.me = node  # type: ignore[attr-defined]  # a cycle: only the collector frees it
        get_worker()._mlc_cycle = weakref.ref(node)  # type: ignore[attr-defined]

    mlc.train(fn, cluster=cluster, track=False).result(timeout=120)

    def probe(dask_worker: Any) -> tuple[int, bool]:
        import gc

        return gc.get_freeze_count(), dask_worker._mlc_cycle() is None

    for frozen, collected in cluster.client.run(probe).values():
        assert frozen > 10_000 and collected


def test_a_run_leaves_no_process_group_behind(cluster: mlc.ClusterHandle) -> None:
    """torch._dynamo, which a worker's first optimizer imports, kept the group that existed at
    that moment alive for good: its store, its gloo loop waking beside every later rank."""

    def fn(ctx: Any) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(torch.nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()

    def group_threads() -> list[str]:
        names = (Path(f"/proc/self/task/{t}/comm").read_text().strip()
                 for t in os.listdir("/proc/self/task"))
        return [n for n in names if n.startswith(("gloo", "pt_gloo", "pt_tcpstore"))]

    for _ in range(2):
        mlc.train(fn, cluster=cluster, track=False).result(timeout=120)
        assert cluster.client.run(group_threads) == {a: [] for a in cluster.client.run(os.getpid)}
