"""Fault tolerance: recovery time by phase, commit cost, PowerSGD bytes and loss.

    python benchmarks/bench_faults.py [--repeats 5]

(a) recovery: on a warm 2-worker CPU cluster a rank SIGKILLs its own worker mid-run; the
    nanny restarts it and the run resumes from the last commit. Each phase is timed from the
    kill (median of the repeats). Target: kill -> first resumed step <= 15 s.
(b) commit cost, MLP 64-256-256-1: runs without commits, with a commit every step (the
    default) and every 4 steps, interleaved (the order rotates each repeat). Per run, rank 0's
    median step time and the median time its step boundary takes (where the commit blocks
    the rank); then the median over the repeats. Targets: the commit's blocking time, and
    the step-time difference, <= 10 % of a step.
(c) PowerSGD rank 2 vs plain all-reduce on an MLP with large matrices (64-1024-1024-1):
    bytes each rank sends, per step once compressing and over the whole run (the warm-up
    steps send full bytes), and the final loss. The target problem is trained to its
    plateau, as PowerSGD's claim of equal quality is about: targets with noise, 10 epochs
    under a cosine schedule, loss of the final model on held-out data. Also shown: a short
    run on noiseless targets (3 epochs, constant rate, mean training loss of the last 20
    steps), where the loss is still falling fast and measures speed per step instead.
    Targets: bytes <= 0.1x, final loss within 2 %.
(d) kill -> first resumed step over ``--kills`` kills (20) in a row on one long-lived
    cluster, a random rank at a random step each time, as p50/p95/max: on a quiet machine and
    with a spinning process holding one of the two cores. ``--only-kills`` runs just this.
Every rank uses one thread (2 ranks on 2 cores); the load average is printed with the
results, since other work on the machine shifts the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jupyter_mlcloud as mlc  # noqa: E402
from jupyter_mlcloud.train.run import PHASES  # noqa: E402

COMMIT_ARMS = (0, 1, 4)  # commit every K steps (0: no commits)
WARMUP_STEPS = 32  # powersgd:2:32 compresses after 5 % of the target problem's 640 steps


def fit(ctx: Any, width: int = 256, n_epochs: int = 2, kill_file: str | None = None,
        lr: float = 0.02, kill_rank: int = 1, kill_step: int = 40) -> Any:
    """A regression MLP; with ``kill_file``, rank ``kill_rank`` kills its worker at step
    ``kill_step`` of attempt 0.

    Rank 0 returns its step times and step-boundary times, without the first 10 steps.
    """
    import os
    import signal
    import time

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ddp = ctx.prepare(model, optimizer)
    # The step boundary (where a due commit is taken) timed from outside, on this ctx only.
    boundary_times: list[float] = []
    step_done = ctx._step_done

    def timed_step_done(batch: int) -> None:
        start = time.perf_counter()
        step_done(batch)
        boundary_times.append(time.perf_counter() - start)

    ctx._step_done = timed_step_done
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8192, 64, generator=g)
    y = (x[:, :8] ** 2).sum(1, keepdim=True) / 8
    times = []
    for _ in ctx.epochs(n_epochs):
        for xb, yb in ctx.shard((x, y), batch_size=64):
            times.append(time.perf_counter())
            loss = torch.nn.functional.mse_loss(ddp(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.report(loss=loss)
            if kill_file and ctx.attempt == 0 and ctx.rank == kill_rank and ctx.step == kill_step:
                while ctx.committed_step < kill_step - 1:
                    time.sleep(0.01)
                with open(kill_file, "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return (gaps[10:], boundary_times[10:]) if ctx.rank == 0 else None


def fit_compressed(ctx: Any, n_epochs: int, noise: float, cosine: bool) -> Any:
    """MLP 64-1024-1024-1 on y = mean of 8 squared inputs (+ noise); SGD with momentum.

    Rank 0 returns (held-out loss of the final model, bytes sent, uncompressed bytes).
    """
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = n_epochs * 8192 // (64 * ctx.world_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    ddp = ctx.prepare(model, optimizer, scheduler)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8192 + 2048, 64, generator=g)
    y = (x[:, :8] ** 2).sum(1, keepdim=True) / 8 + noise * torch.randn(len(x), 1, generator=g)
    for _ in ctx.epochs(n_epochs):
        for xb, yb in ctx.shard((x[:8192], y[:8192]), batch_size=64):
            loss = torch.nn.functional.mse_loss(ddp(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            ctx.report(loss=loss)
    with torch.no_grad():
        held_out = float(torch.nn.functional.mse_loss(model(x[8192:]), y[8192:]))
    sent, full = ctx.compression.counter.totals() if ctx.compression else (1, 1)
    return (held_out, sent, full) if ctx.rank == 0 else None


def recovery(cluster: mlc.ClusterHandle, **kill: Any) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        kill_file = os.path.join(tmp, "killed")
        run = mlc.train(fit, cluster=cluster, max_failures=1, kill_file=kill_file, **kill)
        run.result(timeout=300)
        killed = float(Path(kill_file).read_text())
    phases = run.events[0]["phases"]
    return {name: phases[name] - killed for name in PHASES}


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """A process spinning on one of the cores while the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait(10)


def kill_series(kills: int, busy: bool) -> list[float]:
    """Kill -> first resumed step, in seconds, for ``kills`` runs in a row on one long-lived
    cluster, each losing a random rank at a random step (a spinning process on one core
    throughout when ``busy``)."""
    draw = random.Random(7)
    seconds = []
    with mlc.up(workers=2, name="bench-kills") as cluster, \
            (busy_core() if busy else contextlib.nullcontext()):
        mlc.train(fit, cluster=cluster, n_epochs=1).result(timeout=300)  # warm
        for _ in range(kills):
            phases = recovery(cluster, n_epochs=1, kill_rank=draw.randrange(2),
                              kill_step=draw.randrange(20, 60))
            seconds.append(phases["first step"])
            cluster.wait_for_workers(2, timeout=120)
    return seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def typical(values: list[float], every: int) -> float:
    """One run's typical value: the median, or with a commit every K > 1 steps the mean
    without the slowest 5 % (so the commit steps count at their share)."""
    if every <= 1:
        return statistics.median(values)
    kept = sorted(values)[: max(1, int(len(values) * 0.95))]
    return statistics.fmean(kept)


def commit_cost(cluster: mlc.ClusterHandle, repeats: int) -> dict[int, list[Any]]:
    """Per arm, (step times, step-boundary times) of each run; arms interleaved."""
    runs: dict[int, list[Any]] = {every: [] for every in COMMIT_ARMS}
    for repeat in range(repeats):
        shift = repeat % len(COMMIT_ARMS)
        for every in COMMIT_ARMS[shift:] + COMMIT_ARMS[:shift]:
            options = {"max_failures": 1, "commit_every": every} if every else {}
            runs[every].append(mlc.train(fit, cluster=cluster, n_epochs=4,
                                         **options).result(timeout=300))
    return runs


def compressed(cluster: mlc.ClusterHandle, compression: str, **problem: Any) -> dict[str, Any]:
    run = mlc.train(fit_compressed, cluster=cluster, compression=compression, **problem)
    held_out, sent, full = run.result(timeout=900)
    points = run.metrics.query("rank == 0")
    last = points["loss"].tail(20).mean()
    tail = float(points["bytes_ratio"].tail(20).mean()) if "bytes_ratio" in points else 1.0
    return {"held_out": held_out, "train_last20": float(last), "tail": tail,
            "whole": sent / full}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kills", type=int, default=20, help="kills per series of (d)")
    parser.add_argument("--only-kills", action="store_true", help="run only (d)")
    args = parser.parse_args()
    series = {}
    for busy in (False, True):
        load = os.getloadavg()[0]
        series[busy] = (kill_series(args.kills, busy), load, os.getloadavg()[0])
    print(f"\n(d) kill -> first resumed step, {args.kills} kills in a row on one cluster"
          " (random rank, random step), seconds")
    print(f"{'machine':<26}{'p50':>8}{'p95':>8}{'max':>8}{'min':>8}   load before/after")
    for busy, (values, before, after) in series.items():
        name = "one core held by a spinner" if busy else "quiet"
        print(f"{name:<26}{percentile(values, 0.5):>8.2f}{percentile(values, 0.95):>8.2f}"
              f"{max(values):>8.2f}{min(values):>8.2f}   {before:.2f}/{after:.2f}")
    if args.only_kills:
        return
    load_before = os.getloadavg()
    recoveries = []
    # A fresh cluster for each kill: the scheduler re-runs the finished tasks a killed worker
    # held (those of runs the client still references), which must not overlap the next run.
    # The survivor is warm once the run started; the restarted worker is cold either way.
    for _ in range(min(args.repeats, 3)):
        with mlc.up(workers=2, name="bench-faults") as cluster:
            recoveries.append(recovery(cluster))
    phases = {name: statistics.median(r[name] for r in recoveries) for name in PHASES}
    with mlc.up(workers=2, name="bench-faults") as cluster:
        mlc.train(fit, cluster=cluster, n_epochs=1).result()  # warm: torch imported on workers
        costs = commit_cost(cluster, args.repeats)
    with mlc.up(workers=2, name="bench-faults") as cluster:
        short = {c: compressed(cluster, c, n_epochs=3, noise=0.0, cosine=False)
                 for c in ("none", "powersgd:2")}
        target = {c: compressed(cluster, c, n_epochs=10, noise=0.3, cosine=True)
                  for c in ("none", "powersgd:2", f"powersgd:2:{WARMUP_STEPS}")}
    load_after = os.getloadavg()

    print(f"\nload average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f}"
          f" {load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f}"
          f" {load_after[2]:.2f}")
    print(f"\n(a) recovery, seconds after the SIGKILL (median of {len(recoveries)} runs)")
    print(f"{'phase':<16}{'s':>8}")
    for name, value in phases.items():
        print(f"{name:<16}{value:>8.2f}")
    print("target: first step <= 15 s:", "met" if phases["first step"] <= 15 else "MISSED")

    def verdict(share: float) -> str:
        return "met" if share <= 0.10 else "MISSED"

    print(f"\n(b) commit cost, {args.repeats} interleaved runs per arm of ~245 timed steps;"
          " median over the runs of each run's median (every 4: trimmed mean)")
    for every in COMMIT_ARMS[1:]:
        steps = {k: [typical(s, every) for s, _ in costs[k]] for k in (0, every)}
        boundaries = {k: [typical(b, every) for _, b in costs[k]] for k in (0, every)}
        step, with_step = (statistics.median(steps[k]) for k in (0, every))
        boundary, with_boundary = (statistics.median(boundaries[k]) for k in (0, every))
        blocking = (with_boundary - boundary) / step
        overhead = (with_step - step) / step
        paired = sorted(w / n - 1 for w, n in zip(steps[every], steps[0], strict=True))
        print(f"    no commits: step {step * 1e3:.3f} ms, step boundary {boundary * 1e6:.0f} µs")
        print(f"    commit every {every} step(s): boundary {with_boundary * 1e6:.0f} µs, the"
              f" commit blocks {blocking * 100:.1f} % of a step ({verdict(blocking)});"
              f" step {with_step * 1e3:.3f} ms, {overhead * 100:+.1f} % ({verdict(overhead)};"
              f" per repeat {paired[0] * 100:+.1f} to {paired[-1] * 100:+.1f} %)")

    def loss_line(results: dict[str, dict[str, Any]], key: str, what: str) -> None:
        plain = results["none"][key]
        for name, r in results.items():
            if name == "none":
                continue
            diff = (r[key] - plain) / plain
            print(f"    {name:<14} bytes ratio {r['tail']:.4f} per step once compressing,"
                  f" {r['whole']:.4f} over the run ({verdict(r['whole'])}); {what}"
                  f" {r[key]:.4f} vs {plain:.4f}: {diff * 100:+.1f} %"
                  f" ({'met' if abs(diff) <= 0.02 else 'MISSED'})")

    print("\n(c) PowerSGD rank 2 vs all-reduce, MLP 64-1024-1024-1, target <= 0.1x bytes,"
          " loss within 2 %")
    print("  trained to the plateau (noise 0.3, 10 epochs, cosine schedule; held-out loss):")
    loss_line(target, "held_out", "final loss")
    print("  short run on noiseless targets (3 epochs, constant rate; last 20 steps):")
    loss_line(short, "train_last20", "training loss")


if __name__ == "__main__":
    main()
