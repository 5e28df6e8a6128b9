"""Shared fixtures: an isolated Jupyter runtime dir, and checks that nothing is left behind."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

pytest_plugins = ("pytest_jupyter.jupyter_server",)

# Ranks and workers share 2 cores: keep each process to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own Jupyter runtime dir, inherited by the processes it starts."""
    path = tmp_path / "runtime"
    path.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(path))
    return path


@pytest.fixture(autouse=True)
def no_cluster_left() -> Iterator[None]:
    """Every test must close what it opened: clusters, worker processes, discovery files."""
    import jupyter_mlcloud as mlc

    before = set(mlc.clusters.handles())  # module-scoped clusters live on
    yield
    leftovers = [h for h in mlc.clusters.handles() if h not in before]
    for handle in leftovers:
        handle.close()
    assert not leftovers, f"test left clusters open: {[h.name for h in leftovers]}"


def child_processes() -> list[psutil.Process]:
    """Live child processes of this test process (workers), but multiprocessing's own
    resource tracker, which lives as long as the test process by design."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                p.cmdline()
            ):
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def discovery_files() -> list[Path]:
    from jupyter_mlcloud.discovery import discovery_dir

    folder = discovery_dir()
    return sorted(folder.iterdir()) if folder.is_dir() else []
