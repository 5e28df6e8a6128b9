"""Fault tolerance with real parts: SIGKILLed worker processes, nanny restarts, gloo groups."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import dask
import pytest
import torch

import jupyter_mlcloud as mlc
from jupyter_mlcloud.train.checkpoint import CheckpointDir, Position
from jupyter_mlcloud.train.options import (
    POWERSGD_START_ITER,
    CompressionSpec,
    parse_compression,
)
from jupyter_mlcloud.train.rank import cancel, ring
from jupyter_mlcloud.train.rank.state import rng_state, set_rng_state
from jupyter_mlcloud.train.run import describe_recovery
from tests.conftest import (
    ModuleCluster,
    digest,
    keep_rank1_worker_dead,
    make_fit,
    read_line,
    wait_for_workers,
)

ROOT = Path(__file__).resolve().parents[2]
PHASES = ["detected", "cancelled", "workers ready", "rejoined", "restored", "first step"]


CLUSTER = {"name": "faults", "workers": 2,
           # A busy CI machine can take long to restart a worker; the default wait is 30 s.
           "config": {"mlcloud.train.replace-timeout": 120}}


@pytest.fixture(scope="module")
def uninterrupted(module_cluster: ModuleCluster) -> str:
    return digest(mlc.train(make_fit(), cluster=module_cluster.whole()).result(timeout=300))


def _check_recovery(record: dict[str, Any], world_size: int) -> None:
    assert record["kind"] == "recovery" and record["world_size"] == world_size
    assert record["from_step"] > 0  # resumed from a commit, not from scratch
    assert list(record["phases"]) == PHASES
    times = [record["phases"][p] for p in PHASES]
    assert times == sorted(times)


@pytest.mark.parametrize("compression", ["none", "powersgd:1:4"])
def test_a_killed_worker_costs_seconds_and_the_result_is_bit_identical(
        cluster: mlc.ClusterHandle, uninterrupted: str, compression: str) -> None:
    expected = uninterrupted if compression == "none" else digest(
        mlc.train(make_fit(), cluster=cluster, compression=compression).result(timeout=300))
    run = mlc.train(make_fit(kills=((0, 1, 9),)), cluster=cluster, max_failures=1,
                    compression=compression)
    model = run.result(timeout=300)
    assert digest(model) == expected
    if compression != "none":  # plain all-reduces for the first START steps, then compressed
        ratios = run.metrics.query("rank == 0").groupby("step")["bytes_ratio"].last()
        assert (ratios[ratios.index <= 4] == 1.0).all() and (ratios[ratios.index > 4] < 1).all()
    assert [e["lost_ranks"] for e in run.events] == [[1]]
    _check_recovery(run.events[0], world_size=2)
    assert "resumes from step" in describe_recovery(run.events[0])
    assert "first step +" in describe_recovery(run.events[0])
    wait_for_workers(cluster, 2)


def test_two_kills_in_one_run(cluster: mlc.ClusterHandle, uninterrupted: str) -> None:
    run = mlc.train(make_fit(kills=((0, 1, 5), (1, 0, 20)), commit_every=2), cluster=cluster,
                    max_failures=2, commit_every=2)
    model = run.result(timeout=300)
    assert [(e["lost_ranks"], e["from_step"]) for e in run.events] == [([1], 4), ([0], 18)]
    assert digest(model) == uninterrupted
    for record in run.events:
        _check_recovery(record, world_size=2)
    wait_for_workers(cluster, 2)


def test_more_kills_than_max_failures_fail_with_the_count(cluster: mlc.ClusterHandle) -> None:
    run = mlc.train(make_fit(kills=((0, 1, 5), (1, 1, 12))), cluster=cluster, max_failures=1)
    with pytest.raises(mlc.TrainingError, match="already recovered 1 time"):
        run.result(timeout=300)
    wait_for_workers(cluster, 2)


def test_a_rank_exception_still_fails_fast(cluster: mlc.ClusterHandle) -> None:
    def fn(ctx: Any) -> None:
        if ctx.rank == 1:
            raise ValueError("bad batch")
        ctx.report(x=1)

    run = mlc.train(fn, cluster=cluster, max_failures=3)
    with pytest.raises(mlc.TrainingError, match="bad batch"):
        run.result(timeout=60)
    assert run.events == [] and run.finished is not None and run.finished - run.started < 15


def test_no_replacement_goes_on_with_min_workers() -> None:
    with mlc.up(workers=2, name="shrink") as cluster, \
            dask.config.set({"mlcloud.train.replace-timeout": 2}):
        keep_rank1_worker_dead(cluster)
        run = mlc.train(make_fit(kills=((0, 1, 9),)), cluster=cluster, max_failures=1,
                        min_workers=1)
        model = run.result(timeout=300)
        assert run.world_size == 1 and run.events[0]["world_size"] == 1
        _check_recovery(run.events[0], world_size=1)
        losses = run.metrics.query("step == step.max()")["loss"]
        assert torch.isfinite(torch.tensor(losses.to_numpy())).all()
        assert sum(p.numel() for p in model.parameters()) == 8 * 32 + 32 + 32 + 1


def test_a_run_resumes_from_its_checkpoint_after_a_kernel_restart(
        cluster: mlc.ClusterHandle, uninterrupted: str, tmp_path: Path) -> None:
    directory, gate = tmp_path / "ckpt", tmp_path / "gate"
    kernel = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            import jupyter_mlcloud as mlc
            from tests.conftest import make_fit
            from jupyter_mlcloud.train.checkpoint import CheckpointDir
            mlc.connect({cluster.client.scheduler.address!r})
            run = mlc.train(make_fit(gate={str(gate)!r}), checkpoint_dir={str(directory)!r},
                            checkpoint_every=3, timeout=20)
            while not CheckpointDir({str(directory)!r}).steps():
                time.sleep(0.05)
            print("checkpointed", flush=True)
            time.sleep(600)
        """)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert read_line(kernel, what="checkpointed").strip() == "checkpointed"
    finally:
        kernel.kill()
        kernel.wait()
        gate.touch()
    # The orphaned ranks notice their launcher released them and stop at their next step (a
    # rank blocked in a collective whose peer stopped first ends within --timeout).
    deadline = time.monotonic() + 120
    while any(cluster.client.run(cancel.busy_with).values()):
        assert time.monotonic() < deadline, "ranks of the killed kernel kept running"
        time.sleep(0.1)
    saved = CheckpointDir(str(directory)).steps()
    assert saved and all(s % 3 == 0 for s in saved) and len(saved) <= 2
    run = mlc.train(make_fit(), cluster=cluster, checkpoint_dir=str(directory),
                    checkpoint_every=3, resume=True)
    assert digest(run.result(timeout=300)) == uninterrupted
    assert run.events[0]["kind"] == "resume" and run.events[0]["from_step"] == saved[-1]
    assert run.events[0]["phases"].keys() >= {"restored", "first step"}


def test_checkpoints_are_written_atomically_and_pruned(cluster: mlc.ClusterHandle,
                                                       tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    (directory / "step-000000099").mkdir(parents=True)
    (directory / "step-000000099" / "rank-0000.pt").write_bytes(b"half")  # no marker: removed
    run = mlc.train(make_fit(epochs=1), cluster=cluster, checkpoint_dir=str(directory),
                    checkpoint_every=2, checkpoint_keep=2)
    run.result(timeout=300)
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["step-000000006", "step-000000006.done",
                     "step-000000008", "step-000000008.done"]
    # Each rank wrote its own part; rank 0 alone the (replicated) whole state.
    assert sorted(p.name for p in (directory / "step-000000008").iterdir()) == [
        "meta.json", "rank-0000.pt", "rank-0001.pt", "state.pt"]
    with pytest.raises(ValueError, match=r"already holds a checkpoint \(step 8\); pass"):
        mlc.train(make_fit(epochs=1), cluster=cluster, checkpoint_dir=str(directory))


def test_a_checkpoint_of_another_model_names_the_parameter(cluster: mlc.ClusterHandle,
                                                           tmp_path: Path) -> None:
    directory = str(tmp_path / "ckpt")
    mlc.train(make_fit(epochs=1), cluster=cluster, checkpoint_dir=directory,
              checkpoint_every=8).result(timeout=300)

    def other(ctx: Any) -> None:
        model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(),
                                    torch.nn.Dropout(0.2), torch.nn.Linear(64, 1)).double()
        ctx.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))

    with pytest.raises(mlc.TrainingError, match=r"parameter '0.weight' has shape \(32, 8\) there"
                                                r" but \(64, 8\) in the model"):
        mlc.train(other, cluster=cluster, checkpoint_dir=directory, resume=True).result(60)


def test_unwritable_checkpoint_dir_leaves_nothing(cluster: mlc.ClusterHandle,
                                                  tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="is not writable"):
        mlc.train(make_fit(), cluster=cluster, checkpoint_dir=str(blocker / "ckpt"))
    with pytest.raises(ValueError, match="min_workers=3 is more than the 2 worker"):
        mlc.train(make_fit(), cluster=cluster, checkpoint_dir=str(tmp_path / "new"),
                  max_failures=1, min_workers=3)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_cast_compression_sends_exactly_half_the_bytes(cluster: mlc.ClusterHandle,
                                                       kind: str) -> None:
    def fn(ctx: Any) -> float:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        ddp = ctx.prepare(model, optimizer)
        x = torch.randn(128, 16, generator=torch.Generator().manual_seed(2))
        for xb in ctx.shard(x, batch_size=16):
            loss = ddp(xb).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.report(loss=loss)
        return float(loss)

    run = mlc.train(fn, cluster=cluster, compression=kind)
    assert run.result(timeout=60) < 1.0
    points = run.metrics
    params = 16 * 64 + 64 + 64 + 1
    assert (points["bytes_ratio"] == 0.5).all()
    assert (points["bytes_sent"] == params * 2).all()


def test_powersgd_bytes_match_its_own_stats_and_its_loss_stays_close(
        cluster: mlc.ClusterHandle) -> None:
    def fn(ctx: Any) -> Any:
        torch.manual_seed(0)
        # Over 1 MB of gradients: DDP makes several buckets, whose PowerSGD all-reduces
        # must not interleave differently on the two gloo ranks.
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        ddp = ctx.prepare(model, optimizer)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(512, 64, generator=g)
        y = x[:, :4].sum(1, keepdim=True)
        for _ in ctx.epochs(4):
            for xb, yb in ctx.shard((x, y), batch_size=32):
                loss = torch.nn.functional.mse_loss(ddp(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ctx.report(loss=loss)
        stats = ctx.compression.hook_state.compression_stats() if ctx.compression else None
        return stats

    plain = mlc.train(fn, cluster=cluster)
    plain.result(timeout=300)
    run = mlc.train(fn, cluster=cluster, compression="powersgd:2")
    rate, before, after = run.result(timeout=300)
    points = run.metrics.query("rank == 0")
    compressed = points.query(f"step > {POWERSGD_START_ITER}")
    assert (compressed["bytes_ratio"] == after / before).all() and after / before < 0.2
    final = points["loss"].tail(8).mean()
    reference = plain.metrics.query("rank == 0")["loss"].tail(8).mean()
    assert abs(final - reference) / reference < 0.15


def test_compression_values_and_their_errors() -> None:
    assert parse_compression("powersgd") == CompressionSpec("powersgd", 1, 2)
    assert parse_compression("powersgd:2:40") == CompressionSpec("powersgd", 2, 40)
    for text in ("none", "fp16", "powersgd:3", "powersgd:2:40"):
        assert str(parse_compression(text)) == text  # what travels to the workers
    for text, message in [
        ("powersgd:2:1", "compression 'powersgd:2:1' needs a whole PowerSGD start step >= 2"),
        ("powersgd:2:x", "needs a whole PowerSGD start step >= 2"),
        ("powersgd:2:", "needs a start step after the second ':'"),
        ("powersgd:0:9", "needs a whole PowerSGD rank >= 1"),
        ("fp16:9", "compression 'fp16:9' is not available; allowed: none, fp16, bf16, powersgd,"
                   " powersgd:RANK, powersgd:RANK:START."),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_compression(text)


def test_commits_reuse_buffers_and_the_index_holds_only_metadata() -> None:
    run_id = "recycling-test"
    ring.open_ring(run_id, attempt=0, config=ring.Config())
    model = torch.nn.Linear(4, 3)
    try:
        tensors = []  # every commit's copy of the weight (kept alive: ids stay unique)
        for step in range(1, 10):
            with torch.no_grad():
                model.weight.fill_(step)
            ring.commit(run_id, 0, Position(steps=step), {"hooks": []},
                        {"models": [model.state_dict()]})
            with ring.held(run_id) as held:
                tensors.append(held.full[-1].state["models"][0]["weight"])
        with ring.held(run_id) as held:
            assert [p.position.steps for p in held.full] == [8, 9]
            assert all((p.state["models"][0]["weight"] == p.position.steps).all()
                       for p in held.full)
        # Later commits wrote into the tensors of dropped ones, not one new tensor per commit.
        assert len({id(t) for t in tensors}) <= ring.RING_FULL + 1
        reply = ring.index(run_id, since=8)
        assert [(e.rank, e.position.steps, e.has_state) for e in reply["entries"]] == \
            [(0, 9, True)]
        assert ring.client_step(run_id) == 8 and reply["stats"]["commits"] == 9
    finally:
        ring.close_ring(run_id)


def test_tensors_cross_the_wire_as_their_bytes_and_come_back_equal() -> None:
    import pickle

    values = {"f": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16),
              "scalar": torch.tensor(2.5), "mask": torch.tensor([True, False]),
              "strided": torch.arange(12.0).reshape(3, 4).t(), "n": [1, (torch.ones(2),)]}
    buffers: list[pickle.PickleBuffer] = []
    sent = pickle.dumps(ring.to_wire(values), protocol=5, buffer_callback=buffers.append)
    back = ring.from_wire(pickle.loads(sent, buffers=buffers))
    assert len(sent) < 2000 and len(buffers) == 6  # the tensors' bytes travel out of band
    for key in ("f", "b", "scalar", "mask", "strided"):
        assert back[key].dtype == values[key].dtype and torch.equal(back[key], values[key])
    assert back["n"][0] == 1 and torch.equal(back["n"][1][0], torch.ones(2))


def test_rng_states_follow_numpy_draws_and_its_cached_gaussian() -> None:
    import numpy as np

    np.random.seed(3)
    captured, following = [], []
    # A legacy normal draw caches a second value; the next one uses it without moving the
    # generator, so the states after draw 1 and draw 2 differ only in that cache.
    for action in ["none", "normal", "normal", "none", "uniform", "seed", "seed", "normal"]:
        if action == "normal":
            np.random.standard_normal()
        elif action == "uniform":
            np.random.random_sample(5)
        elif action == "seed":
            np.random.seed(0)
        captured.append(rng_state())
        now = np.random.get_state()
        following.append(np.random.standard_normal(3))
        np.random.set_state(now)
    for state, expected in zip(captured, following, strict=True):
        set_rng_state(state)
        assert np.array_equal(np.random.standard_normal(3), expected)


def test_elastic_rules_for_a_smaller_world() -> None:
    from jupyter_mlcloud.train.rank import elastic

    assert elastic.per_rank_batch("global-batch", 16, base_world=2, world=1) == 32
    assert elastic.per_rank_batch("linear-lr", 16, base_world=2, world=1) == 16
    assert elastic.map_batch("global-batch", 5, old_world=2, world=1) == 5
    assert elastic.map_batch("linear-lr", 5, old_world=2, world=1) == 10
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    elastic.rescale_lr("linear-lr", [optimizer], [scheduler], old_world=2, world=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert scheduler.base_lrs == [pytest.approx(0.2)]
    with pytest.raises(ValueError, match="elastic rule 'x' is unknown; allowed: global-batch"):
        elastic.check_rule("x")


def test_ctx_checkpoint_writes_one_off_the_schedule(cluster: mlc.ClusterHandle,
                                                     tmp_path: Path) -> None:
    def fn(ctx: Any) -> None:
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ddp = ctx.prepare(model, optimizer)
        for i, xb in enumerate(ctx.shard(torch.randn(64, 4), batch_size=4, shuffle=False)):
            ddp(xb).sum().backward()
            optimizer.step()
            if i == 4:
                ctx.checkpoint()

    directory = tmp_path / "ckpt"
    mlc.train(fn, cluster=cluster, checkpoint_dir=str(directory),
              checkpoint_every=100).result(timeout=60)
    assert CheckpointDir(str(directory)).steps() == [5]
    with pytest.raises(mlc.TrainingError, match=r"ctx.checkpoint\(\) needs --checkpoint-dir"):
        mlc.train(fn, cluster=cluster).result(timeout=60)
