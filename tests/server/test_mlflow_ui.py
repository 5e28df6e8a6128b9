"""The MLflow UI at ``<base_url>mlflow/``: a real ``jupyter server`` process whose
jupyter-server-proxy starts a real ``mlflow server`` on the first request, over a real SQLite
store, and ends it with itself."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from jupyter_mlcloud.server import mlflow_ui
from tests.conftest import answers, free_port, wait_for

BASE = "/hub/user/ada/"  # a base URL like JupyterHub's: the prefix must survive the proxy
# JupyterLab as reached from another machine, under a name MLflow does not know as local.
PUBLIC = "http://jupyter.example:8888"


@dataclass
class Server:
    process: subprocess.Popen
    url: str  # up to and including the base URL
    token: str
    log: Path

    def fetch(self, path: str, *, token: bool = True, method: str = "GET", body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of one request (redirects not followed)."""
        request = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={**({"Authorization": f"token {self.token}"} if token else {}),
                     **({"Content-Type": "application/json"} if body is not None else {}),
                     **(headers or {})})
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=mlflow_ui.START_TIMEOUT_S + 30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A SQLite store with an experiment, a run and a registered model in it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("from-the-test")
    run = client.create_run(experiment).info.run_id
    client.log_metric(run, "loss", 0.125)
    client.create_registered_model("digits")
    client.create_model_version("digits", f"runs:/{run}/model", run)
    return uri


@pytest.fixture
def server(tmp_path: Path, runtime_dir: Path, store: str) -> Iterator[Server]:
    root = tmp_path / "root"
    root.mkdir()
    port, token = free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyter", "server", "--no-browser", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--ip=127.0.0.1", f"--ServerApp.base_url={BASE}",
               "--ServerApp.allow_remote_access=True"]
    if os.getuid() == 0:
        command.append("--allow-root")
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "MLFLOW_TRACKING_URI": store,
                                        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": PUBLIC,
                                        "JUPYTER_RUNTIME_DIR": str(runtime_dir)})
    url = f"http://127.0.0.1:{port}{BASE}"
    try:
        wait_for(lambda: process.poll() is not None or answers(f"{url}api/status?token={token}"),
                 timeout=90, what="jupyter server to answer")
        assert process.poll() is None, log.read_text()
        yield Server(process, url, token, log)
    finally:
        family = _family(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait(30)
        for p in family:
            if p.is_running():
                p.kill()


def _family(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _mlflow_port(server: Server) -> int:
    """The loopback port the proxied ``mlflow server`` listens on."""
    for p in _family(server.process.pid):
        cmdline = p.cmdline()
        if "mlflow" in cmdline and "server" in cmdline and "--port" in cmdline:
            return int(cmdline[cmdline.index("--port") + 1])
    raise AssertionError(f"no mlflow server under the Jupyter server:\n{server.log.read_text()}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_mlflow_ui_is_refused_without_a_token(server: Server) -> None:
    for path in ("mlflow/", "mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=5"):
        code, headers, _ = server.fetch(path, token=False)
        assert code in (302, 403), (path, code)
        if code == 302:
            assert "login" in headers["Location"]
    code, _, _ = server.fetch("mlflow/ajax-api/2.0/mlflow/runs/search", token=False,
                              method="POST", body={"experiment_ids": ["1"]})
    assert code == 403
    assert not [p for p in _family(server.process.pid) if "mlflow" in p.cmdline()]  # not started


@pytest.mark.parametrize("stop", ["terminate", "kill"])
def test_the_mlflow_ui_and_its_api_through_the_proxy_end_with_the_server(
        server: Server, stop: str) -> None:
    code, _, page = server.fetch("mlflow/")  # starts mlflow server, waits for it to answer
    assert code == 200, server.log.read_text()[-3000:]
    assert b"<title>MLflow</title>" in page
    # The UI's own files and API calls are relative to the page: they must come back too.
    script = re.search(rb'src="(static-files/static/js/main\.[0-9a-f]+\.js)"', page)
    assert script is not None
    code, headers, _ = server.fetch("mlflow/" + script.group(1).decode())
    assert code == 200 and "javascript" in headers["Content-Type"]

    code, _, body = server.fetch("mlflow/ajax-api/2.0/mlflow/experiments/search?max_results=50")
    assert code == 200
    assert "from-the-test" in [e["name"] for e in json.loads(body)["experiments"]]
    code, _, body = server.fetch("mlflow/ajax-api/2.0/mlflow/registered-models/search")
    assert code == 200 and [m["name"] for m in json.loads(body)["registered_models"]] == ["digits"]

    # What the UI does from a browser on another machine: a POST with the page's Origin and
    # Host. MLflow sees its own loopback address as Host, and the origin is one it was told of.
    experiments = json.loads(server.fetch("mlflow/ajax-api/2.0/mlflow/experiments/search"
                                          "?max_results=50")[2])["experiments"]
    [experiment] = [e["experiment_id"] for e in experiments if e["name"] == "from-the-test"]
    search = "mlflow/ajax-api/2.0/mlflow/runs/search"
    code, _, body = server.fetch(search, method="POST", body={"experiment_ids": [experiment]},
                                 headers={"Origin": PUBLIC, "Host": PUBLIC.split("//")[1]})
    assert code == 200, body
    [run] = json.loads(body)["runs"]
    assert run["data"]["metrics"][0]["value"] == 0.125
    # ... while a cross-site page's POST is still refused by MLflow itself.
    code, _, body = server.fetch(search, method="POST", body={"experiment_ids": [experiment]},
                                 headers={"Origin": "http://evil.example"})
    assert code == 403 and b"Cross-origin request blocked" in body

    port = _mlflow_port(server)
    family = _family(server.process.pid)
    assert _port_open(port) and family
    if stop == "terminate":
        server.process.terminate()  # Ctrl-C, `jupyter server stop`, a service manager
    else:
        server.process.send_signal(signal.SIGKILL)  # a crash: nothing runs in Jupyter
    server.process.wait(30)
    wait_for(lambda: not _port_open(port), timeout=30, what="the MLflow port to close")
    wait_for(lambda: not [p for p in family if p.is_running() and p.status() != "zombie"],
             timeout=30, what="every process under the Jupyter server to end")


def test_the_proxy_entry_starts_mlflow_on_loopback_over_the_store_in_force(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///somewhere/else.db")
    entry = mlflow_ui.setup_mlflow()
    command = entry["command"](port=4321)
    supervisor, mlflow = command[:command.index("--")], command[command.index("--") + 1:]
    assert supervisor[-2:] == ["--parent", str(os.getpid())]
    assert mlflow[:4] == [sys.executable, "-m", "mlflow", "server"]
    options = dict(zip(mlflow[4::2], mlflow[5::2], strict=True))
    assert options == {"--host": "127.0.0.1", "--port": "4321", "--workers": "1",
                       "--backend-store-uri": "sqlite:///somewhere/else.db"}
    assert entry["absolute_url"] is False
