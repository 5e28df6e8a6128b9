"""What an endpoint's replicas cost: each replica holds a worker from the moment it starts until
it stops, whatever stopped it (a scale-down, a rollback, its worker's death).

Each replica's entry in the endpoint's state carries when it started (``since``) and its
worker's kind; when an edit of the state (see :func:`.control.editing`) drops replicas, their
seconds move into the state's ``usage`` (seconds by kind). The cost is that, plus the live
replicas' seconds so far, priced like any run (see :mod:`..cost`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..cost import Cost, held_cost, price_table


def started(entry: dict[str, Any], kind: str, at: float | None = None) -> None:
    """Mark replica ``entry`` as holding a worker of ``kind`` from ``at`` (default: now)."""
    entry["since"] = time.time() if at is None else at
    entry["kind"] = kind


def settle(before: Mapping[str, Mapping[str, Any]], state: dict[str, Any],
           at: float | None = None) -> None:
    """Move the seconds of the replicas in ``before`` (by id) that ``state`` no longer has
    into ``state["usage"]``."""
    at = time.time() if at is None else at
    now = {r["id"] for v in state["versions"] for r in v["replicas"]}
    usage = state.setdefault("usage", {})
    for replica_id, replica in before.items():
        if replica_id not in now and "since" in replica:
            kind = str(replica.get("kind", "cpu-worker"))
            usage[kind] = usage.get(kind, 0.0) + max(0.0, at - float(replica["since"]))


def cost(state: Mapping[str, Any], prices: Mapping[str, float] | None = None,
         at: float | None = None) -> Cost:
    """The endpoint's worker-seconds, GPU-seconds and (with a price table) cost so far."""
    at = time.time() if at is None else at
    held = list(state.get("usage", {}).items())
    held += [(str(r.get("kind", "cpu-worker")), max(0.0, at - float(r["since"])))
             for v in state["versions"] for r in v["replicas"] if "since" in r]
    return held_cost(held, price_table() if prices is None else prices)
