"""Training throughput of each strategy on the same model, data and 2 CPU workers.

    python benchmarks/bench_strategies.py [--repeats 3] [--steps 60]

The peer is DDP in the same script: each strategy's samples/s is given as a ratio to it.
Every run trains an MLP 256-1024-1024-1024-1 on the same global batch (DDP and the parameter
server: 128 samples per rank; pipeline: 256 samples through both stages). Time is measured on
rank 0 from step 5 to the last step. For the pipeline, the measured bubble (the share of a
step a stage spends outside its forward and backward) is printed beside the ideal of a
balanced pipeline, (p - 1) / (m + p - 1) for p stages and m microbatches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

WARMUP = 5
PER_RANK_BATCH = 128


def fit(ctx: Any, steps: int, strategy: str) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    width = 1024
    model = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()
    pipeline = strategy == "pipeline"
    net = ctx.prepare(model, optimizer, **({"loss_fn": loss_fn} if pipeline else {}))
    batch = PER_RANK_BATCH * (2 if pipeline else 1)  # the same global batch everywhere
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch * 2 * steps, 256, generator=g)
    y = x[:, :1].sin()
    start, done = 0.0, 0
    for step, (xb, yb) in enumerate(ctx.shard((x, y), batch_size=batch, shuffle=False)):
        if step == WARMUP:
            start = time.perf_counter()
        optimizer.zero_grad()
        if pipeline:
            loss = net.step(xb, yb)
        else:
            loss = loss_fn(net(xb), yb)
            loss.backward()
        optimizer.step()
        if step % 10 == 0:
            ctx.report(loss=loss)
        if step >= WARMUP:
            done += 1
        if step + 1 == steps:
            break
    seconds = time.perf_counter() - start
    return {"samples_per_s": done * PER_RANK_BATCH * 2 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    import jupyter_mlcloud as mlc

    cases: list[tuple[str, dict[str, Any]]] = [
        ("ddp", {"strategy": "ddp"}),
        ("ps-sync", {"strategy": "ps-sync"}),
        ("ps-sync, 2 shards", {"strategy": "ps-sync", "ps_workers": 2}),
        ("ps-async", {"strategy": "ps-async"}),
        ("pipeline 1f1b, m=4", {"strategy": "pipeline", "microbatches": 4}),
        ("pipeline 1f1b, m=8", {"strategy": "pipeline", "microbatches": 8}),
        ("pipeline gpipe, m=8", {"strategy": "pipeline", "microbatches": 8,
                                 "pipeline_schedule": "gpipe"}),
    ]
    rates: dict[str, list[float]] = {name: [] for name, _ in cases}
    bubbles: dict[str, list[float]] = {name: [] for name, _ in cases}
    with mlc.up(workers=2, gpu=False, name="bench-strategies") as cluster:
        mlc.train(fit, 10, "ddp", cluster=cluster).result()  # warm the workers
        for _ in range(args.repeats):  # interleaved, so a slow moment hits every case
            for name, options in cases:
                run = mlc.train(fit, args.steps, options["strategy"], cluster=cluster,
                                **options)
                rates[name].append(run.result(timeout=600)["samples_per_s"])
                if "pipeline_bubble" in run.metrics:
                    bubbles[name].append(float(run.metrics["pipeline_bubble"].mean()))

    base = statistics.median(rates["ddp"])
    print(f"\n2 CPU workers, MLP 256-1024x3-1, global batch {2 * PER_RANK_BATCH},"
          f" {args.steps} steps, median of {args.repeats} runs")
    print(f"{'strategy':<22}{'samples/s':>11}{'vs ddp':>9}{'bubble':>9}{'ideal':>9}")
    for name, options in cases:
        rate = statistics.median(rates[name])
        bubble = f"{statistics.median(bubbles[name]):.3f}" if bubbles[name] else "-"
        m = options.get("microbatches")
        ideal = f"{1 / (m + 1):.3f}" if m else "-"  # (p - 1) / (m + p - 1), p = 2
        print(f"{name:<22}{rate:>11.0f}{rate / base:>9.3f}{bubble:>9}{ideal:>9}")


if __name__ == "__main__":
    main()
