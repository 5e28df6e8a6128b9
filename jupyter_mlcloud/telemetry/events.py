"""The one metrics path: ranks log batched points as Dask events; readers subscribe.

Workers call :class:`EventBatcher` (through ``ctx.report`` and the rank's stdout); the kernel,
the sidebar's server and the panels read the same topics with ``Client.subscribe_topic`` or
``Client.get_events``. Nothing passes through the kernel, so panels survive kernel restarts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from numbers import Number
from typing import Any

RUNS_TOPIC = "mlcloud-runs"  # one event per run start / end, for run lists


def metrics_topic(run_id: str) -> str:
    """Topic of a run's reported points."""
    return f"mlcloud-metrics-{run_id}"


def logs_topic(run_id: str) -> str:
    """Topic of a run's stdout / stderr lines."""
    return f"mlcloud-logs-{run_id}"


def control_topic(run_id: str) -> str:
    """Topic of a run's lifecycle events (a resumed attempt restored, its first step)."""
    return f"mlcloud-control-{run_id}"


def to_number(name: str, value: Any) -> float:
    """A reported value as a float: tensors (``.item()``), numpy scalars and numbers."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (RuntimeError, ValueError):  # several elements: refused below, in one sentence
            pass
    if isinstance(value, (bool, complex)) or not isinstance(value, Number):
        raise ValueError(
            f"ctx.report({name}=...) needs a number or a one-element tensor, got"
            f" {type(value).__name__}."
        )
    return float(value)  # type: ignore[arg-type]


class EventBatcher:
    """Collects messages on a worker and logs them as one Dask event per flush.

    A message that comes ``interval`` seconds or more after the last send goes out at once;
    those that follow it sooner wait for the end of that interval and go out together. So a
    sparse message (a point per epoch) reaches subscribers without delay, a dense stream (a
    point per step) costs one event per interval, and the training thread never waits on the
    network: a background thread sends.
    """

    def __init__(self, log_event: Any, topic: str, interval: float = 0.2) -> None:
        self._log_event = log_event
        self._topic = topic
        self.interval = interval
        self._items: list[Any] = []
        self._lock = threading.Lock()
        self._due = threading.Event()  # something waits to be sent
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"flush-{topic}", daemon=True)
        self._thread.start()

    def add(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
        self._due.set()

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        if items:
            self._log_event(self._topic, {"items": items})

    def _loop(self) -> None:
        while not self._closed.is_set():
            self._due.wait()
            self._due.clear()
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - one failed send must not end the live points
                pass
            self._closed.wait(self.interval)  # what comes meanwhile goes out with the next send

    def close(self) -> None:
        """Flush what is left and stop the thread."""
        self._closed.set()
        self._due.set()
        self._thread.join()
        self.flush()


def point(rank: int, step: int, epoch: int | None, values: Mapping[str, Any]) -> dict[str, Any]:
    """One reported point, as it travels: rank, step, epoch, wall time and the metrics."""
    out: dict[str, Any] = {"rank": rank, "step": step, "epoch": epoch, "time": time.time()}
    out.update({name: to_number(name, value) for name, value in values.items()})
    return out


def items_of(events: Iterable[tuple[float, Any]]) -> list[Any]:
    """Unpack events logged by :class:`EventBatcher` back into their items, in order."""
    items: list[Any] = []
    for _, msg in events:
        if isinstance(msg, Mapping):
            items.extend(msg.get("items", ()))
    return items
