"""%batch_score / %%batch_score through IPython, and the jupyter-mlcloud score command."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from tests.conftest import ipython_shell

CLI = [sys.executable, "-m", "jupyter_mlcloud.cli"]


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    with ipython_shell() as ip:
        ip.run_line_magic("mlcloud", "up --workers 2 --name score-magics")
        ip.run_cell("import numpy as np, torch\n"
                    "torch.manual_seed(0)\n"
                    "model = torch.nn.Linear(3, 1).double()\n"
                    "rows = np.random.default_rng(1).normal(size=(200, 3))")
        yield ip
        ip.run_line_magic("mlcloud", "down --all")


def test_line_and_cell_magics(shell: InteractiveShell, tmp_path: Path) -> None:
    ns = shell.user_ns
    expected = ns["model"](torch.as_tensor(ns["rows"])).detach().numpy()
    shell.run_line_magic("batch_score", "model rows --batch-size 32 --out preds")
    np.testing.assert_allclose(ns["preds"].compute(), expected, rtol=1e-12)

    output = tmp_path / "cell.zarr"
    shell.run_cell_magic("batch_score", f"model --output {output} --out report",
                         "import xarray as xr\n"
                         "xr.DataArray(rows, dims=('sample', 'feature'))")
    assert ns["report"].summary["rows"] == 200
    np.testing.assert_allclose(xr.open_zarr(output)["score"].values, expected, rtol=1e-12)

    with pytest.raises(UsageError, match="already exists; pass overwrite=True"):
        shell.run_cell_magic("batch_score", f"model --output {output}", "rows")
    with pytest.raises(UsageError, match="must end with the data"):
        shell.run_cell_magic("batch_score", "model", "x = 1")
    with pytest.raises(UsageError, match="unknown file format"):
        shell.run_line_magic("batch_score", "model data.csv")


def _store(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
                                torch.nn.Linear(3, 1)).double()
    model_path = tmp_path / "model.pt"
    torch.save(model, model_path)
    rows = np.random.default_rng(2).normal(size=(500, 4))
    store = tmp_path / "input.zarr"
    xr.Dataset({"x": (("sample", "feature"), rows)}).chunk({"sample": 100}).to_zarr(store)
    with torch.no_grad():
        expected = model(torch.as_tensor(rows)).numpy()
    return model_path, store, expected


def test_cli_scores_a_zarr_store_end_to_end(tmp_path: Path) -> None:
    model_path, store, expected = _store(tmp_path)
    output = tmp_path / "scores.zarr"
    done = subprocess.run([*CLI, "score", "--model", str(model_path), "--input", str(store),
                           "--output", str(output), "--workers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 500 and summary["blocks_written"] == 5
    np.testing.assert_allclose(xr.open_zarr(output)["score"].values, expected, rtol=1e-12)

    again = subprocess.run([*CLI, "score", "--model", str(model_path), "--input", str(store),
                            "--output", str(output), "--workers", "1"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_cli_exit_codes(tmp_path: Path) -> None:
    model_path, store, _ = _store(tmp_path)
    unreachable = subprocess.run(
        [*CLI, "score", "--model", str(model_path), "--input", str(store), "--output",
         str(tmp_path / "o.zarr"), "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1"],
        capture_output=True, text=True, timeout=120)
    assert unreachable.returncode == 3 and "could not reach a Dask scheduler" in unreachable.stderr
    missing = subprocess.run([*CLI, "score", "--model", str(model_path)], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "--input" in missing.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "jupyter-mlcloud"
    done = subprocess.run([str(script), "score", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--scheduler" in done.stdout
