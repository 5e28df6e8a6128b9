"""Launch latency and step time: %%distributed_train's engine vs torchrun, same script.

    python benchmarks/bench_train.py [--repeats 9] [--steps 400]

(a) launch latency: from the call to "first step done on every rank"; ours on a warm
    2-worker cluster, torchrun from process start. Target: ours <= 0.1x torchrun.
(b) median step time on rank 0 (warm-up steps excluded), per model. Target: ours <= 1.03x
    torchrun.
Both run the same code (SCRIPT) on 2 CPU ranks with gloo, one thread each (OMP/MKL/OpenBLAS
at 1 thread on both sides, as Dask sets them in its workers), and time each step the same way
inside the loop. Our runs are not recorded in MLflow unless --track is given (torchrun records
nothing; bench_tracking.py measures what recording costs). Repeats are interleaved (ours,
torchrun, ours, torchrun, ...) so that load from elsewhere on the machine falls on both sides
alike; each repeat starts a fresh warm cluster and closes it before torchrun runs. The tables
give the median of each side, the median of the per-repeat ratios and their spread.
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

from stats import quantile

THREAD_VARS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
for _name, _value in THREAD_VARS.items():
    os.environ.setdefault(_name, _value)

# (label, layer widths, batch size)
MODELS = [
    ("MLP 64-256-1, batch 64", (64, 256, 1), 64),
    ("MLP 64-512-512-1, batch 128", (64, 512, 512, 1), 128),
]
WARMUP = 20  # steps left out of each median

SCRIPT = """
import json, os, time
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
first_step_done, medians = None, []
for widths, batch in MODELS:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = DDP(torch.nn.Sequential(*layers[:-1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, widths[0]), torch.randn(batch, widths[-1])
    dist.barrier()
    steps = []
    for step in range(STEPS):
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - start)
        if first_step_done is None:
            dist.barrier()
            first_step_done = time.time()
    medians.append(sorted(steps[WARMUP:])[len(steps[WARMUP:]) // 2])
    del model, opt
__import__("gc").collect()  # no DDP reducer may outlive the process group
result = {"first": first_step_done, "median_steps": medians}
if rank == 0 and os.environ.get("RESULT_FILE"):
    Path = __import__("pathlib").Path
    Path(os.environ["RESULT_FILE"]).write_text(json.dumps(result))
dist.destroy_process_group()
"""


def script(steps: int) -> str:
    models = [(widths, batch) for _, widths, batch in MODELS]
    return (SCRIPT.replace("MODELS", repr(models)).replace("STEPS", str(steps))
            .replace("WARMUP", str(WARMUP)))


def torchrun_once(steps: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.py"
        path.write_text(script(steps))
        out = Path(tmp) / "result.json"
        start = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", str(path)],
            env={**os.environ, **THREAD_VARS, "RESULT_FILE": str(out)}, capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
        return {"launch": result["first"] - start, "steps": result["median_steps"]}


def ours_once(shell, steps: int, track: bool) -> dict[str, object]:  # type: ignore[no-untyped-def]
    start = time.time()
    flags = "--out result" + ("" if track else " --no-track")
    with contextlib.redirect_stdout(io.StringIO()):  # the progress widget's text form
        shell.run_cell_magic("distributed_train", flags, script(steps))
    result = shell.user_ns["result"]
    return {"launch": result["first"] - start, "steps": result["median_steps"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--bind-cores", action="store_true",
                        help="bind each of our ranks' training thread to a core of its own"
                             " (the Dask config mlcloud.train.bind-cores; torchrun unbound)")
    parser.add_argument("--track", action="store_true",
                        help="record our runs in MLflow (off by default: torchrun records"
                             " nothing; bench_tracking.py measures what recording costs)")
    args = parser.parse_args()

    import dask
    from IPython.core.interactiveshell import InteractiveShell

    import jupyter_mlcloud as mlc

    dask.config.set({"mlcloud.train.bind-cores": args.bind_cores})

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "jupyter_mlcloud")
    load_before = os.getloadavg()
    ours, peer = [], []
    for i in range(args.repeats):
        # torchrun runs with no Dask cluster alive, as it would be used: an idle cluster's
        # scheduler, nannies and workers would take CPU from its ranks.
        with mlc.up(workers=2, gpu=False, name=f"bench-train-{i}"):
            ours_once(shell, WARMUP + 2, track=False)  # warm the workers: torch imported
            ours.append(ours_once(shell, args.steps, args.track))
        peer.append(torchrun_once(args.steps))
    load_after = os.getloadavg()

    print(f"\n2 CPU ranks, gloo, {args.steps} steps ({WARMUP} warm-up), {args.repeats}"
          f" interleaved repeats, our runs {'' if args.track else 'not '}tracked,"
          f" our ranks {'' if args.bind_cores else 'not '}bound to cores;"
          f" load average (1/5/15 min) before"
          f" {' '.join(f'{v:.2f}' for v in load_before)}, after"
          f" {' '.join(f'{v:.2f}' for v in load_after)}")
    a = statistics.median(float(r["launch"]) for r in ours)  # type: ignore[arg-type]
    b = statistics.median(float(r["launch"]) for r in peer)  # type: ignore[arg-type]
    print(f"launch -> first step on all ranks: ours {a:.3f} s, torchrun {b:.3f} s,"
          f" ratio {a / b:.3f} (target <= 0.10)")
    for i, (label, _, _) in enumerate(MODELS):
        mine = [r["steps"][i] * 1e3 for r in ours]  # type: ignore[index]
        theirs = [r["steps"][i] * 1e3 for r in peer]  # type: ignore[index]
        ratios = [m / t for m, t in zip(mine, theirs, strict=True)]
        print(f"\nmedian step time, {label} (target: ratio <= 1.03)")
        print(f"{'':<14}{'median':>9}{'min':>9}{'p25':>9}{'p75':>9}{'max':>9}")
        for name, values, unit in [("ours", mine, "ms"), ("torchrun", theirs, "ms"),
                                   ("ratio", ratios, "")]:
            cells = [statistics.median(values), min(values), quantile(values, 0.25),
                     quantile(values, 0.75), max(values)]
            print(f"{name + (f' ({unit})' if unit else ''):<14}"
                  + "".join(f"{c:>9.3f}" for c in cells))


if __name__ == "__main__":
    main()
