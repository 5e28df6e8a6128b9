"""A real ``mlflow server`` on a loopback port, started and stopped by the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import answers, free_port, wait_for

START_TIMEOUT_S = 120.0


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """``mlflow server`` with an SQLite store in ``folder`` on 127.0.0.1; its URI once it
    answers. The whole process group is stopped on exit, and the port is free again."""
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    health = f"{uri}/health"
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        # No job runner: its consumer processes serve features these tests do not use.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        cwd=folder, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "wb"),
        start_new_session=True)
    try:
        wait_for(lambda: answers(health, timeout=1) or process.poll() is not None,
                 START_TIMEOUT_S, "mlflow server to answer")
        assert process.poll() is None, (folder / "server.log").read_text()[-3000:]
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
        wait_for(lambda: not answers(health, timeout=1), 30, "the mlflow server's port to close")
