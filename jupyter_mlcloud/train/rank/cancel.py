"""Cancelling a rank, cooperatively: a flag per rank, checked at its safe points.

``cancel_rank`` (called through ``Client.run``) only sets the flag; the rank raises
``RunCancelled`` on its own thread at its next safe point (each ``ctx.shard`` batch, each
``ctx.epochs`` epoch, each ``ctx.report``, each ``optimizer.step()``), so nothing can interrupt
its teardown.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


class RunCancelled(Exception):
    """Raised by a rank on its own thread, at a step boundary, once its run is cancelled."""


@dataclass
class _Active:
    run_id: str
    rank: int
    attempt: int
    thread_id: int
    cancelled: bool = False  # read by the rank at its safe points
    finishing: bool = False  # in teardown: too late to stop
    steps: int = 0  # steps done so far (set by the rank's context at each step)
    stop_requested: bool = False  # a planned stop (a budget, a hand-over) was asked for
    stop_at: int | None = None  # ...at this step, once the launcher has agreed on one

    def check(self) -> None:
        """A safe point of the rank: stop here if the run was cancelled."""
        if self.cancelled:
            raise RunCancelled(f"run {self.run_id} was cancelled.")

_active: dict[str, _Active] = {}


# Cancels that arrived before their rank's task started: (run id, attempt), newest last.
_early_cancels: OrderedDict[tuple[str, int], None] = OrderedDict()
EARLY_CANCELS_KEPT = 256
_lock = threading.Lock()


def cancel_rank(run_id: str, attempt: int | None = None) -> bool:
    """Ask this worker's rank of ``run_id`` to stop at its next safe point (called through
    ``Client.run``); True if a running rank was flagged.

    With ``attempt``, a rank of that attempt whose task has not started yet is flagged when it
    does: it still joins the rendezvous (its peers wait there for it), then stops at once.
    """
    with _lock:
        active = _active.get(run_id)
        if active is not None and attempt in (None, active.attempt):
            if active.finishing:
                return False
            active.cancelled = True
            return True
        if attempt is not None:
            _early_cancels[(run_id, attempt)] = None
            while len(_early_cancels) > EARLY_CANCELS_KEPT:
                _early_cancels.popitem(last=False)
        return False


def request_stop(run_id: str) -> int | None:
    """Ask this worker's rank of ``run_id`` for a planned stop (called through ``Client.run``);
    returns the steps it has done (None: no such rank here).

    The rank pauses at its next step boundary until the launcher sets the step every rank
    stops at (:func:`set_stop_at`), one past the most any rank had done when asked, so that
    no rank has gone beyond it and every rank commits that same step before it stops.
    """
    with _lock:
        active = _active.get(run_id)
        if active is None or active.finishing:
            return None
        active.stop_requested = True
        return active.steps


def progress(run_id: str) -> tuple[int, bool] | None:
    """This worker's rank of ``run_id``: (steps done, in its teardown); None if none runs
    here (called through ``Client.run``)."""
    with _lock:
        active = _active.get(run_id)
        return None if active is None else (active.steps, active.finishing)


def set_stop_at(run_id: str, step: int) -> None:
    """The step at which the rank of ``run_id`` commits and stops (see :func:`request_stop`)."""
    with _lock:
        active = _active.get(run_id)
        if active is not None:
            active.stop_at = step


STOP_AGREE_S = 30.0  # how long a rank waits for the launcher to name the stop step


def stop_due(run_id: str, steps: int) -> bool:
    """At a step boundary, with ``steps`` done: True if the rank should commit and stop here.

    Cheap when no stop was asked for (one dict lookup)."""
    active = _active.get(run_id)
    if active is None:
        return False
    active.steps = steps
    if not active.stop_requested:
        return False
    deadline = time.monotonic() + STOP_AGREE_S
    while active.stop_at is None and time.monotonic() < deadline:
        active.check()  # a plain cancel still wins
        time.sleep(0.01)
    return active.stop_at is None or steps >= active.stop_at


def cancel_point() -> None:
    """Raise ``RunCancelled`` if the rank running on this thread was cancelled (for waits
    outside ``ctx``, e.g. on parameter-server replies)."""
    me = threading.get_ident()
    with _lock:
        mine = [a for a in _active.values() if a.thread_id == me]
    for active in mine:
        active.check()


def before_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    cancel_point()  # a global hook: only the thread of a cancelled rank is stopped


def busy_with() -> list[str]:
    """Run ids active on this worker."""
    with _lock:
        return list(_active)


def begin(run_id: str, rank: int, attempt: int, worker_address: str) -> _Active:
    """Mark this worker as running rank ``rank`` of ``run_id`` on the calling thread.

    A cancel that arrived before the task started flags the rank at once: it still joins the
    rendezvous (its peers wait there for it), then stops.
    """
    with _lock:
        if _active:
            raise RuntimeError(
                f"worker {worker_address} is already training run {next(iter(_active))};"
                " pick other workers or wait for it."
            )
        active = _Active(run_id, rank, attempt, threading.get_ident())
        if (run_id, attempt) in _early_cancels:
            del _early_cancels[(run_id, attempt)]
            active.cancelled = True
        _active[run_id] = active
    return active


def finishing(active: _Active) -> None:
    """The rank entered its teardown: a cancel from now on is too late to matter."""
    with _lock:
        active.finishing = True


def end(run_id: str) -> None:
    """The rank's task is over: the worker may take another."""
    with _lock:
        _active.pop(run_id, None)
