"""Latency medians: every runner on every batch, warmed up, taking turns."""

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
                    {1: 1, 4: 4}, budget_s=0.05, max_rounds=50)
    assert set(found) == {"fast", "slow"} and set(found["fast"]) == {1, 4}
    assert found["slow"][4] > found["fast"][4] > found["fast"][1] > 0
    # Warm-up first, then rounds in which the runners take turns.
    assert calls[:4] == [("fast", 1), ("fast", 4), ("slow", 1), ("slow", 4)]
    assert calls[4:8] == calls[:4]
    assert 5 <= len(calls) // 4 - 1 <= 50
