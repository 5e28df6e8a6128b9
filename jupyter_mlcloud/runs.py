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


def metric_columns(points: list[dict[str, Any]], history: int = 5000) -> dict[str, list[Any]]:
    """Rank 0's points as columns: ``step`` and one list per metric (last ``history`` points)."""
    mine = [p for p in points if p.get("rank") == 0][-history:]
    names = sorted({k for p in mine for k in p} - {"rank", "step", "epoch", "time"})
    columns: dict[str, list[Any]] = {"step": [p["step"] for p in mine]}
    for name in names:
        columns[name] = [p.get(name, float("nan")) for p in mine]
    return columns


async def run_points(run_id: str, *, timeout: float = 2.0) -> list[dict[str, Any]] | None:
    """Every point of run ``run_id``, from whichever discovered cluster ran it; None if none."""
    for record in discovery.list_records():
        if not record.address or record.tls:
            continue
        known = fold_run_events(
            await cluster_info.events(record.address, metrics.RUNS_TOPIC, timeout))
        if run_id in known:
            return metrics.items_of(await cluster_info.events(
                record.address, metrics.metrics_topic(run_id), timeout))
    return None


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
