"""What work costs: worker-seconds, GPU-seconds, a price table and budgets.

A run (or a scoring job) is a sequence of *spans*: stretches of wall time during which a set of
workers was held. Each worker held for ``s`` seconds adds ``s`` worker-seconds, and ``s``
GPU-seconds when it is a GPU worker (Dask-CUDA runs one worker per GPU). With a price table
(the Dask config ``mlcloud.cost.prices``, a price per hour by worker kind or GPU kind, e.g.
``{"cpu-worker": 0.05, "a100": 3.0}``) the same seconds also make a ``cost``.

A worker's kind comes from the cluster's own description of it (the scheduler's ``identity``):
a worker that reports a GPU is that GPU's name (``NVIDIA A100-SXM4-80GB``), matched against the
table's keys case-insensitively, whole or as a part (``a100``); any other worker is
``cpu-worker``, or what the config ``mlcloud.cost.cpu-kind`` says.

A budget is either a cost (a number, which needs a price table) or worker time given as
``"2h"``, ``"30m"`` or ``"90s"`` (worker-hours, -minutes, -seconds).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CPU_KIND = "cpu-worker"
GPU_KIND = "gpu"  # a GPU worker whose GPU has no name
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)\s*$", re.IGNORECASE)
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0}
BUDGET_FORMS = ("a cost (a number > 0, priced by mlcloud.cost.prices)",
                "worker time as '2h', '30m' or '90s'")


class BudgetReached(RuntimeError):
    """A job stopped because it reached its budget; the message says how far it got."""


@dataclass(frozen=True)
class Cost:
    """What a run, trial or scoring job has used so far: worker-seconds, GPU-seconds and, with
    a price table, its cost (None without one)."""

    worker_seconds: float = 0.0
    gpu_seconds: float = 0.0
    cost: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The figures as MLflow metrics (``cost`` only when priced)."""
        out = {"worker_seconds": self.worker_seconds, "gpu_seconds": self.gpu_seconds}
        if self.cost is not None:
            out["cost"] = self.cost
        return out

    def __add__(self, other: Cost) -> Cost:
        cost = None if self.cost is None and other.cost is None else \
            (self.cost or 0.0) + (other.cost or 0.0)
        return Cost(self.worker_seconds + other.worker_seconds,
                    self.gpu_seconds + other.gpu_seconds, cost)

    def describe(self) -> str:
        """One short line for a progress display: ``12.3 worker-s · 0 GPU-s · cost 0.0017``."""
        text = f"{self.worker_seconds:.1f} worker-s"
        if self.gpu_seconds:
            text += f" · {self.gpu_seconds:.1f} GPU-s"
        if self.cost is not None:
            text += f" · cost {self.cost:.4g}"
        return text


@dataclass(frozen=True)
class Budget:
    """A hard stop: ``amount`` of ``kind`` (``"cost"`` or ``"worker_seconds"``)."""

    kind: str
    amount: float
    text: str  # as the user gave it

    def spent(self, cost: Cost) -> float | None:
        """How much of the budget ``cost`` uses (None: it cannot be told, no prices)."""
        return cost.worker_seconds if self.kind == "worker_seconds" else cost.cost

    def reached(self, cost: Cost) -> bool:
        spent = self.spent(cost)
        return spent is not None and spent >= self.amount

    def describe(self) -> str:
        if self.kind == "cost":
            return f"a cost of {self.amount:g}"
        return f"{self.text.strip()} of worker time ({self.amount:g} worker-seconds)"


def parse_budget(value: Any, prices: Mapping[str, float] | None = None) -> Budget | None:
    """``value`` as a :class:`Budget` (None stays None); refused in one sentence otherwise.

    A number is a cost and needs a price table (``prices``, default the Dask config)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"budget={value!r} must be more than 0; allowed: "
                             f"{' or '.join(BUDGET_FORMS)}.")
        if not (price_table() if prices is None else prices):
            raise ValueError(
                f"budget={value!r} is a cost, but the Dask config mlcloud.cost.prices holds no"
                " price table; set one (e.g. {'cpu-worker': 0.05}) or give worker time such as"
                " '2h', '30m' or '90s'.")
        return Budget("cost", float(value), str(value))
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match and float(match.group(1)) > 0:
            seconds = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
            return Budget("worker_seconds", seconds, value)
    raise ValueError(f"budget={value!r} is not understood; allowed: {' or '.join(BUDGET_FORMS)}.")


def price_table() -> dict[str, float]:
    """The Dask config ``mlcloud.cost.prices`` (price per hour by kind; {} when unset),
    refused in one sentence if a price is not a number >= 0."""
    import dask

    raw = dask.config.get("mlcloud.cost.prices", None) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"mlcloud.cost.prices must map worker or GPU kinds to prices per hour,"
                         f" e.g. {{'cpu-worker': 0.05, 'a100': 3.0}}; got {raw!r}.")
    table: dict[str, float] = {}
    for kind, price in raw.items():
        if isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0:
            raise ValueError(f"mlcloud.cost.prices[{kind!r}] must be a price per hour >= 0,"
                             f" got {price!r}.")
        table[str(kind)] = float(price)
    return table


def cpu_kind() -> str:
    import dask

    return str(dask.config.get("mlcloud.cost.cpu-kind", None) or CPU_KIND)


def gpu_name(info: Mapping[str, Any]) -> str | None:
    """The GPU a worker reports (its name, or ``gpu`` if unnamed); None for a CPU worker."""
    gpu = info.get("gpu")
    if isinstance(gpu, Mapping) and gpu.get("name"):
        return str(gpu["name"])
    if gpu or (info.get("metrics") or {}).get("gpu"):
        return GPU_KIND
    return None


def worker_kind(info: Mapping[str, Any]) -> str:
    """The kind of the worker described by ``info`` (one entry of the scheduler's identity)."""
    return gpu_name(info) or cpu_kind()


def price_of(kind: str, prices: Mapping[str, float]) -> float | None:
    """The hourly price of ``kind``: its key, else a key that is part of it (``a100`` in
    ``NVIDIA A100-SXM4-80GB``), case-insensitively; None if the table has none."""
    lowered = {k.lower(): v for k, v in prices.items()}
    if kind.lower() in lowered:
        return lowered[kind.lower()]
    parts = [k for k in lowered if k and k in kind.lower()]
    return lowered[max(parts, key=len)] if parts else None


def held_cost(held: Iterable[tuple[str, float]], prices: Mapping[str, float]) -> Cost:
    """What workers cost, given as (kind, seconds held) pairs, priced by ``prices`` (None
    without a price table)."""
    worker_s = gpu_s = priced = 0.0
    for kind, seconds in held:
        worker_s += seconds
        if kind not in (cpu_kind(), CPU_KIND):
            gpu_s += seconds
        priced += seconds * (price_of(kind, prices) or 0.0) / 3600.0 if prices else 0.0
    return Cost(worker_s, gpu_s, priced if prices else None)


class Meter:
    """Spans of held workers, measured live; thread-safe. ``open`` a span when a set of workers
    starts working, ``close`` it when they stop; ``cost()`` adds the open span up to now."""

    def __init__(self, prices: Mapping[str, float] | None = None) -> None:
        self.prices = dict(price_table() if prices is None else prices)
        self._lock = threading.Lock()
        self._closed = Cost(0.0, 0.0, 0.0 if self.prices else None)
        self._open: tuple[float, list[str]] | None = None  # (start, kinds)
        self.unpriced: set[str] = set()

    def kinds_of(self, workers: list[str], info: Mapping[str, Any]) -> list[str]:
        return [worker_kind(info.get(w) or {}) for w in workers]

    def open(self, kinds: list[str], at: float | None = None) -> None:
        """Start a span of workers of these kinds (closing one still open)."""
        at = time.time() if at is None else at
        with self._lock:
            self._close(at)
            self._open = (at, list(kinds))
            if self.prices:
                self.unpriced |= {k for k in kinds if price_of(k, self.prices) is None}

    def close(self, at: float | None = None) -> None:
        with self._lock:
            self._close(time.time() if at is None else at)

    def _close(self, at: float) -> None:
        if self._open is not None:
            self._closed = self._closed + self._span(self._open, at)
            self._open = None

    def _span(self, span: tuple[float, list[str]], until: float) -> Cost:
        start, kinds = span
        seconds = max(0.0, until - start)
        return held_cost([(k, seconds) for k in kinds], self.prices)

    def cost(self) -> Cost:
        with self._lock:
            if self._open is None:
                return self._closed
            return self._closed + self._span(self._open, time.time())


def meter_for(client: Any, workers: list[str], prices: Mapping[str, float] | None = None,
              ) -> Meter:
    """A meter with a span open now over ``workers`` of ``client``'s cluster."""
    from .cluster import info as cluster_info

    meter = Meter(prices)
    try:
        info = cluster_info.workers(client)
    except Exception:
        info = {}
    meter.open(meter.kinds_of(workers, info))
    return meter
