"""How long one call takes, for the exported model beside the eager one: medians of short
bursts of calls that take turns, so a busy moment of the machine falls on every runtime
alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

#: Batch sizes the result reports.
BATCHES = (1, 64)


def medians(runners: Mapping[str, Callable[[Any], Any]], inputs: Mapping[int, Any],
            budget_s: float = 0.3, max_rounds: int = 100,
            burst: int = 3) -> dict[str, dict[int, float]]:
    """Median milliseconds of one call of each runner on each input (keyed by batch size).

    Rounds run until ``budget_s`` seconds have passed (at least 3, at most ``max_rounds``);
    in each, every runner gets every input ``burst`` + 1 times in a row, the first call
    untimed (it pays for the switch from the runner before: caches, lazy setup).
    """
    times: dict[str, dict[int, list[float]]] = {
        name: {batch: [] for batch in inputs} for name in runners}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 3 or (rounds < max_rounds and time.perf_counter() < deadline):
        for name, run in runners.items():
            for batch, x in inputs.items():
                run(x)
                for _ in range(burst):
                    start = time.perf_counter()
                    run(x)
                    times[name][batch].append(time.perf_counter() - start)
        rounds += 1
    return {name: {batch: statistics.median(t) * 1e3 for batch, t in table.items()}
            for name, table in times.items()}
