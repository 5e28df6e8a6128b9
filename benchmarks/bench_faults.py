"""Fault tolerance: recovery time by phase, commit cost, PowerSGD bytes and loss.

    python benchmarks/bench_faults.py [--repeats 3]

(a) recovery: on a warm 2-worker CPU cluster a rank SIGKILLs its own worker mid-run; the
    nanny restarts it and the run resumes from the last commit. Each phase is timed from the
    kill (median of the repeats). Target: kill -> first resumed step <= 15 s.
(b) commit cost: median step time on rank 0 with a commit every step (the default) and every
    4 steps vs without commits, same model and data (median of the repeats). Target: the
    difference <= 10 % of a step.
(c) PowerSGD rank 2 vs plain all-reduce on an MLP with large matrices: bytes each rank sends
    per step, and the final loss (mean of the last 20 steps). Targets: <= 0.1x, within 2 %.
Every rank uses one thread (2 ranks on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jupyter_mlcloud as mlc  # noqa: E402
from jupyter_mlcloud.train.run import PHASES  # noqa: E402


def fit(ctx: Any, width: int = 256, n_epochs: int = 2, kill_file: str | None = None,
        lr: float = 0.02) -> Any:
    """A regression MLP; with ``kill_file``, rank 1 kills its worker at step 40 of attempt 0."""
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
            if kill_file and ctx.attempt == 0 and ctx.rank == 1 and ctx.step == 40:
                while ctx.committed_step < 39:
                    time.sleep(0.01)
                with open(kill_file, "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.median(gaps[10:]) if ctx.rank == 0 else None


def recovery(cluster: mlc.ClusterHandle) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        kill_file = os.path.join(tmp, "killed")
        run = mlc.train(fit, cluster=cluster, max_failures=1, kill_file=kill_file)
        run.result(timeout=300)
        killed = float(Path(kill_file).read_text())
    phases = run.events[0]["phases"]
    return {name: phases[name] - killed for name in PHASES}


def wait_for_workers(cluster: mlc.ClusterHandle, n: int) -> None:
    cluster.client.wait_for_workers(n, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with mlc.up(workers=2, name="bench-faults") as cluster:
        mlc.train(fit, cluster=cluster, n_epochs=1).result()  # warm: torch imported on workers
        runs = []
        for _ in range(args.repeats):
            runs.append(recovery(cluster))
            wait_for_workers(cluster, 2)
        phases = {name: statistics.median(r[name] for r in runs) for name in PHASES}

        gaps: dict[int, list[float]] = {0: [], 1: [], 4: []}  # commit every K steps (0: off)
        for _ in range(args.repeats):
            for every in gaps:
                options = {"max_failures": 1, "commit_every": every} if every else {}
                gaps[every].append(mlc.train(fit, cluster=cluster, **options).result())
        step = statistics.median(gaps[0])

        results = {}
        for compression in ("none", "powersgd:2"):
            run = mlc.train(fit, cluster=cluster, compression=compression, width=1024,
                            n_epochs=3, lr=0.01)
            run.result(timeout=600)
            points = run.metrics.query("rank == 0")
            loss = float(points["loss"].tail(20).mean())
            ratio = float(points["bytes_ratio"].tail(20).mean()) if "bytes_ratio" in points else 1.0
            results[compression] = (loss, ratio)

    print("\n(a) recovery, seconds after the SIGKILL (median of", args.repeats, "runs)")
    print(f"{'phase':<16}{'s':>8}")
    for name, value in phases.items():
        print(f"{name:<16}{value:>8.2f}")
    print("target: first step <= 15 s:", "met" if phases["first step"] <= 15 else "MISSED")
    print(f"\n(b) median step time, no commits: {step * 1e3:.2f} ms")
    for every in (1, 4):
        with_commits = statistics.median(gaps[every])
        overhead = (with_commits - step) / step
        print(f"    commit every {every} step(s): {with_commits * 1e3:.2f} ms, cost"
              f" {overhead * 100:+.1f} % of a step (target <= 10 %:"
              f" {'met' if overhead <= 0.10 else 'MISSED'})")
    (loss_plain, _), (loss_psgd, ratio) = results["none"], results["powersgd:2"]
    diff = abs(loss_psgd - loss_plain) / loss_plain
    print(f"\n(c) PowerSGD rank 2 vs all-reduce, MLP 64-1024-1024-1: bytes ratio {ratio:.4f}"
          f" (target <= 0.1: {'met' if ratio <= 0.1 else 'MISSED'}), final loss"
          f" {loss_psgd:.4f} vs {loss_plain:.4f} ({diff * 100:.1f} %, target <= 2 %:"
          f" {'met' if diff <= 0.02 else 'MISSED'})")


if __name__ == "__main__":
    main()
