"""Batch scoring on a real 2-worker cluster: same numbers as one process, model sent once,
resumable writes to real zarr stores and parquet datasets."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from distributed import wait

import jupyter_mlcloud as mlc
from jupyter_mlcloud.cluster import info as cluster_info

ROWS = np.random.default_rng(0).normal(size=(1000, 5))
SAMPLES = np.arange(1000) * 10
FEATURES = [f"v{i}" for i in range(5)]


CLUSTER = {"name": "score-tests", "workers": 2}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).double()


def _expected(model: Any, rows: np.ndarray = ROWS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(rows)).numpy()


def _inputs(tmp_path: Path) -> dict[str, tuple[Any, list[str] | None]]:
    lazy = da.from_array(ROWS, chunks=(130, 5))
    array = xr.DataArray(lazy, dims=("time", "band"), coords={"time": SAMPLES})
    dataset = xr.Dataset({f: (("time",), lazy[:, i]) for i, f in enumerate(FEATURES)},
                         coords={"time": SAMPLES})
    frame = pd.DataFrame(ROWS, columns=FEATURES, index=SAMPLES)
    zarr_path, parquet_path, nc_path = (str(tmp_path / n) for n in
                                        ("in.zarr", "in.parquet", "in.nc"))
    dataset.to_zarr(zarr_path)
    frame.to_parquet(parquet_path)
    dataset.compute().to_netcdf(nc_path, engine="h5netcdf")
    return {
        "numpy": (ROWS, None), "dask": (lazy, None), "xarray": (array, None),
        "xarray-dataset": (dataset, FEATURES), "pandas": (frame, FEATURES),
        "dask-dataframe": (dd.from_pandas(frame, npartitions=4), FEATURES),
        "zarr-path": (zarr_path, FEATURES), "parquet-path": (parquet_path, FEATURES),
        "netcdf-path": (nc_path, FEATURES),
    }


KINDS = ["numpy", "dask", "xarray", "xarray-dataset", "pandas", "dask-dataframe", "zarr-path",
         "parquet-path", "netcdf-path"]


@pytest.mark.parametrize("kind", KINDS)
def test_scores_equal_one_process(cluster: mlc.ClusterHandle, model: torch.nn.Module,
                                  tmp_path: Path, kind: str) -> None:
    data, features = _inputs(tmp_path)[kind]
    result = mlc.score(model, data, features=features, batch_size=64).compute()
    if isinstance(result, pd.DataFrame):
        assert list(result.columns) == ["score_0", "score_1"]
        np.testing.assert_array_equal(result.index.to_numpy(), SAMPLES)  # index kept
        values = result.to_numpy()
    elif isinstance(result, xr.DataArray):
        assert result.dims == ("time", "output")
        np.testing.assert_array_equal(result["time"].values, SAMPLES)  # coordinates kept
        values = result.values
    else:
        values = result
    np.testing.assert_allclose(values, _expected(model), rtol=1e-12)


def _load_counts() -> dict[str, int]:
    return importlib.import_module("jupyter_mlcloud.scoring.model").load_counts()


def test_model_crosses_to_each_worker_once(cluster: mlc.ClusterHandle) -> None:
    torch.manual_seed(1)
    fresh = torch.nn.Linear(5, 1).double()
    result = mlc.score(fresh, da.from_array(ROWS, chunks=(50, 5)), batch_size=16)
    assert result.numblocks[0] == 20
    np.testing.assert_allclose(result.compute(), _expected(fresh), rtol=1e-12)
    counts = cluster.client.run(_load_counts)
    assert len(counts) == 2
    assert all(n == 1 for per_worker in counts.values() for n in per_worker.values())


def _incoming_transfers(dask_worker: Any) -> list[str]:
    keys = [str(key) for entry in dask_worker.transfer_incoming_log for key in entry["keys"]]
    dask_worker.transfer_incoming_log.clear()
    return keys


def test_blocks_in_worker_memory_are_scored_where_they_lie(cluster: mlc.ClusterHandle,
                                                           model: torch.nn.Module) -> None:
    client = cluster.client
    client.wait_for_workers(2)
    data = da.random.random((4000, 5), chunks=(250, 5)).persist()
    wait(data)
    holders = {tuple(v) for v in client.who_has(data).values()}
    assert len(holders) == 2  # the blocks lie on both workers
    expected = _expected(model, data.compute())  # (gathering the rows moves blocks)
    client.run(_incoming_transfers)
    for _ in range(3):
        result = mlc.score(model, data, batch_size=64).compute()
        np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-15)
    moved = [k for keys in client.run(_incoming_transfers).values() for k in keys
             if data.name in k]
    assert moved == []  # only scores travel (to be gathered), never the blocks


def test_a_worker_that_joins_later_fetches_the_model_once(tmp_path: Path) -> None:
    with mlc.up(workers=1, name="score-join") as handle:
        torch.manual_seed(2)
        fresh = torch.nn.Linear(5, 1).double()
        lazy = mlc.score(fresh, da.from_array(ROWS, chunks=(100, 5)))  # shipped to 1 worker
        first = set(cluster_info.workers(handle.client))
        handle.scale(2)
        handle.wait_for_workers(2)
        (joined,) = set(cluster_info.workers(handle.client)) - first
        result = handle.client.compute(lazy, workers=[joined]).result()
        np.testing.assert_allclose(result, _expected(fresh), rtol=1e-12)
        counts = handle.client.run(_load_counts, workers=[joined])[joined]
        assert list(counts.values()) == [1]


def test_saved_model_files_and_callables(cluster: mlc.ClusterHandle, model: torch.nn.Module,
                                         tmp_path: Path) -> None:
    saved = tmp_path / "model.pt"
    torch.save(model, saved)
    np.testing.assert_allclose(mlc.score(str(saved), ROWS).compute(), _expected(model),
                               rtol=1e-12)
    exported = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.zeros(4, 5, dtype=torch.float64),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, exported)
    np.testing.assert_allclose(mlc.score(str(exported), ROWS).compute(), _expected(model),
                               rtol=1e-12)
    double = mlc.score(lambda x: 2 * x[:, :1], ROWS).compute()
    np.testing.assert_allclose(double[:, 0], 2 * ROWS[:, 0])


def test_written_zarr_and_parquet_match_and_report(cluster: mlc.ClusterHandle,
                                                   model: torch.nn.Module,
                                                   tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    report = mlc.score(model, inputs["xarray"][0], output=str(tmp_path / "out.zarr"),
                       progress=False)
    written = report.open()
    np.testing.assert_allclose(written.values, _expected(model), rtol=1e-12)
    np.testing.assert_array_equal(written["time"].values, SAMPLES)
    summary = report.summary
    assert summary["rows"] == 1000 and summary["blocks_written"] == 8
    assert summary["rows_per_s"] > 0 and abs(sum(summary["per_worker_share"].values()) - 1) < 1e-6
    assert not (tmp_path / "out.zarr" / "_mlcloud_done").exists()

    frame, features = inputs["dask-dataframe"]
    report = mlc.score(model, frame, features=features, output=str(tmp_path / "out.parquet"),
                       progress=False)
    back = report.open().compute().sort_index()
    np.testing.assert_allclose(back.to_numpy(), _expected(model), rtol=1e-12)
    assert not [p for p in os.listdir(tmp_path / "out.parquet") if p.startswith("_tmp")]

    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        mlc.score(model, frame, features=features, output=str(tmp_path / "out.parquet"))
    again = mlc.score(model, frame, features=features, output=str(tmp_path / "out.parquet"),
                      overwrite=True, progress=False)
    assert again.summary["blocks_written"] == 4


def test_interrupted_write_resumes_and_skips_finished_blocks(cluster: mlc.ClusterHandle,
                                                             tmp_path: Path) -> None:
    flag = tmp_path / "fail-on-block-with-large-values"
    flag.write_text("")

    def flaky(x: torch.Tensor) -> torch.Tensor:
        import os as _os

        if _os.path.exists(str(flag)) and float(x[:, 0].max()) > 900:
            raise RuntimeError("the machine went away")
        return x[:, :1] * 3

    rows = np.arange(1000, dtype=np.float64).reshape(-1, 1).repeat(2, axis=1)
    data = da.from_array(rows, chunks=(100, 2))
    output = str(tmp_path / "resume.zarr")
    with pytest.raises(RuntimeError, match="the machine went away"):
        mlc.score(flaky, data, output=output, progress=False)
    flag.unlink()
    report = mlc.score(flaky, data, output=output, progress=False)
    # Every block but the failed one was kept; only that one is redone.
    assert (report.summary["blocks_skipped"], report.summary["blocks_written"]) == (9, 1)
    np.testing.assert_allclose(report.open().values[:, 0], rows[:, 0] * 3)


def test_killed_worker_mid_score_still_gives_complete_results(tmp_path: Path) -> None:
    with mlc.up(workers=2, name="score-kill") as cluster:
        def slow_then_kill_once(x: torch.Tensor) -> torch.Tensor:
            import os as _os
            import time

            marker = str(tmp_path / "killed")
            if float(x[0, 0]) == 500.0 and not _os.path.exists(marker):
                open(marker, "w").close()
                _os.kill(_os.getpid(), 9)  # this worker dies in the middle of scoring
            time.sleep(0.01)
            return x[:, :1] + 1

        rows = np.arange(1000, dtype=np.float64).reshape(-1, 1)
        result = mlc.score(slow_then_kill_once, da.from_array(rows, chunks=(100, 1)),
                           cluster=cluster).compute()
        assert (tmp_path / "killed").exists()
        np.testing.assert_allclose(result[:, 0], rows[:, 0] + 1)


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
        ({"data": "table.csv"}, "unknown file format '.csv'"),
        ({"data": "missing.zarr"}, "does not exist"),
        ({"data": ROWS, "batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"data": ROWS, "device": "tpu"}, "device 'tpu' is not allowed"),
        pytest.param({"data": ROWS, "device": "cuda"}, "device='cuda' but no worker",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
        ({"data": ROWS, "dtype": "int8"}, "dtype 'int8' is not a floating torch dtype"),
        ({"data": ROWS, "output": "out.parquet"}, "must be a .zarr store"),
        ({"data": pd.DataFrame({"a": ["x"] * 5}), "features": ["a"]}, "must be numeric"),
        ({"model": 42, "data": ROWS}, "model must be a torch.nn.Module, a callable"),
        ({"model": "nope.pt", "data": ROWS}, "cannot read the model file"),
    ],
)
def test_bad_input_is_one_sentence_and_writes_nothing(cluster: mlc.ClusterHandle,
                                                      model: torch.nn.Module, kwargs: dict,
                                                      message: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    kwargs = {"model": model, **kwargs}
    with pytest.raises(ValueError, match=message):
        mlc.score(**kwargs)
    assert list(work.iterdir()) == []


def test_a_state_dict_file_is_refused_clearly(model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="holds a state_dict, not a model"):
        mlc.score(str(path), ROWS)


def test_a_written_job_reports_drift_from_its_reference(cluster: mlc.ClusterHandle,
                                                        model: torch.nn.Module,
                                                        tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    reference = pd.DataFrame(rng.normal(size=(2000, 5)), columns=FEATURES)
    data = rng.normal(size=(1500, 5))
    data[:, 3] += 1.0
    frame = dd.from_pandas(pd.DataFrame(data, columns=FEATURES), npartitions=3)
    report = mlc.score(model, frame, features=FEATURES, output=str(tmp_path / "d.parquet"),
                       reference=reference, progress=False, track=False)
    drift = report.drift
    assert list(drift.index) == [*FEATURES, "output_0", "output_1"]
    assert drift.loc[FEATURES[3], "drifted"] and drift.loc[FEATURES[3], "effect"] > 0.8
    assert not drift.loc[[f for i, f in enumerate(FEATURES) if i != 3], "drifted"].any()
    with pytest.raises(ValueError, match="reference= compares the job's inputs in its report:"
                                         " give output= too"):
        mlc.score(model, frame, features=FEATURES, reference=reference)
