"""Exported ONNX in onnxruntime vs the eager PyTorch model: latency and throughput, one thread.

    python benchmarks/bench_export.py [--repeats 7] [--seconds 0.5]

Each model is exported with ``mlc.export`` (parity-checked, 1e-4) to ONNX, and once more with
``quantize="int8"``. Then, on one thread on both sides (``torch.set_num_threads(1)``,
onnxruntime ``intra_op_num_threads=1``, OMP/MKL/OpenBLAS at 1), each contender is called on
the same random rows at batch 1 and batch 64:

    onnxruntime      the fp32 .onnx file in an InferenceSession (numpy in, numpy out)
    onnxruntime int8 the dynamically quantized file, the same way
    torch            the eager model in inference_mode on a tensor viewing the same rows

Within a repeat every contender runs for ``--seconds`` at each batch size, in an order that
rotates from repeat to repeat, so a busy moment of the machine falls on all of them alike.
Per repeat: latency = the median wall time of one call; throughput = rows over the CPU time
of the calling thread for the whole stretch (both runtimes compute in that thread with one
thread configured: on a quiet machine this is rows per second; on a shared one it leaves
out the time the thread waited for a core, which wall-clock rates do not). Printed: the
median over repeats for each contender, and the ratio to eager torch (latency: onnxruntime
/ torch, lower is better; throughput: onnxruntime / torch, higher is better) as the median
of the per-repeat ratios with their p25-p75 and min-max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from stats import quantile

THREAD_VARS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
for _name, _value in THREAD_VARS.items():
    os.environ[_name] = _value

import numpy as np  # noqa: E402  (after the thread variables)
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import jupyter_mlcloud as mlc  # noqa: E402

BATCHES = (1, 64)


def mlp() -> tuple[torch.nn.Module, tuple[int, ...]]:
    """bench_score.py's model: MLP 64-256-256-1."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 1)).eval(), (64,)


def cnn() -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A small image classifier (1x28x28 -> 10), the kind that runs on an edge device."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10)).eval(), (1, 28, 28)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]] = {
    "MLP 64-256-256-1": mlp, "CNN 1x28x28 conv16-conv32-fc128-10": cnn}


def session(path: str) -> Callable[[np.ndarray], Any]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    s = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name

    def run(x: np.ndarray) -> Any:
        return s.run(None, {name: x})

    return run


def eager(model: torch.nn.Module) -> Callable[[np.ndarray], Any]:
    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def stretch(run: Callable[[np.ndarray], Any], x: np.ndarray, seconds: float
            ) -> tuple[float, float]:
    """Call ``run(x)`` for ``seconds``: (median seconds a call, rows per CPU second)."""
    run(x)  # warm
    times = []
    start, cpu_start = time.perf_counter(), time.thread_time()
    while True:
        t0 = time.perf_counter()
        run(x)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 - start >= seconds and len(times) >= 5:
            break
    return statistics.median(times), len(times) * len(x) / (time.thread_time() - cpu_start)


def measure(contenders: dict[str, Callable[[np.ndarray], Any]], inputs: dict[int, np.ndarray],
            repeats: int, seconds: float) -> dict[tuple[str, str, int], list[float]]:
    """Per (contender, "latency_ms" | "rows_s", batch): one figure per repeat."""
    found: dict[tuple[str, str, int], list[float]] = {}
    names = list(contenders)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for batch, x in inputs.items():
            for name in order:
                latency, rate = stretch(contenders[name], x, seconds)
                found.setdefault((name, "latency_ms", batch), []).append(latency * 1e3)
                found.setdefault((name, "rows_s", batch), []).append(rate)
    return found


def spread(values: list[float], fmt: str) -> str:
    return (f"{statistics.median(values):{fmt}} ({quantile(values, 0.25):{fmt}}-"
            f"{quantile(values, 0.75):{fmt}}, {min(values):{fmt}}-{max(values):{fmt}})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5,
                        help="seconds each contender runs at each batch size, per repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in MODELS.items():
            model, shape = make()
            rng = np.random.default_rng(0)
            example = rng.standard_normal((8, *shape)).astype(np.float32)
            fp32 = mlc.export(model, os.path.join(tmp, "model.onnx"), example=example)
            int8 = mlc.export(model, os.path.join(tmp, "model-int8.onnx"), example=example,
                              quantize="int8")
            contenders = {"onnxruntime": session(fp32.path),
                          "onnxruntime int8": session(int8.path), "torch": eager(model)}
            inputs = {b: rng.standard_normal((b, *shape)).astype(np.float32) for b in BATCHES}
            tables.append((label, fp32, int8, measure(contenders, inputs, args.repeats,
                                                      args.seconds)))
    load_after = os.getloadavg()

    print(f"\nOne thread on both sides; {args.repeats} interleaved repeats, {args.seconds} s per"
          f" contender and batch each; load average (1/5/15 min) before"
          f" {' '.join(f'{v:.2f}' for v in load_before)}, after"
          f" {' '.join(f'{v:.2f}' for v in load_after)}")
    for label, fp32, int8, found in tables:
        change = max(q.max_abs_diff for q in int8.quantization)
        print(f"\n{label}: ONNX opset {fp32.opset}, {fp32.size / 1024:.0f} KiB (int8"
              f" {int8.size / 1024:.0f} KiB); parity max abs diff {fp32.max_abs_diff:.1e};"
              f" int8 changes the output by up to {change:.2g}")
        print(f"{'figure':<28}{'onnxruntime':>12}{'ort int8':>11}{'torch':>11}"
              f"   {'ratio ort/torch: median (p25-p75, min-max)':<46}{'int8/torch':>11}")
        for metric, unit, fmt in (("latency_ms", "latency (ms)", ".4f"),
                                  ("rows_s", "rows per CPU-second", ".0f")):
            for batch in BATCHES:
                ort_ = found[("onnxruntime", metric, batch)]
                q = found[("onnxruntime int8", metric, batch)]
                pt = found[("torch", metric, batch)]
                ratios = [a / b for a, b in zip(ort_, pt, strict=True)]
                q_ratios = [a / b for a, b in zip(q, pt, strict=True)]
                name = f"{unit}, batch {batch}"
                print(f"{name:<28}{statistics.median(ort_):>12{fmt}}"
                      f"{statistics.median(q):>11{fmt}}{statistics.median(pt):>11{fmt}}"
                      f"   {spread(ratios, '.2f'):<46}{statistics.median(q_ratios):>11.2f}")


if __name__ == "__main__":
    main()
