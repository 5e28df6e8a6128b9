"""Live figures of a Dask scheduler: workers, threads, memory, GPUs."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, TypedDict


def workers(client: Any) -> dict[str, Any]:
    """Every worker the scheduler knows now, by address (a synchronous ``Client``).

    Asks the scheduler directly: ``Client.scheduler_info()`` returns a cache that the
    client's own periodic refresh overwrites with a worker-less summary, so a caller can read
    no workers at all while every worker is up.
    """
    return dict(client.sync(client.scheduler.identity, n_workers=-1)["workers"])


def addresses(client: Any) -> set[str]:
    """The address of every worker the scheduler knows now: what :func:`workers` lists,
    without each worker's figures (a run's watcher asks several times a second)."""
    return set(client.sync(client.scheduler.ncores))


class Summary(TypedDict):
    """Totals over a scheduler's workers."""

    workers: int
    threads: int
    memory: int
    gpus: int


def summarize(workers: Mapping[str, Mapping[str, Any]]) -> Summary:
    """Totals from a scheduler's ``workers`` mapping (``identity()`` or ``scheduler_info()``).

    A worker counts as one GPU when it reports GPU metrics (Dask-CUDA runs one worker per GPU).
    """
    return Summary(
        workers=len(workers),
        threads=sum(int(w.get("nthreads") or 0) for w in workers.values()),
        memory=sum(int(w.get("memory_limit") or 0) for w in workers.values()),
        gpus=sum(1 for w in workers.values() if (w.get("metrics") or {}).get("gpu")),
    )


async def events(address: str, topic: str, timeout: float = 2.0) -> list[tuple[float, Any]]:
    """The events logged on ``topic`` at the scheduler at ``address`` ([] if it does not answer)."""
    found = await try_events(address, topic, timeout)
    return [] if found is None else found


async def try_events(address: str, topic: str,
                     timeout: float = 2.0) -> list[tuple[float, Any]] | None:
    """The events logged on ``topic`` at the scheduler at ``address``; None if it is silent."""
    from distributed.core import rpc

    async def ask() -> list[tuple[float, Any]]:
        async with rpc(address, timeout=timeout) as scheduler:
            return list(await scheduler.events(topic=topic))

    try:
        return await asyncio.wait_for(ask(), timeout)
    except Exception:
        return None


async def worker_resources(address: str, timeout: float = 2.0) -> dict[str, list[Any]] | None:
    """Per-worker CPU %, memory and GPU figures, as columns; None if the scheduler is silent."""
    info = await _identity(address, timeout)
    if info is None:
        return None
    workers = info.get("workers", {})
    columns: dict[str, list[Any]] = {"worker": [], "cpu": [], "memory_gib": [], "gpu_util": [],
                                     "gpu_memory_gib": []}
    for address_, info in sorted(workers.items()):
        figures = info.get("metrics") or {}
        gpu = figures.get("gpu") or {}
        columns["worker"].append(str(info.get("name", address_)))
        columns["cpu"].append(float(figures.get("cpu") or 0))
        columns["memory_gib"].append(float(figures.get("memory") or 0) / 2**30)
        columns["gpu_util"].append(float(gpu.get("utilization") or 0))
        columns["gpu_memory_gib"].append(float(gpu.get("memory-used") or 0) / 2**30)
    return columns


async def probe(address: str, timeout: float = 2.0) -> Summary | None:
    """Ask the scheduler at ``address`` for its workers; None if it does not answer in time."""
    info = await _identity(address, timeout)
    return None if info is None else summarize(info.get("workers", {}))


async def _identity(address: str, timeout: float) -> dict[str, Any] | None:
    """The scheduler's ``identity()`` (workers and their metrics); None if it is silent."""
    from distributed.core import rpc

    async def ask() -> dict[str, Any]:
        async with rpc(address, timeout=timeout) as scheduler:
            return dict(await scheduler.identity())

    try:
        return await asyncio.wait_for(ask(), timeout)
    except Exception:
        return None

