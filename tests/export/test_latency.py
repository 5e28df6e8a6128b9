"""Latency medians: every runner on every batch, in bursts that take turns."""

from __future__ import annotations

import time

from jupyter_mlcloud.export.latency import medians


def test_medians_per_runner_and_batch() -> None:
    calls: list[tuple[str, int]] = []

    def runner(name: str, seconds: float):  # type: ignore[no-untyped-def]
        def run(batch: int) -> None:
            calls.append((name, batch))
            time.sleep(seconds * batch)

        return run

    found = medians({"fast": runner("fast", 0.0001), "slow": runner("slow", 0.0005)},
                    {1: 1, 4: 4}, budget_s=0.05, max_rounds=20, burst=2)
    assert set(found) == {"fast", "slow"} and set(found["fast"]) == {1, 4}
    assert found["slow"][4] > found["fast"][4] > found["fast"][1] > 0
    # Each runner and batch in turn, 1 untimed call and a burst of 2 timed ones.
    expected = [(name, batch) for name in ("fast", "slow") for batch in (1, 4) for _ in range(3)]
    assert calls[:12] == expected
    rounds = len(calls) // 12
    assert len(calls) == rounds * 12 and 3 <= rounds <= 20
