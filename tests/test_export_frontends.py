"""%mlcloud export through IPython and `jupyter-mlcloud export`: the same options, the API's
results and its one-sentence errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import jupyter_mlcloud as mlc
from tests.conftest import ipython_shell

CLI = [sys.executable, "-m", "jupyter_mlcloud.cli"]


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    with ipython_shell() as ip:
        ip.run_cell("import numpy as np, torch\n"
                    "torch.manual_seed(0)\n"
                    "model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),\n"
                    "                            torch.nn.Linear(8, 2))\n"
                    "rows = np.random.default_rng(1).normal(size=(3, 5)).astype('float32')")
        yield ip


def test_magic_exports_a_notebook_model(shell: InteractiveShell, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    result = shell.run_line_magic("mlcloud", f"export model {path} --example rows")
    assert isinstance(result, mlc.ExportResult)
    assert result.parity[0].batch == 3 and all(p.ok for p in result.parity)
    x = shell.user_ns["rows"]
    (got,) = ort.InferenceSession(str(path)).run(None, {"input": x})
    with torch.no_grad():
        np.testing.assert_allclose(got, shell.user_ns["model"](torch.as_tensor(x)).numpy(),
                                   atol=1e-5)
    quantized = shell.run_line_magic("mlcloud", f"export model {tmp_path / 'q.onnx'} --no-check"
                                                " --quantize int8")
    assert quantized.quantize == "int8" and quantized.parity == ()
    assert quantized.quantization[0].max_abs_diff > 0  # reported even unchecked


@pytest.mark.parametrize(("line", "match"), [
    ("export model out.pb", r"has the suffix '\.pb'; use \.onnx"),
    ("export nothing_here m.onnx", r"MODEL 'nothing_here' is neither a name in the notebook"),
    ("export model m.onnx --quantize int4", r"quantize='int4' is not supported"),
    ("export model m.onnx --features x", r"argument --features: expected a whole number"),
    ("export model", r"the following arguments are required: PATH"),
])
def test_magic_bad_input_is_one_usage_error(shell: InteractiveShell, tmp_path: Path,
                                            line: str, match: str) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(UsageError, match=match) as caught:
            shell.run_line_magic("mlcloud", line)
    finally:
        os.chdir(cwd)
    assert "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == ["runtime"]  # the Jupyter runtime dir only: no file


def test_cli_exports_a_saved_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.save(model, tmp_path / "model.pt")
    np.save(tmp_path / "rows.npy", np.ones((2, 4), dtype=np.float32))
    done = subprocess.run([*CLI, "export", str(tmp_path / "model.pt"),
                           str(tmp_path / "model.onnx"), "--example",
                           str(tmp_path / "rows.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["path"] == str(tmp_path / "model.onnx") and result["opset"] >= 17
    assert result["size"] == os.path.getsize(tmp_path / "model.onnx")
    assert [p["batch"] for p in result["parity"]] == [2, 64]
    assert result["max_abs_diff"] <= 1e-4
    assert set(result["latency_ms"]) == {"onnxruntime", "torch"}
    assert set(result["latency_ms"]["torch"]) == {"1", "64"}

    random = subprocess.run([*CLI, "export", str(tmp_path / "model.pt"),
                             str(tmp_path / "model.pt2"), "--features", "4", "--no-check"],
                            capture_output=True, text=True, timeout=300)
    assert random.returncode == 0, random.stderr
    assert json.loads(random.stdout)["parity"] == []
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x))


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(4, 3), tmp_path / "model.pt")
    for args, match in [
        ([str(tmp_path / "model.pt"), str(tmp_path / "m.tflite")], "use .onnx"),
        ([str(tmp_path / "model.pt"), str(tmp_path / "m.onnx"), "--features", "5"],
         "cannot run on the example of shape (8, 5)"),
        ([str(tmp_path / "absent.pt"), str(tmp_path / "m.onnx")], "cannot read the model file"),
    ]:
        done = subprocess.run([*CLI, "export", *args], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2, done.stderr
        assert match in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "runtime"]
