"""Batch scoring on a real 2-worker cluster: same numbers as one process, model sent once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

import jupyter_mlcloud as mlc


@pytest.fixture(scope="module")
def cluster() -> Iterator[mlc.ClusterHandle]:
    with mlc.up(workers=2, name="score-tests") as handle:
        yield handle


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).double()


ROWS = np.random.default_rng(0).normal(size=(1000, 5))


def _expected(model: torch.nn.Module, rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(rows)).numpy()


def _inputs() -> dict[str, Any]:
    lazy = da.from_array(ROWS, chunks=(130, 5))
    samples = np.arange(1000) * 10
    array = xr.DataArray(lazy, dims=("time", "band"), coords={"time": samples})
    dataset = xr.Dataset({f"v{i}": (("time",), lazy[:, i]) for i in range(5)},
                         coords={"time": samples})
    return {"numpy": ROWS, "dask": lazy, "xarray": array, "xarray-dataset": dataset}


@pytest.mark.parametrize("kind", ["numpy", "dask", "xarray", "xarray-dataset"])
def test_scores_equal_one_process(cluster: mlc.ClusterHandle, model: torch.nn.Module,
                                  kind: str) -> None:
    data = _inputs()[kind]
    features = [f"v{i}" for i in range(5)] if kind == "xarray-dataset" else None
    result = mlc.score(model, data, features=features, batch_size=64)
    computed = result.compute()
    values = computed.values if hasattr(computed, "values") else computed
    np.testing.assert_allclose(values, _expected(model, ROWS), rtol=1e-12)
    if kind.startswith("xarray"):
        assert computed.dims == ("time", "output")
        np.testing.assert_array_equal(computed["time"].values, np.arange(1000) * 10)


def test_model_crosses_to_each_worker_once(cluster: mlc.ClusterHandle) -> None:
    torch.manual_seed(1)
    fresh = torch.nn.Linear(5, 1).double()
    result = mlc.score(fresh, da.from_array(ROWS, chunks=(50, 5)), batch_size=16)
    assert result.numblocks[0] == 20
    np.testing.assert_allclose(result.compute(), _expected(fresh, ROWS), rtol=1e-12)

    def counts_here() -> dict[str, int]:
        import importlib

        return importlib.import_module("jupyter_mlcloud.score").load_counts()

    counts = cluster.client.run(counts_here)
    loads = [c for per_worker in counts.values() for c in per_worker.values()]
    assert loads and max(loads) == 1  # every worker loaded each model exactly once


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": np.zeros((10, 3))}, "the data has 3 feature\\(s\\) but the model's first layer"
                                      " expects 5"),
        ({"data": np.zeros(10)}, "needs 2 dims"),
        ({"data": np.array([["a"] * 5] * 3)}, "features must be numeric"),
        ({"data": xr.DataArray(np.zeros((4, 5)), dims=("s", "f")), "sample_dim": "time"},
         "sample dimension 'time' is not among"),
        ({"data": xr.Dataset({"a": ("s", np.zeros(4))})}, "needs features="),
        ({"data": [1, 2, 3]}, "cannot score a list"),
        ({"data": ROWS, "batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"data": ROWS, "output": "preds.zarr"}, "writing to zarr/parquet is not available"),
    ],
)
def test_bad_input_is_one_sentence(cluster: mlc.ClusterHandle, model: torch.nn.Module,
                                   kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mlc.score(model, **kwargs)
