"""A real `jupyter lab` server and a real headless Chromium driven by Playwright."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import answers, free_port, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent.parent.parent / "test-artifacts"


@dataclass
class Lab:
    url: str
    token: str
    root: Path

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None


@pytest.fixture
def lab(tmp_path: Path, runtime_dir: Path) -> Iterator[Lab]:
    root = tmp_path / "notebooks"
    root.mkdir()
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", "--ip=127.0.0.1",
    ]
    if os.getuid() == 0:
        command.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir),
                                   # the sidebar's model list reads a store: a fresh one, unless
                                   # the test names its own
                                   "MLFLOW_TRACKING_URI": os.environ.get(
                                       "MLFLOW_TRACKING_URI",
                                       f"sqlite:///{tmp_path / 'mlruns.db'}"),
                                   # a fresh layout each time, not the developer's own
                                   "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
                                   "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or answers(f"{url}/api/status?token={token}"),
                 timeout=90, what="jupyter lab to answer")
        assert server.poll() is None, (tmp_path / "lab.log").read_text()
        yield Lab(url, token, root)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.fixture
def page(lab: Lab) -> Iterator[Any]:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed; `make test` installs it (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        browser.close()


# ---------------------------------------------------------------- page helpers


def iframe_of(page: Any, selector: str) -> Any:
    """The document inside the iframe at ``selector``, once it has loaded."""
    frame = page.locator(selector).element_handle().content_frame()
    frame.wait_for_load_state()
    return frame


def open_sidebar(page: Any) -> None:
    """Open the ML Cloud sidebar once JupyterLab has restored its layout."""
    tab = page.locator('.jp-SideBar [data-id="mlcloud-sidebar"]')
    tab.wait_for()
    # JupyterLab restores the saved layout after the tabs appear, and that can collapse a
    # panel opened meanwhile: click only once it has restored (its splash screen is gone).
    page.wait_for_function("() => !document.getElementById('jupyterlab-splash')",
                           timeout=120_000)
    if not page.locator("#mlcloud-sidebar").is_visible():
        tab.click()
    page.locator("#mlcloud-sidebar .jp-mlcloud-header").wait_for()


def bokeh_model(name: str, expression: str) -> str:
    """A JS condition on the Bokeh model ``name`` (as ``m``) of the frame's document."""
    return ("() => { const m = window.Bokeh && Bokeh.documents.length &&"
            f" Bokeh.documents[0].get_model_by_name({json.dumps(name)});"
            f" return !!m && ({expression}); }}")
