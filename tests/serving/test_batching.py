"""The dynamic batcher on a real event loop with a real compute thread: idle requests never
wait, busy-time requests share batches, the queue and the SLO bound what is accepted, and
each answer's timings say where its time went. Gates (threading.Event) hold the model so
every scenario is deterministic."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from jupyter_mlcloud.serving.batching import (
    Batcher,
    BatchOptions,
    Closed,
    Overloaded,
    Timings,
)


class Model:
    """Doubles its rows; waits for ``gate`` when one is set; records batch sizes."""

    def __init__(self, gate: threading.Event | None = None, delay_s: float = 0.0) -> None:
        self.gate, self.delay_s = gate, delay_s
        self.batches: list[int] = []
        self.fail = False

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.batches.append(len(rows))
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("the model broke")
        return rows * 2


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 60))


async def until(condition: Callable[[], object], what: str) -> None:
    """Yield to the loop until ``condition`` holds (bounded)."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"never happened: {what}")


def rows(n: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(n * 3, dtype=np.float32) + start).reshape(n, 3)


def test_a_request_at_an_idle_replica_is_computed_at_once() -> None:
    async def scenario() -> tuple[np.ndarray, Timings]:
        batcher = Batcher(Model(), BatchOptions(max_batch_size=8, max_wait_ms=2000))
        batcher.start()
        try:
            return await batcher.submit(rows(2))
        finally:
            await batcher.close()

    out, timings = run(scenario)
    np.testing.assert_array_equal(out, rows(2) * 2)
    # It waited for no batch (max_wait_ms is 2 s) and behind nothing.
    assert timings.batch_wait_s < 0.05 and timings.queue_s < 0.05
    assert (timings.batch_size, timings.batch_requests) == (2, 1)


def test_requests_arriving_while_busy_are_batched_up_to_max_batch_size() -> None:
    gate = threading.Event()
    model = Model(gate)
    seen: list[int] = []

    async def scenario() -> list[tuple[np.ndarray, Timings]]:
        batcher = Batcher(model, BatchOptions(max_batch_size=4, max_wait_ms=0),
                          on_batch=seen.append)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(rows(1)))
            await until(lambda: batcher.busy, "the first request computing")
            rest = [asyncio.ensure_future(batcher.submit(rows(1, 100.0 * i)))
                    for i in range(1, 7)]
            await until(lambda: batcher.queued == 6, "six requests queued")
            gate.set()
            return list(await asyncio.gather(first, *rest))
        finally:
            gate.set()
            await batcher.close()

    answers = run(scenario)
    assert model.batches == [1, 4, 2] and seen == [1, 4, 2]
    for i, (out, _) in enumerate(answers):
        np.testing.assert_array_equal(out, rows(1, 100.0 * i) * 2)  # each gets its own rows
    assert [t.batch_size for _, t in answers] == [1, 4, 4, 4, 4, 2, 2]
    assert [t.batch_requests for _, t in answers] == [1, 4, 4, 4, 4, 2, 2]
    # The queued ones waited behind the first batch, not for their batch to fill.
    assert all(t.queue_s > 0 and t.batch_wait_s < 0.05 for _, t in answers[1:])


def test_a_busy_time_request_waits_for_its_batch_to_fill_while_requests_come() -> None:
    gate = threading.Event()
    model = Model(gate)

    async def scenario() -> list[tuple[np.ndarray, Timings]]:
        batcher = Batcher(model, BatchOptions(max_batch_size=2, max_wait_ms=20_000))
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(rows(1)))
            await until(lambda: batcher.busy, "the first request computing")
            # Arrivals 1 s apart: the batch may wait 2 s (QUIET_GAPS) after the last one.
            await asyncio.sleep(1.0)
            second = asyncio.ensure_future(batcher.submit(rows(1, 10.0)))
            await until(lambda: batcher.queued == 1, "the second request queued")
            gate.set()
            await first
            await until(lambda: not batcher.busy, "the model free")
            assert not second.done()  # waiting for its batch to fill, not computed alone
            third = asyncio.ensure_future(batcher.submit(rows(1, 20.0)))
            return list(await asyncio.gather(second, third))
        finally:
            gate.set()
            await batcher.close()

    (out2, t2), (out3, t3) = run(scenario)
    assert model.batches == [1, 2]  # the full batch went at once, long before max_wait_ms
    np.testing.assert_array_equal(out2, rows(1, 10.0) * 2)
    np.testing.assert_array_equal(out3, rows(1, 20.0) * 2)
    assert t2.batch_wait_s > 0 and t2.batch_size == 2 and t3.batch_requests == 2


def test_a_batch_stops_waiting_to_fill_once_requests_stop_coming() -> None:
    """Three clients and room for 32 rows: the batch would never fill, so it goes as soon as
    arrivals pause, not after max_wait_ms (20 s here)."""
    gate = threading.Event()
    model = Model(gate)

    async def scenario() -> list[tuple[np.ndarray, Timings]]:
        batcher = Batcher(model, BatchOptions(max_batch_size=32, max_wait_ms=20_000))
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(rows(1)))
            await until(lambda: batcher.busy, "the first request computing")
            rest = [asyncio.ensure_future(batcher.submit(rows(1, 10.0 * i)))
                    for i in range(1, 4)]
            await until(lambda: batcher.queued == 3, "three requests queued")
            gate.set()
            return list(await asyncio.wait_for(asyncio.gather(first, *rest), 10))
        finally:
            gate.set()
            await batcher.close()

    answers = run(scenario)
    assert model.batches == [1, 3]
    assert all(t.batch_wait_s < 10 for _, t in answers)


def test_past_max_queue_requests_are_refused_with_a_retry_after() -> None:
    gate = threading.Event()

    async def scenario() -> Overloaded:
        batcher = Batcher(Model(gate), BatchOptions(max_batch_size=1, max_queue=2))
        batcher.start()
        try:
            held = [asyncio.ensure_future(batcher.submit(rows(1)))]
            await until(lambda: batcher.busy, "computing")
            held += [asyncio.ensure_future(batcher.submit(rows(1))) for _ in range(2)]
            await until(lambda: batcher.queued == 2, "two queued")
            with pytest.raises(Overloaded) as refused:
                await batcher.submit(rows(1))
            gate.set()
            results = await asyncio.gather(*held)
            assert len(results) == 3  # the accepted ones are all answered
            await batcher.submit(rows(1))  # and the queue takes requests again
            return refused.value
        finally:
            gate.set()
            await batcher.close()

    refused = run(scenario)
    assert "queue is full (2 requests waiting)" in str(refused)
    assert isinstance(refused.retry_after, int) and refused.retry_after >= 1


def test_a_request_whose_estimated_wait_exceeds_the_slo_is_refused() -> None:
    gate = threading.Event()
    model = Model(delay_s=0.05)  # every batch takes at least 50 ms

    async def scenario() -> Overloaded:
        batcher = Batcher(model, BatchOptions(max_batch_size=1, slo_ms=10))
        batcher.start()
        try:
            await batcher.submit(rows(1))  # idle: never refused; measures a batch's time
            assert batcher.mean_batch_s is not None and batcher.mean_batch_s >= 0.05
            model.gate = gate
            held = asyncio.ensure_future(batcher.submit(rows(1)))
            await until(lambda: batcher.busy, "computing")
            with pytest.raises(Overloaded) as refused:
                await batcher.submit(rows(1))  # would wait >= 50 ms behind the busy model
            gate.set()
            await held
            return refused.value
        finally:
            gate.set()
            await batcher.close()

    refused = run(scenario)
    assert "exceeds the replica's slo_ms (10 ms)" in str(refused)
    assert refused.retry_after >= 1


def test_a_failing_batch_fails_each_of_its_requests_and_the_next_batch_runs() -> None:
    gate = threading.Event()
    model = Model(gate)

    async def scenario() -> list[Any]:
        batcher = Batcher(model, BatchOptions(max_batch_size=4, max_wait_ms=0))
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(rows(1)))
            await until(lambda: batcher.busy, "computing")
            model.fail = True
            failing = [asyncio.ensure_future(batcher.submit(rows(1))) for _ in range(2)]
            await until(lambda: batcher.queued == 2, "two queued")
            gate.set()
            results = await asyncio.gather(first, *failing, return_exceptions=True)
            model.fail = False
            results.append(await batcher.submit(rows(1)))
            return results
        finally:
            gate.set()
            await batcher.close()

    results = run(scenario)
    assert isinstance(results[0], RuntimeError)  # the flag was set while it computed
    assert all(isinstance(r, RuntimeError) and str(r) == "the model broke" for r in results[1:3])
    np.testing.assert_array_equal(results[3][0], rows(1) * 2)


def test_closing_fails_waiting_requests_and_refuses_new_ones() -> None:
    gate = threading.Event()

    async def scenario() -> list[Any]:
        batcher = Batcher(Model(gate), BatchOptions(max_batch_size=1))
        batcher.start()
        try:
            held = [asyncio.ensure_future(batcher.submit(rows(1))) for _ in range(3)]
            await until(lambda: batcher.queued == 2, "two queued")
            await batcher.close()
            results = await asyncio.gather(*held, return_exceptions=True)
            with pytest.raises(Closed):
                await batcher.submit(rows(1))
            return results
        finally:
            gate.set()

    results = run(scenario)
    assert all(isinstance(r, Closed) for r in results)


@pytest.mark.parametrize(("options", "message"), [
    ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
    ({"max_queue": 0}, "max_queue must be an integer >= 1, got 0"),
    ({"max_wait_ms": -1}, "max_wait_ms must be a number >= 0, got -1"),
    ({"slo_ms": 0}, "slo_ms must be a number > 0 or None, got 0"),
])
def test_bad_options_are_refused_in_one_sentence(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchOptions(**options)
