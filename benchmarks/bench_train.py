"""Launch latency and step time: %%distributed_train's engine vs torchrun, same script.

    python benchmarks/bench_train.py [--repeats 5] [--steps 300]

(a) launch latency: from the call to "first step done on every rank"; ours on a warm
    2-worker cluster, torchrun from process start. Target: ours <= 0.1x torchrun.
(b) median step time over the run's steps on rank 0. Target: ours <= 1.03x torchrun.
Both run the same code (SCRIPT) on 2 CPU ranks with gloo, one thread each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

SCRIPT = """
import json, os, time
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
torch.manual_seed(0)
model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 64), torch.randn(64, 1)
steps = []
for step in range(STEPS):
    start = time.perf_counter()
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    steps.append(time.perf_counter() - start)
    if step == 0:
        dist.barrier()
        first_step_done = time.time()
result = {"first": first_step_done, "median_step": sorted(steps[10:])[len(steps[10:]) // 2]}
if rank == 0 and os.environ.get("RESULT_FILE"):
    Path = __import__("pathlib").Path
    Path(os.environ["RESULT_FILE"]).write_text(json.dumps(result))
dist.destroy_process_group()
"""


def torchrun_once(steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "bench.py"
        script.write_text(SCRIPT.replace("STEPS", str(steps)))
        out = Path(tmp) / "result.json"
        start = time.time()
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", str(script)],
            env={**os.environ, "RESULT_FILE": str(out)}, check=True, capture_output=True,
        )
        result = json.loads(out.read_text())
        return {"launch": result["first"] - start, "step": result["median_step"]}


def ours_once(shell, steps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # the progress widget's text form
        shell.run_cell_magic("distributed_train", "--out result",
                             SCRIPT.replace("STEPS", str(steps)))
    result = shell.user_ns["result"]
    return {"launch": result["first"] - start, "step": result["median_step"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    from IPython.core.interactiveshell import InteractiveShell

    import jupyter_mlcloud as mlc

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "jupyter_mlcloud")
    with mlc.up(workers=2, gpu=False, name="bench-train"):
        ours_once(shell, 20)  # warm the workers: torch imported once, as in a notebook
        ours, peer = [], []
        for _ in range(args.repeats):
            peer.append(torchrun_once(args.steps))
            ours.append(ours_once(shell, args.steps))

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"\n2 CPU ranks, gloo, {args.steps} steps, median of {args.repeats} runs")
    print(f"{'measure':<34}{'ours':>12}{'torchrun':>12}{'ratio':>9}{'target':>10}")
    for key, label, unit, scale, target in [
        ("launch", "launch -> first step on all ranks", "s", 1.0, "<= 0.10"),
        ("step", "median step time", "ms", 1e3, "<= 1.03"),
    ]:
        a, b = med(ours, key) * scale, med(peer, key) * scale
        print(f"{label:<34}{a:>10.3f}{unit:<2}{b:>10.3f}{unit:<2}{a / b:>9.3f}{target:>10}")


if __name__ == "__main__":
    main()
