"""What recording a training run in MLflow costs the run, and how soon the record is complete.

    python benchmarks/bench_tracking.py [--repeats 7] [--steps 3000]

A warm 2-worker CPU cluster; 2 ranks train a DDP MLP (64-256-1, batch 64, gloo, one thread
each) and call ``ctx.report(loss=...)`` on every step. Runs alternate tracking on
(``track=True``, recorded into an SQLite store in a temporary directory, named by
``MLFLOW_TRACKING_URI``) and off (``track=False``): on, off, on, off, ...

(a) slowdown: rank 0's steps/s, timed inside the training function around its step loop (10
    warm-up steps left out; the launch is not included). Medians over the repeats, and the
    median and spread of the per-repeat ratios on/off. Target: ratio >= 0.98.
(b) the kernel's CPU time per run (all its threads: the scheduler and nannies of the local
    cluster, the run's event handling and, with tracking, the recorder), from the launch to
    ``run.result()`` (off) or to the complete record (on): what tracking adds there, where it
    competes with the ranks for the same cores, whatever else loads the machine.
(c) completeness: each tracked run returns its model, so its record ends with the logged
    model; the time from ``run.result()`` returning to ``run.tracking.recorder.wait()``
    returning is printed. Every tracked run's ``loss`` history in MLflow must hold every
    step, each once, and the run must be FINISHED; otherwise the benchmark fails.

The next run starts only once the previous record is complete, so the recorder's work does
not fall on the runs without tracking.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from stats import quantile

THREAD_VARS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
for _name, _value in THREAD_VARS.items():
    os.environ.setdefault(_name, _value)

WARMUP = 10  # steps before the timed loop


def train(ctx, steps: int):  # type: ignore[no-untyped-def]
    """The benchmark's training loop; returns the model and rank 0's steps/s after the
    warm-up steps."""
    import time

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ctx.prepare(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                            torch.nn.Linear(256, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 64), torch.randn(64, 1)
    start = time.perf_counter()
    for step in range(steps):
        if step == WARMUP:
            start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.report(loss=loss)
    rate = (steps - WARMUP) / (time.perf_counter() - start)
    return {"model": model, "steps_per_s": rate}


def run_once(cluster, steps: int, track: bool) -> tuple[float, float, float | None]:  # type: ignore[no-untyped-def]
    """One run: rank 0's steps/s, the kernel's CPU seconds, and with tracking the seconds
    from ``run.result()`` to a complete MLflow record (checked to hold every step)."""
    import jupyter_mlcloud as mlc

    cpu = time.process_time()
    run = mlc.train(train, cluster=cluster, workers=2, track=track, config={"steps": steps})
    result = run.result(timeout=600)
    if not track:
        return float(result["steps_per_s"]), time.process_time() - cpu, None
    returned = time.perf_counter()
    if not run.tracking.recorder.wait(300):
        raise RuntimeError(f"run {run.id}: the MLflow record was not complete after 300 s")
    complete = time.perf_counter() - returned
    cpu = time.process_time() - cpu
    check_record(run, steps)
    return float(result["steps_per_s"]), cpu, complete


def check_record(run, steps: int) -> None:  # type: ignore[no-untyped-def]
    """The MLflow run holds every step of rank 0's ``loss``, each once, and is FINISHED."""
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    history = client.get_metric_history(run.mlflow_run_id, "loss")
    logged = sorted(m.step for m in history)
    assert len(logged) == steps, f"run {run.id}: {len(logged)} loss points in MLflow, not {steps}"
    assert logged == list(range(1, steps + 1)), f"run {run.id}: steps missing or repeated"
    status = client.get_run(run.mlflow_run_id).info.status
    assert status == "FINISHED", f"run {run.id}: MLflow status {status}"
    assert run.tracking.model_uri, f"run {run.id}: no model logged"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.path.join(tmp, 'mlruns.db')}"
        os.environ["MLFLOW_EXPERIMENT_NAME"] = "bench_tracking"
        os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(tmp, "runtime")  # no stray discovery
        import jupyter_mlcloud as mlc

        load_before = os.getloadavg()
        with mlc.up(workers=2, gpu=False, name="bench-tracking") as cluster:
            run_once(cluster, 50, track=True)  # warm: torch and mlflow imported, store made
            run_once(cluster, 50, track=False)
            on: list[float] = []
            off: list[float] = []
            cpu_on: list[float] = []
            cpu_off: list[float] = []
            complete: list[float] = []
            for _ in range(args.repeats):
                rate, cpu, seconds = run_once(cluster, args.steps, track=True)
                on.append(rate)
                cpu_on.append(cpu)
                complete.append(float(seconds or 0.0))
                rate, cpu, _ = run_once(cluster, args.steps, track=False)
                off.append(rate)
                cpu_off.append(cpu)
        load_after = os.getloadavg()

    ratios = [a / b for a, b in zip(on, off, strict=True)]
    print(f"\n2 CPU ranks, gloo, MLP 64-256-1 batch 64, ctx.report every step; {args.steps}"
          f" steps ({WARMUP} warm-up), {args.repeats} interleaved repeats (on, off, ...);"
          f" load average (1/5/15 min) before {' '.join(f'{v:.2f}' for v in load_before)},"
          f" after {' '.join(f'{v:.2f}' for v in load_after)}")
    print(f"{'':<36}{'median':>9}{'min':>9}{'p25':>9}{'p75':>9}{'max':>9}{'target':>10}")
    rows = [("rank 0 steps/s, tracking on", on, ".1f", ""),
            ("rank 0 steps/s, tracking off", off, ".1f", ""),
            ("ratio on/off (per repeat)", ratios, ".3f", ">= 0.98"),
            ("kernel CPU s per run, tracking on", cpu_on, ".2f", ""),
            ("kernel CPU s per run, tracking off", cpu_off, ".2f", ""),
            ("result() -> record complete (s)", complete, ".2f", "")]
    for label, values, fmt, target in rows:
        cells = [statistics.median(values), min(values), quantile(values, 0.25),
                 quantile(values, 0.75), max(values)]
        print(f"{label:<36}" + "".join(f"{c:>9{fmt}}" for c in cells) + f"{target:>10}")
    print(f"every tracked run: {args.steps} of {args.steps} loss points in MLflow, FINISHED,"
          " model logged")


if __name__ == "__main__":
    main()
