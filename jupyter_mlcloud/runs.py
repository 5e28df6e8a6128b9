"""Every training run on the discovered clusters, read back from their Dask event topics.

The launcher logs one event per run start and end on ``mlcloud-runs``, and ranks log points on
``mlcloud-metrics-<run>``. Reading them from the schedulers (not from any kernel) is why run
lists and loss panels survive kernel restarts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import cluster_info, discovery, metrics


def fold_run_events(events: list[tuple[float, Any]]) -> dict[str, dict[str, Any]]:
    """Run id -> {run, status, workers, pid, started, ended} from ``mlcloud-runs`` events."""
    runs: dict[str, dict[str, Any]] = {}
    for stamp, msg in events:
        if not isinstance(msg, dict) or "run" not in msg:
            continue
        run = runs.setdefault(msg["run"], {"run": msg["run"], "status": "running",
                                           "started": stamp, "ended": None})
        if msg.get("state") == "started":
            run.update(workers=msg.get("workers", []), pid=msg.get("pid"), started=stamp)
        else:
            run.update(status=msg.get("state", "ended"), ended=stamp)
    return runs


async def list_runs(*, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Every run on every reachable discovered cluster, newest first, with its last point."""

    async def of_cluster(record: discovery.ClusterRecord) -> list[dict[str, Any]]:
        if not record.address or record.tls:
            return []
        found = fold_run_events(
            await cluster_info.events(record.address, metrics.RUNS_TOPIC, timeout))
        for run in found.values():
            points = metrics.items_of(await cluster_info.events(
                record.address, metrics.metrics_topic(run["run"]), timeout))
            last = points[-1] if points else {}
            run.update(cluster=record.name, points=len(points), step=last.get("step"),
                       last={k: v for k, v in last.items()
                             if k not in ("rank", "step", "epoch", "time")})
        return list(found.values())

    per_cluster = await asyncio.gather(*(of_cluster(r) for r in discovery.list_records()))
    runs = [run for group in per_cluster for run in group]
    return sorted(runs, key=lambda r: r["started"], reverse=True)
