"""A worker that comes back after the scheduler dropped it for silence (a cut link).

A nanny preload for workers on other hosts::

    dask worker tls://10.0.0.5:8786 --preload-nanny jupyter_mlcloud.cluster.rejoin ...

When a host is cut off the network, the scheduler stops hearing its worker's heartbeats. After
``distributed.scheduler.worker-ttl`` it tries to restart the worker through its nanny, which it
cannot reach either, and then removes it. Once the link is back, the worker learns it was dropped
(the scheduler's close, a heartbeat answered "missing", a broken stream) and closes, and its
nanny closes with it, so the host stays out until a supervisor starts ``dask worker`` again.

With this preload the nanny first asks the scheduler why. If the scheduler's own log says it
timed this worker out (its ``worker-ttl-timed-out`` event names the worker), the nanny lets the
old process end and starts a fresh worker, which registers as a new one. Any other close
(``retire_workers``, a cluster closing, a scheduler that is gone) closes the nanny as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

# Why a worker closes itself once the scheduler has dropped it.
DROPPED_REASONS = frozenset({
    "worker-heartbeat-missing",
    "scheduler-remove-worker",
    "worker-handle-scheduler-connection-broken",
    "worker-heartbeat-error",
})
ASK_TIMEOUT_S = 5.0  # a scheduler that does not answer by then is treated as gone


def timed_out(events: Iterable[tuple[float, Any]], worker: str) -> bool:
    """Whether the scheduler's events (topic ``"scheduler"``) say it timed ``worker`` out."""
    return any(isinstance(msg, dict) and msg.get("action") == "worker-ttl-timed-out"
               and worker in msg.get("workers", ()) for _, msg in events)


async def _dropped_for_silence(nanny: Any) -> bool:
    worker = nanny.worker_address
    if not worker:
        return False
    try:
        events = await asyncio.wait_for(nanny.scheduler.events(topic="scheduler"),
                                        ASK_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        return False  # no scheduler to rejoin
    return timed_out(events, worker)


def dask_setup(nanny: Any) -> None:
    """Wrap the nanny's ``close_gracefully`` handler, which its worker calls as it closes."""
    close_gracefully = nanny.handlers["close_gracefully"]

    async def close_unless_dropped(reason: str = "nanny-close-gracefully") -> None:
        if reason in DROPPED_REASONS and await _dropped_for_silence(nanny):
            logger.warning(
                "the scheduler dropped worker %s after it missed its heartbeats (%s);"
                " starting a fresh worker to rejoin the cluster", nanny.worker_address, reason)
            return  # the nanny stays running: it restarts the worker once the old one exits
        close_gracefully(reason=reason)

    nanny.handlers["close_gracefully"] = close_unless_dropped
