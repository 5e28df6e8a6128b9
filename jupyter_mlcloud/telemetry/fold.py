"""Training runs as the schedulers record them, and their points as a panel's columns.

The launcher logs one event per run start and end on ``mlcloud-runs``, and ranks log points on
``mlcloud-metrics-<run>``. Reading them from the schedulers (not from any kernel) is why run
lists and loss panels survive kernel restarts; :mod:`jupyter_mlcloud.server.feeds` keeps them
current in the Jupyter server. These functions are pure: events and points in, rows and columns out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def fold_run_events(events: list[tuple[float, Any]]) -> dict[str, dict[str, Any]]:
    """Run id -> {run, status, workers, pid, started, ended[, mlflow]} from ``mlcloud-runs``
    events. A ``"tracked"`` event says where the run is recorded in MLflow (``{run_id,
    experiment_id, uri}``): it adds ``mlflow`` and leaves the status as it was."""
    runs: dict[str, dict[str, Any]] = {}
    for stamp, msg in events:
        if not isinstance(msg, dict) or "run" not in msg:
            continue
        run = runs.setdefault(msg["run"], {"run": msg["run"], "status": "running",
                                           "started": stamp, "ended": None})
        if msg.get("state") == "tracked":
            if isinstance(msg.get("mlflow"), dict):
                run["mlflow"] = msg["mlflow"]
        elif msg.get("state") == "started":
            run.update(workers=msg.get("workers", []), pid=msg.get("pid"), started=stamp)
        else:
            run.update(status=msg.get("state", "ended"), ended=stamp)
    return runs


HISTORY = 5000  # points of rank 0 a panel shows
RATE_WINDOW_S = 2.0  # steps/s is measured over the last this many seconds
NOT_METRICS = ("rank", "step", "epoch", "time")
MAX_OVERLAY = 16  # runs in one loss panel
_RUN_ID = re.compile(r"[0-9a-f]{1,32}")


def parse_run_ids(target: str) -> list[str]:
    """The run ids of a loss panel's target: one id, or several joined by commas (an overlay).

    Raises ``ValueError`` naming the bad part when the target is not such a list.
    """
    ids = [part.strip() for part in target.split(",")]
    for part in ids:
        if not _RUN_ID.fullmatch(part):
            raise ValueError(f"{part!r} is not a run id; give run ids (hex, as listed by"
                             " GET /mlcloud/runs) joined by commas.")
    unique = list(dict.fromkeys(ids))
    if len(unique) > MAX_OVERLAY:
        raise ValueError(f"{len(unique)} runs in one panel; at most {MAX_OVERLAY} can be overlaid.")
    return unique


def steps_per_s(times: Sequence[float], steps: Sequence[float],
                window: float = RATE_WINDOW_S) -> list[float | None]:
    """Steps per second at each point, over the points of the ``window`` seconds before it.

    None where there is no earlier point to measure from, or the step went back (a resume).
    """
    rates: list[float | None] = []
    j = 0
    for i, (t, s) in enumerate(zip(times, steps, strict=True)):
        while j < i and times[j] < t - window:
            j += 1
        k = j if j < i else i - 1
        if k < 0 or t <= times[k] or s < steps[k]:
            rates.append(None)
        else:
            rates.append((s - steps[k]) / (t - times[k]))
    return rates


def metric_names(points: Iterable[Mapping[str, Any]]) -> list[str]:
    """The reported metric names among ``points``, in the order they first appear."""
    names = dict.fromkeys(k for p in points for k in p if k not in NOT_METRICS)
    return list(names)


def metric_columns(points: list[dict[str, Any]], history: int = HISTORY) -> dict[str, list[Any]]:
    """Rank 0's last ``history`` points as columns: ``step``, ``time``, ``steps_per_s`` and one
    list per reported metric (None where a point did not report it)."""
    mine = [p for p in points if p.get("rank") == 0][-history:]
    steps = [p["step"] for p in mine]
    times = [p["time"] for p in mine]
    columns: dict[str, list[Any]] = {"step": steps, "time": times,
                                     "steps_per_s": steps_per_s(times, steps)}
    for name in metric_names(mine):
        columns.setdefault(name, [p.get(name) for p in mine])
    return columns
