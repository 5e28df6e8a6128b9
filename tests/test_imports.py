"""Kernels and the Jupyter server load no torch until work runs (each check in a fresh
interpreter, since this test process has torch loaded already)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys, time
start = time.perf_counter()
{code}
print(json.dumps({{"seconds": time.perf_counter() - start,
                   "heavy": sorted(m for m in ("torch", "pandas", "mlflow", "onnx", "onnxruntime",
                                             "optuna")
                                   if m in sys.modules)}}))
"""


def _probe(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import jupyter_mlcloud",
    "import jupyter_mlcloud.server",
    "import jupyter_mlcloud.magics, jupyter_mlcloud.widgets",
    "import jupyter_mlcloud as mlc; mlc.train, mlc.Run, mlc.TrainingError",
    "import jupyter_mlcloud as mlc; mlc.export, mlc.ExportResult, mlc.ExportError",
    "import jupyter_mlcloud as mlc; mlc.tune",
    "import jupyter_mlcloud as mlc; mlc.pipeline('p').step(lambda: 1, name='s', outputs=['n'])",
])
def test_imports_load_no_torch(code: str) -> None:
    found = _probe(code)
    print(f"{code}: {found['seconds']:.3f} s")
    assert "torch" not in found["heavy"], f"{code!r} loaded torch"
    assert "mlflow" not in found["heavy"]
    assert "optuna" not in found["heavy"], f"{code!r} loaded optuna"
    assert not {"onnx", "onnxruntime"} & set(found["heavy"]), f"{code!r} loaded onnx"


def test_the_server_extension_loads_without_pandas() -> None:
    # pandas costs about a quarter of a second: the server needs it only for status tables.
    assert _probe("import jupyter_mlcloud.server")["heavy"] == []


def test_bad_run_options_are_refused_without_loading_torch() -> None:
    code = """
import jupyter_mlcloud as mlc
for bad in ({"compression": "zip"}, {"strategy": "ring"}, {"max_failures": -1}):
    try:
        mlc.train(lambda ctx: None, **bad)
    except ValueError as e:
        if repr(next(iter(bad.values()))) not in str(e):
            raise SystemExit(f"{bad} got an error that does not name it: {e}")
    else:
        raise SystemExit(f"{bad} was accepted")
"""
    found = _probe(code)
    assert "torch" not in found["heavy"]


def test_magic_options_parse_without_loading_torch() -> None:
    code = """
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.error import UsageError
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "jupyter_mlcloud")
try:
    shell.run_cell_magic("distributed_train", "--workers nope", "pass")
except UsageError as e:
    print(e)
else:
    raise SystemExit("a bad --workers was accepted")
"""
    assert "torch" not in _probe(code)["heavy"]


def test_api_names_stay_functions_after_their_subpackages_are_imported() -> None:
    code = """
import jupyter_mlcloud.train.launch, jupyter_mlcloud.scoring.api, jupyter_mlcloud.export.onnx
import jupyter_mlcloud as mlc
assert callable(mlc.train) and callable(mlc.score), (mlc.train, mlc.score)
assert callable(mlc.export), mlc.export
"""
    _probe(code)
