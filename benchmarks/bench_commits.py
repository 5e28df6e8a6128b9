"""Commits of a big model stay on the workers: what the kernel holds and what crosses it.

    python benchmarks/bench_commits.py [--repeats 3]

A ``Linear(10000, 10000)`` model (381 MiB of float32) trains data-parallel on a warm 2-worker
CPU cluster with a commit every step and ``max_failures=1``; at step 6 rank 1 SIGKILLs its
own worker, and the run resumes from the copy the surviving worker holds. Per repeat:

- kernel RSS growth: the launching process's peak RSS during the run minus before (this
  process also hosts the scheduler); target <= 64 MiB;
- bytes through the scheduler per commit: what the launcher's commit index moved (requests
  and replies), over the commits taken; target <= 4 KiB;
- commit blocking: the time a commit holds the training thread, over the median step;
  target <= 10 %;
- kill -> first resumed step; target <= 15 s;
- step time with commits over the same run without them (what the background copies cost
  the steps they overlap);
- checkpoint write throughput: a run with ``checkpoint_every=3``, bytes the ranks wrote over
  their write time (serializing included), against the same run without checkpoints in which
  rank 0 has ``fsspec`` write the same number of bytes, from memory, from a background thread
  at the same steps: the peer writes under the same load, in the same kind of run; target
  >= 0.8x.

Medians over the repeats, with the range. Every rank uses one thread (2 ranks, 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fsspec  # noqa: E402
import psutil  # noqa: E402

import jupyter_mlcloud as mlc  # noqa: E402

MIB = 2**20
WIDTH, BATCH, STEPS = 10_000, 8, 16
PEER_EVERY = 3  # steps between checkpoints (ours) and between fsspec writes (the peer)


def big_fit(ctx: Any, kill_file: str | None = None, peer_dir: str | None = None,
            peer_every: int = 3) -> dict[str, float]:
    """SGD on a 381 MiB linear model; rank 1 kills its worker at step 6 of attempt 0 (once the
    launcher knows of step 5), writing the time first. Rank 0 returns its median step time,
    and with ``peer_dir`` the rate at which fsspec wrote the model's bytes every
    ``peer_every`` steps from a background thread."""
    import os
    import queue
    import signal
    import statistics
    import threading
    import time

    import fsspec
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(WIDTH, WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    ddp = ctx.prepare(model, optimizer)
    x = torch.randn(BATCH * STEPS * ctx.world_size, WIDTH, generator=torch.Generator()
                    .manual_seed(1))
    peer: queue.Queue[int | None] = queue.Queue()
    peer_s: list[float] = []
    if peer_dir is not None and ctx.rank == 0:
        data = (model.weight.detach().numpy().tobytes(), model.bias.detach().numpy().tobytes())
        fs = fsspec.filesystem("file")

        def write() -> None:
            done: list[str] = []
            while (step := peer.get()) is not None:
                started = time.perf_counter()
                for n, chunk in enumerate(data):
                    fs.pipe_file(f"{peer_dir}/step-{step}-{n}", chunk)
                peer_s.append(time.perf_counter() - started)
                fs.rm(done)  # keep one, as the checkpoint run does (checkpoint_keep=1)
                done = [f"{peer_dir}/step-{step}-{n}" for n in range(len(data))]

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
    times, last = [], time.perf_counter()
    for xb in ctx.shard(x, batch_size=BATCH, shuffle=False):
        optimizer.zero_grad()
        ddp(xb).square().mean().backward()
        optimizer.step()
        ctx.report()
        if peer_dir is not None and ctx.rank == 0 and ctx.step % peer_every == 0:
            peer.put(ctx.step)
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if kill_file and ctx.attempt == 0 and ctx.rank == 1 and ctx.step == 6:
            while ctx.committed_step < 5:
                time.sleep(0.01)
            with open(kill_file, "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
    result = {"step_s": statistics.median(times[2:])}
    if peer_dir is not None and ctx.rank == 0:
        peer.put(None)
        writer.join()
        result["peer_mib_s"] = len(peer_s) * sum(map(len, data)) / sum(peer_s) / MIB
    return result


class PeakRSS:
    """The peak RSS of this process while the block runs, sampled every 20 ms."""

    def __enter__(self) -> PeakRSS:
        self.process = psutil.Process()
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return (self.peak - self.before) / MIB


def killed_run(cluster: mlc.ClusterHandle, tmp: str) -> dict[str, float]:
    """One run with a kill; the figures the targets are about."""
    kill_file = os.path.join(tmp, "killed")
    with PeakRSS() as rss:
        run = mlc.train(big_fit, cluster=cluster, max_failures=1, config={"kill_file": kill_file})
        result = run.result(timeout=600)
    (record,) = run.events
    with open(kill_file) as f:
        killed_at = float(f.read())
    commits = sum(s.get("commits", 0) for s in run.store.stats.values()) / 2  # per rank
    blocking = [s["commit_s"] / s["commits"] for s in run.store.stats.values() if s.get("commits")]
    cluster.client.wait_for_workers(2, timeout=120)
    return {"rss_mib": rss.growth, "bytes_per_commit": run.store.pulled_bytes / commits,
            "blocking": max(blocking) / result["step_s"],
            "kill_to_step_s": record["phases"]["first step"] - killed_at}


def checkpoint_run(cluster: mlc.ClusterHandle, tmp: str) -> dict[str, float]:
    """Rank-written checkpoints, then the same run with fsspec writing the same bytes."""
    directory = os.path.join(tmp, f"ckpt-{time.monotonic_ns()}")
    run = mlc.train(big_fit, cluster=cluster, checkpoint_dir=directory,
                    checkpoint_every=PEER_EVERY, checkpoint_keep=1)
    result = run.result(timeout=600)
    stats = [s for s in run.store.stats.values() if s.get("write_s")]
    ranks = sum(s["written_bytes"] for s in stats) / max(s["write_s"] for s in stats) / MIB
    fsspec.filesystem("file").rm(directory, recursive=True)
    peer_dir = os.path.join(tmp, f"peer-{time.monotonic_ns()}")
    os.makedirs(peer_dir)
    peer = mlc.train(big_fit, cluster=cluster,
                     config={"peer_dir": peer_dir, "peer_every": PEER_EVERY}).result(600)
    fsspec.filesystem("file").rm(peer_dir, recursive=True)
    return {"write_mib_s": ranks, "fsspec_mib_s": peer["peer_mib_s"],
            "ratio": ranks / peer["peer_mib_s"], "step_s": result["step_s"],
            "plain_step_s": peer["step_s"]}


def commits_cost(cluster: mlc.ClusterHandle) -> float:
    """Median step time with a commit every step over the same run without commits."""
    with_commits = mlc.train(big_fit, cluster=cluster, max_failures=1).result(600)
    without = mlc.train(big_fit, cluster=cluster).result(600)
    return with_commits["step_s"] / without["step_s"]


def spread(values: list[float], digits: int = 2) -> str:
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}"
            f"-{max(values):.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    kills: list[dict[str, float]] = []
    writes: list[dict[str, float]] = []
    costs: list[float] = []
    with mlc.up(workers=2, name="bench-commits") as cluster, \
            tempfile.TemporaryDirectory() as tmp:
        mlc.train(big_fit, cluster=cluster).result(timeout=600)  # warm: torch imported
        for _ in range(args.repeats):  # the two kinds of run interleaved
            kills.append(killed_run(cluster, tmp))
            writes.append(checkpoint_run(cluster, tmp))
            costs.append(commits_cost(cluster))
    print(f"\nLinear({WIDTH}, {WIDTH}) = 381 MiB, 2 ranks, batch {BATCH}, commit every step;"
          f" median (min-max) of {args.repeats} repeats; load {os.getloadavg()[0]:.1f}")
    rows = [
        ("kernel RSS growth during the run (MiB)", [k["rss_mib"] for k in kills], "<= 64", 0),
        ("bytes through the scheduler per commit", [k["bytes_per_commit"] for k in kills],
         "<= 4096", 0),
        ("commit blocking / step", [k["blocking"] for k in kills], "<= 0.10", 3),
        ("step time, commit every step / none", costs, "", 2),
        ("kill -> first resumed step (s)", [k["kill_to_step_s"] for k in kills], "<= 15", 1),
        ("checkpoint write, 2 ranks (MiB/s)", [w["write_mib_s"] for w in writes], "", 0),
        ("fsspec, same bytes, same steps (MiB/s)", [w["fsspec_mib_s"] for w in writes], "", 0),
        ("write / fsspec", [w["ratio"] for w in writes], ">= 0.8", 2),
    ]
    print(f"{'figure':42} {'median (range)':>24} {'target':>9}")
    for name, values, target, digits in rows:
        print(f"{name:42} {spread(values, digits):>24} {target:>9}")


if __name__ == "__main__":
    main()
