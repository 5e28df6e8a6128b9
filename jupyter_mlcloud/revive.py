"""Keeps a local cluster whole: starts again a worker process its nanny gave up on.

A Dask nanny restarts a worker process that dies, but not one whose restart failed in turn
(dask/distributed#6426): the cluster then stays a worker short for good, and a training run
that waits for a replacement gives up. On the local clusters ``mlc.up`` starts, a check every
second starts such a worker again once it has been down for ``mlcloud.cluster.revive-after``
seconds (Dask config, default 15: longer than a nanny's own restart, which first unregisters
the dead worker for up to 10 s). Deployments (Slurm, Kubernetes, Gateway) replace workers
themselves and are left alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0
REVIVE_AFTER_S = 15.0
CALLBACK_NAME = "mlcloud-revive"


def _down(nanny: Any) -> bool:
    """True when a running nanny has no worker process and none is starting."""
    from distributed import Nanny
    from distributed.core import Status

    if not isinstance(nanny, Nanny) or nanny.status != Status.running:
        return False  # an in-process worker, or a nanny closing on purpose (scale down, close)
    process = nanny.process
    return process is None or process.status in (Status.stopped, Status.failed)


def watch(cluster: Any) -> None:
    """Revive workers of ``cluster`` (a local ``SpecCluster`` with nannies) that stay down.

    The check runs on the cluster's event loop and stops when the cluster closes.
    """
    import dask
    from tornado.ioloop import PeriodicCallback

    down_since: dict[Any, float] = {}

    async def check() -> None:
        after = float(dask.config.get("mlcloud.cluster.revive-after", REVIVE_AFTER_S))
        now = time.monotonic()
        for name, nanny in list(cluster.workers.items()):
            if not _down(nanny):
                down_since.pop(name, None)
                continue
            if now - down_since.setdefault(name, now) < after:
                continue
            down_since.pop(name)
            logger.warning("worker %s stayed down %.0f s after its nanny's restart; starting it"
                           " again", name, after)
            try:
                await nanny.instantiate()
            except Exception:
                logger.exception("worker %s could not be started again", name)

    callback = PeriodicCallback(check, CHECK_EVERY_S * 1000)
    cluster.periodic_callbacks[CALLBACK_NAME] = callback  # stopped by the cluster's close
    cluster.loop.add_callback(callback.start)
