"""Keeps a local cluster whole: every worker its spec names comes back after any death.

Three ways a Dask ``LocalCluster`` stays a worker short for good, all seen on busy machines:

- ``SpecCluster`` closes a worker's nanny ("nanny-close") and forgets it when no worker of
  that name is back on the scheduler within ``distributed.deploy.lost-worker-timeout``
  (15 s). On a loaded machine that lands in the middle of the nanny's own restart, and
  nothing ever starts that worker again: the spec still names it, ``cluster.workers`` has
  lost it.
- A nanny whose restart fails does not try again (dask/distributed#6426).
- A new worker process can hang before it registers, and the nanny waits forever.

On the local clusters ``mlc.up`` starts, :func:`watch` takes this over. The cluster's
close-on-lost timer is switched off, and every second each name of the worker spec is looked
up among the scheduler's workers. A missing worker gets ``revive-after / 3`` seconds for its
nanny's own restart (``mlcloud.cluster.revive-after``, Dask config, default 15 s); a nanny
still starting a process gets twice that. Then the nanny is closed (its process killed) and
a fresh one is started in its place, itself given ``2 * revive-after / 3`` (at least 10 s)
to register before it is ended and another one started. So the worker count is back within
about ``revive-after`` of a death. Deployments (Slurm, Kubernetes, Gateway) replace workers
themselves and are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import weakref
from typing import Any

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0
REVIVE_AFTER_S = 15.0
MIN_START_TIMEOUT_S = 10.0  # a worker process on a busy machine can take this long to start
CALLBACK_NAME = "mlcloud-revive"


def revive_after() -> float:
    """``mlcloud.cluster.revive-after``: seconds within which a dead worker is back."""
    import dask

    return float(dask.config.get("mlcloud.cluster.revive-after", REVIVE_AFTER_S))


def _registered_names(cluster: Any) -> set[Any]:
    return {ws.name for ws in cluster.scheduler.workers.values()}


def _restarting(nanny: Any) -> bool:
    """True while a running nanny has a worker process that is starting or up."""
    from distributed.core import Status

    process = getattr(nanny, "process", None)
    return (getattr(nanny, "status", None) == Status.running and process is not None
            and getattr(process, "status", None) in (Status.starting, Status.running))


async def _end(cluster: Any, nanny: Any) -> None:
    """Close ``nanny`` in the background and SIGKILL its worker process now (a process that
    hangs at start may not heed the nanny's stop)."""
    pid = getattr(nanny, "pid", None)
    cluster._futures.add(asyncio.ensure_future(_close_quietly(nanny)))
    await asyncio.sleep(0)  # the close marks the nanny closing first: it restarts nothing now
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


async def _close_quietly(nanny: Any) -> None:
    try:
        await asyncio.wait_for(nanny.close(timeout=2, reason="mlcloud-revive"), 10)
    except Exception as e:  # a nanny stuck in its start cannot close cleanly; its process is gone
        logger.info("nanny %s did not close cleanly (%r)", nanny.address_safe, e)


class _Watcher:
    """The per-cluster state of :func:`watch`: since when each name is missing, and the
    replacements under way."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.missing_since: dict[Any, float] = {}
        self.replacing: dict[Any, asyncio.Task[None]] = {}
        self.replaced = 0  # replacement workers started, for tests and logs

    async def check(self) -> None:
        from distributed.core import Status

        cluster = self.cluster
        if cluster.status != Status.running or cluster._lock.locked():
            return  # closing, or scale/adapt is opening or closing workers right now
        after = revive_after()
        now = time.monotonic()
        present = _registered_names(cluster)
        for name in list(cluster.worker_spec):
            if name in present or name in self.replacing:
                if name in present:
                    self.missing_since.pop(name, None)
                continue
            since = self.missing_since.setdefault(name, now)
            nanny = cluster.workers.get(name)
            allowed = after / 3 * (2 if nanny is not None and _restarting(nanny) else 1)
            if nanny is not None and now - since < allowed:
                continue
            start_timeout = max(after * 2 / 3, MIN_START_TIMEOUT_S)
            self.replacing[name] = asyncio.ensure_future(self._replace(name, start_timeout))

    async def _replace(self, name: Any, start_timeout: float) -> None:
        cluster = self.cluster
        try:
            async with cluster._lock:
                if name not in cluster.worker_spec or name in _registered_names(cluster):
                    return
                old = cluster.workers.pop(name, None)
                if old is not None:
                    logger.warning("worker %r is still not back %.0f s after it left; starting"
                                   " a fresh one", name, time.monotonic()
                                   - self.missing_since.get(name, time.monotonic()))
                    await _end(cluster, old)
                else:
                    logger.warning("worker %r was dropped from the cluster; starting it again",
                                   name)
                worker = self._new_worker(name)
                try:
                    await asyncio.wait_for(self._started(worker), start_timeout)
                except Exception as e:  # a start that hangs or fails: end it, try next tick
                    logger.warning("a fresh worker %r did not start within %.0f s (%s);"
                                   " trying again", name, start_timeout, e or type(e).__name__)
                    cluster.workers.pop(name, None)
                    await _end(cluster, worker)
                    return
                self.replaced += 1
                self.missing_since.pop(name, None)
        finally:
            self.replacing.pop(name, None)

    def _new_worker(self, name: Any) -> Any:
        """A worker of the spec's class and options for ``name``, as ``SpecCluster`` makes
        them, entered in ``cluster.workers`` at once so the cluster closes it too."""
        from distributed.utils import import_term

        cluster = self.cluster
        spec = cluster.worker_spec[name]
        cls, options = spec["cls"], dict(spec.get("options", {}))
        options.setdefault("name", name)
        if isinstance(cls, str):
            cls = import_term(cls)
        address = getattr(cluster.scheduler, "contact_address", None) or cluster.scheduler.address
        worker = cls(address, **options)
        worker._cluster = weakref.ref(cluster)
        cluster._created.add(worker)
        cluster.workers[name] = worker
        return worker

    async def _started(self, worker: Any) -> None:
        await worker
        # Started means registered: the nanny's start returns once its worker has joined.
        while worker.name not in _registered_names(self.cluster):
            await asyncio.sleep(0.05)


def _without_close_on_lost(cluster: Any) -> None:
    """Switch off ``SpecCluster``'s timer that closes and forgets a worker's nanny when no
    worker of its name is back within ``distributed.deploy.lost-worker-timeout``: the
    watcher replaces such workers instead of dropping them."""
    from distributed.deploy.cluster import Cluster

    cluster._update_worker_status = Cluster._update_worker_status.__get__(cluster)


def watch(cluster: Any) -> _Watcher:
    """Keep the workers of ``cluster`` (a local ``SpecCluster`` with an in-process scheduler)
    whole. The check runs on the cluster's event loop and stops when the cluster closes."""
    from tornado.ioloop import PeriodicCallback

    watcher = _Watcher(cluster)
    _without_close_on_lost(cluster)
    callback = PeriodicCallback(watcher.check, CHECK_EVERY_S * 1000)
    cluster.periodic_callbacks[CALLBACK_NAME] = callback  # stopped by the cluster's close
    cluster.loop.add_callback(callback.start)
    cluster._mlcloud_watcher = watcher
    return watcher
