"""When an endpoint with ``autoscale="MIN:MAX"`` should have more or fewer replicas.

The signal is the router's requests in flight, averaged over time (the integral the router
keeps, read once per controller tick), divided by ``target`` requests in flight per replica:
``wanted = ceil(average / target)``, kept within ``MIN:MAX``. Defaults:

- ``target`` = 4 requests in flight per replica (a batching replica is busy, not queueing);
- ``up_delay_s`` = 2: the load must want more replicas for 2 s before they start (a burst
  of one tick starts nothing); all the replicas wanted start at once;
- ``down_delay_s`` = 30: the load must want fewer for 30 s, then one replica goes (drained
  first, so no request is lost), and the next after another 30 s.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

BOUNDS = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class AutoscalePolicy:
    """Replicas between ``min`` and ``max``, ``target`` requests in flight per replica, and
    the delays (seconds) before scaling up and down."""

    min: int
    max: int
    target: float = 4.0
    up_delay_s: float = 2.0
    down_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.max):
            raise ValueError(f"autoscale bounds must be MIN:MAX with 1 <= MIN <= MAX, got"
                             f" {self.min}:{self.max}.")
        for name in ("target", "up_delay_s", "down_delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    name == "target" and value == 0):
                raise ValueError(f"autoscale {name} must be a number"
                                 f" {'> 0' if name == 'target' else '>= 0'}, got {value!r}.")

    @classmethod
    def parse(cls, bounds: str | tuple[int, int], **options: float) -> AutoscalePolicy:
        """From ``"MIN:MAX"`` (or a pair) and keyword options; one sentence if malformed."""
        if isinstance(bounds, str):
            match = BOUNDS.match(bounds)
            if not match:
                raise ValueError(f"autoscale must look like 'MIN:MAX' (e.g. '1:4'), got"
                                 f" {bounds!r}.")
            low, high = int(match[1]), int(match[2])
        elif (isinstance(bounds, tuple) and len(bounds) == 2
              and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)):
            low, high = bounds
        else:
            raise ValueError(f"autoscale must be 'MIN:MAX' or a (min, max) pair of integers,"
                             f" got {bounds!r}.")
        unknown = set(options) - {"target", "up_delay_s", "down_delay_s"}
        if unknown:
            raise ValueError(f"unknown autoscale option(s) {', '.join(sorted(unknown))};"
                             " allowed: target, up_delay_s, down_delay_s.")
        return cls(low, high, **options)

    def as_dict(self) -> dict[str, Any]:
        """As kept in the endpoint's state."""
        return asdict(self)


class Autoscaler:
    """Decides, tick by tick, how many replicas one endpoint should run under ``policy``."""

    def __init__(self, policy: AutoscalePolicy) -> None:
        self.policy = policy
        self._last: tuple[float, float] | None = None  # (time, busy_s) at the last reading
        self._since: dict[str, float] = {}  # "up"/"down": since when the load wants that
        self.average = 0.0  # requests in flight over the last tick

    def observe(self, now: float, busy_s: float, current: int) -> int | None:
        """With the router's ``busy_s`` integral at ``now`` and ``current`` replicas: the
        number to run now, or None to leave it."""
        p = self.policy
        if current < p.min or current > p.max:
            return min(max(current, p.min), p.max)
        last, self._last = self._last, (now, busy_s)
        if last is None or now <= last[0] or busy_s < last[1]:
            return None  # the first reading, or a router that started again: no average yet
        self.average = (busy_s - last[1]) / (now - last[0])
        wanted = min(max(math.ceil(self.average / p.target - 1e-9), p.min), p.max)
        direction = "up" if wanted > current else "down" if wanted < current else None
        for d in ("up", "down"):
            if d != direction:
                self._since.pop(d, None)
        if direction is None:
            return None
        since = self._since.setdefault(direction, now)
        if direction == "up" and now - since >= p.up_delay_s:
            self._since.pop("up")
            return wanted
        if direction == "down" and now - since >= p.down_delay_s:
            self._since["down"] = now  # the next step down waits a whole delay again
            return current - 1
        return None
