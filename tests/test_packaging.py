"""The wheel carries the prebuilt sidebar and the server config; Jupyter sees both enabled."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
SHARE = "jupyter_mlcloud-0.1.0.data/data/share/jupyter/labextensions/jupyter-mlcloud/"
CONFIG = "jupyter_mlcloud-0.1.0.data/data/etc/jupyter/jupyter_server_config.d/jupyter_mlcloud.json"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(out)],
        check=True,
    )
    [path] = out.glob("jupyter_mlcloud-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_contains_the_built_labextension_and_server_config(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert SHARE + "package.json" in names
    assert SHARE + "install.json" in names
    assert any(n.startswith(SHARE + "static/remoteEntry.") and n.endswith(".js") for n in names)
    assert CONFIG in names
    assert "jupyter_mlcloud/server/handlers.py" in names
    assert not [n for n in names if "node_modules" in n or n.endswith(".ts")]


def test_wheel_registers_the_mlflow_ui_with_jupyter_server_proxy(wheel: zipfile.ZipFile) -> None:
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    section = text.split("[jupyter_serverproxy_servers]")[1].split("[")[0]
    assert "mlflow = jupyter_mlcloud.server.mlflow_ui:setup_mlflow" in section
    assert "jupyter_mlcloud/server/mlflow-launcher.svg" in wheel.namelist()  # the launcher icon


def _jupyter(*args: str) -> str:
    done = subprocess.run([str(BIN / "jupyter"), *args], capture_output=True, text=True,
                          check=True)
    return done.stdout + done.stderr


def test_jupyter_reports_both_extensions_enabled_and_ok() -> None:
    labext = _jupyter("labextension", "list")
    line = next(ln for ln in labext.splitlines() if "jupyter-mlcloud" in ln)
    assert "enabled" in line and "OK" in line
    server = _jupyter("server", "extension", "list")
    lines = server.splitlines()
    i = next(i for i, ln in enumerate(lines) if "jupyter_mlcloud" in ln and "enabled" in ln)
    assert "OK" in " ".join(lines[i : i + 3])
