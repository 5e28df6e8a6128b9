"""The MLflow UI inside JupyterLab, at ``<base_url>mlflow/``, behind Jupyter's authentication.

jupyter-server-proxy starts ``mlflow server`` on the first request to that prefix (entry point
``jupyter_serverproxy_servers``: ``mlflow``) and forwards every request to it once Jupyter has
authenticated it. The MLflow server listens on a free loopback port only, so nothing reaches
it but the proxy, and it reads the same store as the kernels (:func:`tracking_uri`).

The UI asks for its files and its API with relative URLs, so the proxy strips the prefix and
MLflow runs as if at ``/``. MLflow 3 refuses requests whose Host header is not local (DNS
rebinding) and state-changing API calls from origins that are not local (cross-site requests):
the proxy sends MLflow its own loopback address as Host, since the browser never talks to
MLflow directly; the Origin header is left as the browser sent it, so MLflow's cross-site
check still holds. Where JupyterLab is opened from another machine, list its address in
``MLFLOW_SERVER_CORS_ALLOWED_ORIGINS`` before starting Jupyter.

Run as a module, this file is the small supervisor the proxy starts: it runs ``mlflow server``
in a process group of its own and ends that group when the Jupyter server goes away however it
ends (a signal, the "Shut Down" menu, a crash), so no MLflow server outlives its Jupyter.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

NAME = "mlflow"  # the URL prefix under the base URL, and the launcher's name for it
START_TIMEOUT_S = 90.0  # mlflow server takes 5-10 s to answer on a quiet 2-core machine
STOP_TIMEOUT_S = 10.0  # from SIGTERM to SIGKILL of the MLflow processes
WATCH_S = 0.5  # how often the supervisor checks that the Jupyter server is still there


def mlflow_command(port: int, uri: str) -> list[str]:
    """``mlflow server`` on ``127.0.0.1:port`` over the store ``uri``: one worker, since it
    serves one user's browser."""
    return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", uri]


def command(port: int) -> list[str]:
    """The proxy's command for ``port``: the supervisor, watching this (the Jupyter server's)
    process, around ``mlflow server``. The store is resolved here, at first use, so loading
    the server extension imports no MLflow."""
    from ..tracking.store import tracking_uri

    return [sys.executable, "-m", __name__, "--parent", str(os.getpid()), "--",
            *mlflow_command(port, tracking_uri())]


def setup_mlflow() -> dict[str, Any]:
    """jupyter-server-proxy's description of the MLflow server (its ``ServerProcess`` options)."""
    return {
        "command": command,
        "timeout": START_TIMEOUT_S,
        "absolute_url": False,
        # Periodic MLflow jobs (GenAI evaluation) would start more processes on the laptop.
        "environment": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        "request_headers_override": {"Host": "127.0.0.1:{port}"},
        "new_browser_tab": False,
        "launcher_entry": {"title": "MLflow", "category": "Other",
                           "icon_path": str(Path(__file__).with_name("mlflow-launcher.svg"))},
    }


def supervise(cmd: list[str], parent: int, *, watch_s: float = WATCH_S,
              stop_timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Run ``cmd`` in a new process group until it exits, this process gets SIGTERM/SIGINT, or
    ``parent`` is no longer this process's parent; then end the whole group. Returns the
    command's exit status (0 when it was stopped from outside)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    child = subprocess.Popen(cmd, start_new_session=True)
    while child.poll() is None and not stop.is_set() and os.getppid() == parent:
        stop.wait(watch_s)
    if child.poll() is not None:
        _end_group(child.pid, signal.SIGKILL)  # whatever the command left running
        return child.returncode
    _end_group(child.pid, signal.SIGTERM)
    try:
        child.wait(stop_timeout_s)
    except subprocess.TimeoutExpired:
        pass
    _end_group(child.pid, signal.SIGKILL)  # uvicorn or anything it started, still there
    child.wait()
    return 0


def _end_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    """``python -m jupyter_mlcloud.server.mlflow_ui --parent PID -- COMMAND...``"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, required=True,
                        help="the Jupyter server's process id; COMMAND ends when it is gone")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command to run after --")
    return supervise(cmd, args.parent)


if __name__ == "__main__":
    sys.exit(main())
