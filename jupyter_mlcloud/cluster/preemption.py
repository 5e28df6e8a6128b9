"""Workers that are told to go (SIGTERM, as a spot or preemptible VM is before it is taken
away) retire gracefully, so the scheduler records their departure as expected, not as a crash.

A run reads that record (:func:`departed_as_planned`) and treats such a loss as a planned move:
it resumes from its last commit on a replacement without using any of ``max_failures``.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

NAME = "mlcloud-graceful-termination"


class GracefulTermination(WorkerPlugin):
    """On SIGTERM, the worker retires gracefully (``Worker.close_gracefully``) instead of dying
    at once; the signal's earlier handler is put back when the plugin goes."""

    name = NAME

    def __init__(self) -> None:
        self._previous: Any = None

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread (a thread-based worker)

        def on_term(signum: int, frame: Any) -> None:
            worker.loop.add_callback(worker.close_gracefully, reason="sigterm")

        self._previous = signal.signal(signal.SIGTERM, on_term)

    def teardown(self, worker: Any) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)


def install(client: Any) -> None:
    """Register :class:`GracefulTermination` on every worker of ``client``'s cluster, present
    and future (once per client)."""
    if getattr(client, "_mlcloud_graceful_termination", False):
        return
    client.register_plugin(GracefulTermination(), name=NAME)
    client._mlcloud_graceful_termination = True


def departed_as_planned(client: Any, worker: str) -> bool:
    """Whether the scheduler recorded ``worker``'s departure as expected: retired
    (``Client.retire_workers``, a graceful close after SIGTERM), not lost."""
    try:
        logged = client.get_events(worker)
    except Exception:
        return False
    for _, event in logged:
        if not isinstance(event, dict):
            continue
        if event.get("action") == "retired":
            return True
        if event.get("action") == "remove-worker" and event.get("expected"):
            return True
    return False
