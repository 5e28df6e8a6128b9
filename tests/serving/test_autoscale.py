"""The autoscale rule alone: bounds, the up and down delays, one step down at a time."""

from __future__ import annotations

from typing import Any

import pytest

from jupyter_mlcloud.serving.autoscale import AutoscalePolicy, Autoscaler


def feed(scaler: Autoscaler, readings: list[tuple[float, float]], current: int
         ) -> list[int | None]:
    """Each (seconds, requests in flight during the second before) as the router reports it."""
    busy = 0.0
    decisions = []
    last_t = 0.0
    scaler.observe(0.0, 0.0, current)
    for t, in_flight in readings:
        busy += in_flight * (t - last_t)
        last_t = t
        decision = scaler.observe(t, busy, current)
        decisions.append(decision)
        if decision is not None:
            current = decision
    return decisions


def test_a_load_step_scales_up_after_the_up_delay_to_what_the_load_needs() -> None:
    scaler = Autoscaler(AutoscalePolicy(1, 4, target=4, up_delay_s=2, down_delay_s=30))
    # 4 in flight: one replica is enough; then 16 in flight wants 4.
    decisions = feed(scaler, [(1, 4), (2, 4), (3, 16), (4, 16), (5, 16)], current=1)
    assert decisions == [None, None, None, None, 4]


def test_a_one_tick_burst_starts_nothing() -> None:
    scaler = Autoscaler(AutoscalePolicy(1, 4, up_delay_s=2))
    assert feed(scaler, [(1, 40), (2, 1), (3, 1), (4, 1)], current=1) == [None] * 4


def test_scale_down_waits_the_delay_and_goes_one_replica_at_a_time() -> None:
    scaler = Autoscaler(AutoscalePolicy(1, 4, target=4, up_delay_s=2, down_delay_s=10))
    readings = [(float(t), 0.0) for t in range(1, 32)]
    decisions = feed(scaler, readings, current=3)
    steps = [(t, d) for (t, _), d in zip(readings, decisions, strict=True) if d is not None]
    assert steps == [(11.0, 2), (21.0, 1)]  # and never below the minimum


def test_the_bounds_are_applied_at_once() -> None:
    scaler = Autoscaler(AutoscalePolicy(2, 3))
    assert scaler.observe(0.0, 0.0, 1) == 2
    assert scaler.observe(0.0, 0.0, 5) == 3


def test_a_router_that_started_again_gives_no_average() -> None:
    scaler = Autoscaler(AutoscalePolicy(1, 4, up_delay_s=0))
    scaler.observe(0.0, 0.0, 1)
    assert scaler.observe(1.0, 100.0, 1) == 4
    assert scaler.observe(2.0, 0.5, 4) is None  # the integral went back: a new router


@pytest.mark.parametrize("bounds, options, message", [
    ("4", {}, "autoscale must look like 'MIN:MAX' (e.g. '1:4'), got '4'."),
    ("3:1", {}, "autoscale bounds must be MIN:MAX with 1 <= MIN <= MAX, got 3:1."),
    ("0:2", {}, "autoscale bounds must be MIN:MAX with 1 <= MIN <= MAX, got 0:2."),
    ([1, 2], {}, "autoscale must be 'MIN:MAX' or a (min, max) pair of integers, got [1, 2]."),
    ("1:2", {"target": 0}, "autoscale target must be a number > 0, got 0."),
    ("1:2", {"up_delay": 1}, "unknown autoscale option(s) up_delay; allowed: target,"
     " up_delay_s, down_delay_s."),
])
def test_bad_policies_are_refused_in_one_sentence(bounds: Any, options: dict[str, Any],
                                                  message: str) -> None:
    with pytest.raises(ValueError) as caught:
        AutoscalePolicy.parse(bounds, **options)
    assert str(caught.value) == message


def test_a_policy_parses_and_travels_as_a_dict() -> None:
    policy = AutoscalePolicy.parse(" 1 : 4 ", down_delay_s=5)
    assert (policy.min, policy.max, policy.down_delay_s) == (1, 4, 5)
    assert AutoscalePolicy(**policy.as_dict()) == policy
