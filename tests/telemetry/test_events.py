"""Unit tests of the metrics path's pure parts: topics, points, batching and unpacking.

No cluster: :class:`EventBatcher` is given a fake ``log_event`` that records its calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

from jupyter_mlcloud.telemetry import events
from jupyter_mlcloud.telemetry.events import EventBatcher, items_of, point, to_number


class Recorder:
    """A stand-in for ``Worker.log_event``: keeps each (topic, message) it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, msg: Any) -> None:
        with self.lock:
            self.calls.append((topic, msg))

    def events(self) -> list[tuple[float, Any]]:
        """The calls as the scheduler would hand them back: (stamp, message)."""
        with self.lock:
            return [(float(i), msg) for i, (_, msg) in enumerate(self.calls)]

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


def wait_until(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return bool(condition())


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def slow(recorder: Recorder) -> Iterator[EventBatcher]:
    """A batcher inside its interval for the whole test: only flush() and close() log.

    Its first item went out at once (as a sparse one does) and is forgotten here.
    """
    batcher = EventBatcher(recorder, "topic-a", interval=3600)
    batcher.add("primer")
    assert wait_until(lambda: recorder.count() == 1)
    recorder.calls.clear()
    yield batcher
    batcher.close()


# ---------------------------------------------------------------- topics


def test_topics_name_the_run() -> None:
    assert events.metrics_topic("ab12") == "mlcloud-metrics-ab12"
    assert events.logs_topic("ab12") == "mlcloud-logs-ab12"
    assert events.control_topic("ab12") == "mlcloud-control-ab12"
    assert events.RUNS_TOPIC == "mlcloud-runs"


def test_each_run_and_kind_has_its_own_topic() -> None:
    topics = {f(run) for run in ("a", "b", "a1")
              for f in (events.metrics_topic, events.logs_topic, events.control_topic)}
    assert len(topics) == 9
    assert events.RUNS_TOPIC not in topics


# ---------------------------------------------------------------- numbers and points


@pytest.mark.parametrize(("value", "expected"), [
    (3, 3.0),
    (-2.5, -2.5),
    (Fraction(1, 4), 0.25),
    (np.float32(0.5), 0.5),
    (np.int64(7), 7.0),
    (np.array([1.5]), 1.5),
    (torch.tensor(2.25), 2.25),
    (torch.tensor([0.125]), 0.125),
    (torch.tensor(3, dtype=torch.int32), 3.0),
])
def test_reported_values_become_floats(value: Any, expected: float) -> None:
    got = to_number("loss", value)
    assert type(got) is float and got == expected


def test_a_tensor_that_needs_grad_is_reported_by_value() -> None:
    w = torch.tensor(1.5, requires_grad=True)
    assert to_number("loss", w * 2) == 3.0


@pytest.mark.parametrize(("value", "kind"), [
    ("0.5", "str"), (None, "NoneType"), (True, "bool"), (np.bool_(False), "bool"),
    ([1.0], "list"), ({"a": 1}, "dict"),
])
def test_values_that_are_not_numbers_are_named(value: Any, kind: str) -> None:
    with pytest.raises(ValueError) as caught:
        to_number("acc", value)
    assert str(caught.value) == (
        f"ctx.report(acc=...) needs a number or a one-element tensor, got {kind}.")


@pytest.mark.parametrize("value", [torch.tensor([1.0, 2.0]), 1 + 2j])
def test_several_elements_or_a_complex_number_get_the_same_sentence(value: Any) -> None:
    with pytest.raises(ValueError, match=r"ctx.report\(loss=...\) needs a number"):
        to_number("loss", value)


def test_a_point_carries_rank_step_epoch_time_and_floats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events.time, "time", lambda: 1234.5)
    p = point(2, 17, 3, {"loss": torch.tensor(0.25), "lr": 1})
    assert p == {"rank": 2, "step": 17, "epoch": 3, "time": 1234.5, "loss": 0.25, "lr": 1.0}
    assert list(p) == ["rank", "step", "epoch", "time", "loss", "lr"]  # metrics in given order
    assert type(p["lr"]) is float


def test_a_point_may_have_no_epoch_and_no_metrics() -> None:
    before = time.time()
    p = point(0, 1, None, {})
    assert p["epoch"] is None and set(p) == {"rank", "step", "epoch", "time"}
    assert before <= p["time"] <= time.time()


def test_a_bad_value_in_a_point_names_its_metric() -> None:
    with pytest.raises(ValueError, match=r"ctx.report\(acc=...\)"):
        point(0, 1, 0, {"loss": 1.0, "acc": "high"})


# ---------------------------------------------------------------- unpacking events


def test_items_of_concatenates_in_event_order() -> None:
    events = [(1.0, {"items": [1, 2]}), (2.0, {"items": [3]}), (3.0, {"items": [4, 5, 6]})]
    assert items_of(events) == [1, 2, 3, 4, 5, 6]


def test_items_of_keeps_the_given_order_not_the_stamps() -> None:
    assert items_of([(5.0, {"items": ["b"]}), (1.0, {"items": ["a"]})]) == ["b", "a"]


def test_items_of_skips_what_a_batcher_did_not_log() -> None:
    events: list[tuple[float, Any]] = [
        (1.0, "a plain string"), (2.0, {"other": 1}), (3.0, None), (4.0, ["items"]),
        (5.0, {"items": []}), (6.0, {"items": [{"step": 1}]}), (7.0, {"items": ("x", "y")}),
    ]
    assert items_of(events) == [{"step": 1}, "x", "y"]


def test_items_of_nothing_is_empty() -> None:
    assert items_of([]) == []
    assert items_of(iter([])) == []


# ---------------------------------------------------------------- batching


def test_nothing_is_logged_before_a_flush_and_one_event_per_flush(
        recorder: Recorder, slow: EventBatcher) -> None:
    for i in range(250):
        slow.add(i)
    assert recorder.calls == []  # batched: not one event per item
    slow.flush()
    assert recorder.calls == [("topic-a", {"items": list(range(250))})]
    slow.flush()  # nothing new: no empty event
    slow.add("next")
    slow.flush()
    assert recorder.calls[1:] == [("topic-a", {"items": ["next"]})]


def test_close_flushes_what_is_left_and_stops_the_thread(
        recorder: Recorder, slow: EventBatcher) -> None:
    slow.add({"step": 1})
    slow.add({"step": 2})
    started = time.monotonic()
    slow.close()
    assert time.monotonic() - started < 1.0  # does not wait out the interval
    assert recorder.calls == [("topic-a", {"items": [{"step": 1}, {"step": 2}]})]
    assert not slow._thread.is_alive()
    slow.close()  # twice is harmless and logs nothing more
    assert len(recorder.calls) == 1


def test_close_with_nothing_left_logs_nothing(recorder: Recorder) -> None:
    batcher = EventBatcher(recorder, "t", interval=3600)
    batcher.close()
    assert recorder.calls == []


def test_a_sparse_item_goes_out_at_once(recorder: Recorder) -> None:
    """The first item, and one after a quiet interval, wait for no timer: a point per epoch
    (what a pruner judges) reaches the kernel without delay."""
    batcher = EventBatcher(recorder, "t", interval=0.05)
    try:
        started = time.monotonic()
        batcher.add("a")
        assert wait_until(lambda: recorder.count() == 1, timeout=2.0)
        assert recorder.calls[0] == ("t", {"items": ["a"]})
        assert wait_until(lambda: time.monotonic() - started > 0.1)  # a quiet interval
        batcher.add("b")
        assert wait_until(lambda: recorder.count() == 2, timeout=2.0)
        assert recorder.calls[1] == ("t", {"items": ["b"]})
    finally:
        batcher.close()


def test_a_dense_burst_goes_out_together_after_the_interval(recorder: Recorder) -> None:
    batcher = EventBatcher(recorder, "timed", interval=1.0)
    try:
        batcher.add("first")
        assert wait_until(lambda: recorder.count() == 1, timeout=2.0)
        sent = time.monotonic()
        for i in range(100):
            batcher.add(i)
        assert recorder.count() == 1  # inside the interval: held back
        assert wait_until(lambda: recorder.count() == 2, timeout=5.0)
        assert time.monotonic() - sent > 0.5
        assert recorder.calls[1] == ("timed", {"items": list(range(100))})
    finally:
        batcher.close()
    assert len(recorder.calls) == 2  # no empty events


def test_the_interval_can_be_changed_while_it_runs(recorder: Recorder) -> None:
    batcher = EventBatcher(recorder, "t", interval=3600)
    try:
        batcher.interval = 0.01  # what tune does while a pruner watches a trial
        batcher.add("a")
        assert wait_until(lambda: recorder.count() == 1, timeout=2.0)
        batcher.add("b")  # within the old interval, long past the new one
        batcher.add("c")
        assert wait_until(lambda: len(items_of(recorder.events())) == 3, timeout=5.0)
        assert items_of(recorder.events()) == ["a", "b", "c"]
    finally:
        batcher.close()


def test_the_flush_thread_is_a_named_daemon(recorder: Recorder) -> None:
    batcher = EventBatcher(recorder, "mlcloud-metrics-ab", interval=3600)
    try:
        assert batcher._thread.daemon and batcher._thread.is_alive()
        assert batcher._thread.name == "flush-mlcloud-metrics-ab"
    finally:
        batcher.close()


def test_items_are_logged_as_given_not_copied(recorder: Recorder, slow: EventBatcher) -> None:
    item = {"step": 1}
    slow.add(item)
    slow.flush()
    assert recorder.calls[0][1]["items"][0] is item


def test_many_threads_adding_lose_and_duplicate_nothing(recorder: Recorder) -> None:
    producers, per_producer = 4, 2000
    batcher = EventBatcher(recorder, "busy", interval=0.001)

    def produce(who: int) -> None:
        for i in range(per_producer):
            batcher.add((who, i))
            if i % 200 == 0:
                time.sleep(0.001)  # let the timer flush between adds

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    got = items_of(recorder.events())
    assert len(got) == producers * per_producer
    assert len(set(got)) == len(got)
    for who in range(producers):  # each producer's items in the order it added them
        assert [i for w, i in got if w == who] == list(range(per_producer))
    assert recorder.count() > 1  # the timer did flush while they added
    assert all(topic == "busy" and msg["items"] for topic, msg in recorder.calls)


def test_a_round_trip_through_items_of(recorder: Recorder, slow: EventBatcher) -> None:
    sent = [point(r, s, 0, {"loss": 1.0 / (s + 1)}) for s in range(5) for r in range(2)]
    for i, p in enumerate(sent):
        slow.add(p)
        if i % 3 == 2:
            slow.flush()
    slow.close()
    assert items_of(recorder.events()) == sent


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_flushing_goes_on_after_a_failed_log_event() -> None:
    calls: list[Any] = []

    def flaky(topic: str, msg: Any) -> None:
        calls.append(msg)
        if len(calls) == 1:
            raise OSError("connection reset")

    batcher = EventBatcher(flaky, "t", interval=0.02)
    try:
        batcher.add("first")
        assert wait_until(lambda: len(calls) >= 1, timeout=2.0)
        batcher.add("second")
        assert wait_until(lambda: len(calls) >= 2, timeout=1.0), "no flush after the failure"
        assert calls[1] == {"items": ["second"]}
    finally:
        batcher.close()
