"""This process's runs in flight, by id: what the launcher and the front ends look up."""

from __future__ import annotations

import threading
from typing import Any

lock = threading.RLock()  # also held by a launch while it picks free workers
_active: dict[str, Any] = {}


def add(run: Any) -> None:
    """Count ``run`` as in flight."""
    with lock:
        _active[run.id] = run


def forget(run: Any) -> None:
    """``run`` has ended."""
    with lock:
        _active.pop(run.id, None)


def active_runs() -> list[Any]:
    """This process's runs that have not ended."""
    with lock:
        return list(_active.values())
