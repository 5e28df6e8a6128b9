"""A rerun of an unchanged pipeline, against its first run (the in-script peer).

    python benchmarks/bench_pipeline.py [--reruns N] [--epochs E]

The nightly digits pipeline of tutorial 11, four steps: prepare (the digits set to a file),
train (``mlc.train`` on a 2-worker local cluster, the model to a file), evaluate (test
accuracy) and register (``mlc.register``, only if the accuracy passes 0.5). It runs once,
then ``--reruns`` times unchanged (default 7). Each row: wall seconds (median and range, min
to max, over the runs of that row) and worker-seconds (the cluster's task time during the
run, from its task stream). Target for the reruns: <= 1 s and 0 worker-seconds. MLflow runs
go to an SQLite store in a temporary folder, as the cache does. Timings are of this machine
with whatever else runs on it: read the ratio and the spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

WORKERS = 2


def fit(ctx: Any, data: str, lr: float) -> Any:
    import numpy as np
    import torch

    arrays = np.load(data)
    x, y = torch.tensor(arrays["x_train"]), torch.tensor(arrays["y_train"])
    model = ctx.prepare(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                            torch.nn.Linear(64, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in ctx.epochs():
        for xb, yb in ctx.shard((x, y), batch_size=32):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.report(loss=loss)
    return model


def build(root: str, epochs: int) -> Any:
    import jupyter_mlcloud as mlc

    pipe = mlc.pipeline("bench-digits-nightly", root=root)

    @pipe.step(outputs={"data": "work/digits.npz"})
    def prepare(data: str) -> None:
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.data / 16).astype("float32")
        x_train, x_test, y_train, y_test = train_test_split(
            x, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
        np.savez(data, x_train=x_train, x_test=x_test, y_train=y_train, y_test=y_test)

    @pipe.step(inputs=["data"], params={"lr": 0.1, "epochs": epochs},
               outputs={"model": "work/model.pt"})
    def train(data: str, lr: float, epochs: int, model: str, cluster: Any) -> None:
        import torch

        run = mlc.train(fit, cluster=cluster, workers=WORKERS, epochs=epochs,
                        config={"data": data, "lr": lr})
        torch.save(run.result(), model)

    @pipe.step(inputs=["data", "model"], outputs=["accuracy"])
    def evaluate(data: str, model: str) -> float:
        import numpy as np
        import torch

        arrays = np.load(data)
        net = torch.load(model, weights_only=False)
        with torch.no_grad():
            guess = net(torch.tensor(arrays["x_test"])).argmax(1).numpy()
        return float((guess == arrays["y_test"]).mean())

    @pipe.step(inputs=["model"], outputs=["version"], when=lambda accuracy: accuracy > 0.5)
    def register(model: str) -> str:
        version = mlc.register(model, "bench-digits")
        return f"models:/bench-digits/{version.version}"

    return pipe


def worker_seconds(stream: list[dict[str, Any]]) -> float:
    return sum(s["stop"] - s["start"] for task in stream for s in task.get("startstops", ())
               if s.get("action") == "compute")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reruns", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-pipeline-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlruns.db"
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from distributed import get_task_stream

    import jupyter_mlcloud as mlc

    cluster = mlc.up(workers=WORKERS, name="bench-pipeline")
    try:
        pipe = build(folder, args.epochs)
        rows: list[tuple[str, list[float], list[float], str]] = []
        for label, count in (("first run", 1), ("rerun, unchanged", args.reruns)):
            walls, busy, states = [], [], set()
            for _ in range(count):
                with get_task_stream(cluster.client) as stream:
                    start = time.perf_counter()
                    result = pipe.run(cluster=cluster)
                    walls.append(time.perf_counter() - start)
                if not result.ok:
                    print(result, file=sys.stderr)
                    return 1
                busy.append(worker_seconds(stream.data))
                states.add(",".join(s.state for s in result.steps.values()))
            rows.append((label, walls, busy, " | ".join(sorted(states))))
    finally:
        cluster.close()
    first = statistics.median(rows[0][1])
    print(f"\n4-step digits pipeline, {WORKERS} workers, {args.epochs} epochs,"
          f" {args.reruns} reruns")
    print(f"{'run':<18} {'wall s (median)':>15} {'range':>15} {'worker-s':>9} {'vs first':>9}"
          "  steps")
    for label, walls, busy, states in rows:
        spread = f"{min(walls):.3f}-{max(walls):.3f}"
        print(f"{label:<18} {statistics.median(walls):>15.3f} {spread:>15}"
              f" {max(busy):>9.2f} {statistics.median(walls) / first:>9.3f}  {states}")
    rerun_wall, rerun_busy = statistics.median(rows[1][1]), max(rows[1][2])
    verdict = "met" if rerun_wall <= 1.0 and rerun_busy == 0 else "MISSED"
    print(f"target (rerun <= 1 s, 0 worker-seconds): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
