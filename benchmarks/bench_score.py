"""Scoring throughput on 2 workers: mlc.score vs its peers, on the same model and data.

    python benchmarks/bench_score.py [--rows 2000000] [--repeats 5]

(a) ours vs 2 x a plain single-process torch loop over the same rows (the ideal), target >= 0.85
(b) ours vs dask-ml ParallelPostFit (the model travels inside every task), target >= 2
(c) ours vs a naive map_blocks with the model captured in the closure
Rows/s are medians of several runs; every contender scores the same dask array, generated on
the workers, and brings the scores back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

# The same thread settings as Dask's workers (the nanny sets all three), so no contender
# gets more BLAS threads than another.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import jupyter_mlcloud as mlc  # noqa: E402

FEATURES = 64


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 1)).eval()


class TorchPredictor:
    """The model as a scikit-learn style estimator, for dask-ml."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> TorchPredictor:
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.as_tensor(X)).numpy()[:, 0]

    def get_params(self, deep: bool = True) -> dict[str, object]:
        return {"model": self.model}


def plain_loop(model: torch.nn.Module, rows: np.ndarray, batch_size: int) -> float:
    """Rows/s of one process scoring ``rows`` in batches: the per-worker ideal."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            model(torch.as_tensor(rows[i : i + batch_size]))
    return len(rows) / (time.perf_counter() - start)


def timed(fn: Callable[[], object], rows: int, repeats: int) -> float:
    fn()  # warm up: imports, model caches
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(rows / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    model = make_model()
    chunk = args.rows // 8

    with mlc.up(workers=2, gpu=False, name="bench-score") as cluster:
        X = da.random.random((args.rows, FEATURES), chunks=(chunk, FEATURES)).astype(np.float32)
        X = X.persist()
        cluster.client.wait_for_workers(2)

        ours = timed(lambda: mlc.score(model, X, batch_size=args.batch_size).compute(),
                     args.rows, args.repeats)

        def naive() -> object:
            def block(b: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return model(torch.as_tensor(b)).numpy()

            return X.map_blocks(block, chunks=(X.chunks[0], (1,)), dtype=np.float32).compute()

        naive_rate = timed(naive, args.rows, args.repeats)
        try:
            from dask_ml.wrappers import ParallelPostFit

            wrapped = ParallelPostFit(TorchPredictor(model))
            dask_ml_rate: float | None = timed(lambda: wrapped.predict(X).compute(),
                                               args.rows, args.repeats)
        except ImportError:
            dask_ml_rate = None

    local = np.random.default_rng(0).random((args.rows // 2, FEATURES), dtype=np.float32)
    ideal = 2 * statistics.median(plain_loop(model, local, args.batch_size)
                                  for _ in range(args.repeats))

    print(f"\nscoring {args.rows} rows x {FEATURES} features, MLP 64-256-256-1, 2 CPU workers,"
          f" median of {args.repeats}")
    print(f"{'contender':<40}{'rows/s':>12}{'ours / it':>11}{'target':>9}")
    print(f"{'mlc.score (ours)':<40}{ours:>12,.0f}{'':>11}{'':>9}")
    rows = [("2 x plain torch loop (ideal)", ideal, ">= 0.85"),
            ("dask-ml ParallelPostFit", dask_ml_rate, ">= 2"),
            ("naive map_blocks, model in closure", naive_rate, "")]
    for label, rate, target in rows:
        if rate is None:
            print(f"{label:<40}{'not installed':>12}")
            continue
        print(f"{label:<40}{rate:>12,.0f}{ours / rate:>11.2f}{target:>9}")


if __name__ == "__main__":
    main()
