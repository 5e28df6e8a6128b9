"""Unit tests of how :mod:`jupyter_mlcloud.server.feeds` folds a run's metric events: each event
taken once, in order, whether it came in the backlog or was pushed while the backlog loaded.

No scheduler: a fake asynchronous client stands in for ``distributed.Client``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from jupyter_mlcloud.server import feeds
from jupyter_mlcloud.server.feeds import _SchedulerFeed, _Watch
from jupyter_mlcloud.telemetry import events, fold


def pt(rank: int, step: int, **values: float) -> dict[str, Any]:
    return {"rank": rank, "step": step, "epoch": 0, "time": float(step), **values}


def ev(stamp: float, *items: Any) -> tuple[float, Any]:
    return (stamp, {"items": list(items)})


# ---------------------------------------------------------------- one run's watch


def test_a_watch_counts_every_rank_and_keeps_rank_0s_points() -> None:
    watch = _Watch(keep_points=True)
    watch.load([ev(1.0, pt(0, 1, loss=1.0), pt(1, 1, loss=2.0)),
                ev(2.0, pt(1, 2, loss=1.5), pt(0, 2, loss=0.5))])
    assert watch.count == 4
    assert watch.last == pt(0, 2, loss=0.5)
    assert list(watch.points or ()) == [pt(0, 1, loss=1.0), pt(0, 2, loss=0.5)]
    assert watch.newest == 2.0


def test_a_watch_for_a_run_list_keeps_no_points() -> None:
    watch = _Watch(keep_points=False)
    watch.load([ev(1.0, pt(0, 1), pt(0, 2))])
    assert watch.points is None and watch.count == 2 and watch.last == pt(0, 2)


def test_events_pushed_while_the_backlog_loads_are_taken_after_it_once() -> None:
    watch = _Watch(keep_points=True)
    # Pushed before the backlog came back: one the backlog also holds, and one newer.
    watch.receive(ev(2.0, pt(0, 2)))
    watch.receive(ev(3.0, pt(0, 3)))
    assert watch.count == 0 and watch.pending is not None  # held until the backlog is in
    watch.load([ev(1.0, pt(0, 1)), ev(2.0, pt(0, 2))])
    assert watch.pending is None
    assert [p["step"] for p in watch.points or ()] == [1, 2, 3]
    assert watch.count == 3
    watch.receive(ev(4.0, pt(0, 4)))  # from now on taken at once
    watch.receive(ev(4.0, pt(0, 4)))  # the same event again: dropped
    watch.receive(ev(3.5, pt(0, 99)))  # older than what it holds: dropped
    assert [p["step"] for p in watch.points or ()] == [1, 2, 3, 4]
    assert watch.count == 4 and watch.last == pt(0, 4)


def test_a_watch_skips_what_is_not_a_point() -> None:
    watch = _Watch(keep_points=True)
    watch.load([(1.0, "text"), ev(2.0, "a line", pt(0, 1), None), (3.0, {"other": 1})])
    assert watch.count == 1 and watch.last == pt(0, 1)


def test_a_watch_keeps_at_most_history_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fold, "HISTORY", 3)
    watch = _Watch(keep_points=True)
    watch.load([ev(float(s), pt(0, s), pt(1, s)) for s in range(1, 8)])
    assert [p["step"] for p in watch.points or ()] == [5, 6, 7]
    assert watch.count == 14  # counted all the same


def test_an_empty_backlog_then_pushes() -> None:
    watch = _Watch(keep_points=False)
    watch.load([])
    assert watch.count == 0 and watch.last is None
    watch.receive(ev(1.0, pt(0, 1)))
    assert watch.count == 1


# ---------------------------------------------------------------- one scheduler's feed


class FakeClient:
    """The parts of an asynchronous ``distributed.Client`` a feed uses. ``get_events`` hands
    the subscription ``pushed`` first (events that arrive while the backlog is read)."""

    def __init__(self, backlog: list[tuple[float, Any]],
                 pushed: list[tuple[float, Any]] | None = None, fail: bool = False) -> None:
        self.status = "running"
        self.backlog, self.pushed, self.fail = backlog, pushed or [], fail
        self.handlers: dict[str, Callable[[tuple[float, Any]], None]] = {}
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []
        self.reads = 0

    def subscribe_topic(self, topic: str, handler: Callable[[tuple[float, Any]], None]) -> None:
        self.subscribed.append(topic)
        self.handlers[topic] = handler

    def unsubscribe_topic(self, topic: str) -> None:
        self.unsubscribed.append(topic)
        self.handlers.pop(topic, None)

    async def get_events(self, topic: str) -> list[tuple[float, Any]]:
        self.reads += 1
        for event in self.pushed:
            self.handlers[topic](event)
        await asyncio.sleep(0)
        if self.fail:
            raise OSError("scheduler gone")
        return list(self.backlog)

    def push(self, topic: str, event: tuple[float, Any]) -> None:
        self.handlers[topic](event)


def test_a_feed_subscribes_once_and_merges_backlog_and_pushes() -> None:
    topic = events.metrics_topic("ab")
    client = FakeClient(backlog=[ev(1.0, pt(0, 1)), ev(2.0, pt(0, 2))],
                        pushed=[ev(2.0, pt(0, 2)), ev(3.0, pt(0, 3))])

    async def scenario() -> tuple[_Watch, _Watch]:
        feed = _SchedulerFeed("tcp://x:1", client)
        first = await feed.watch("ab", keep_points=True)
        client.push(topic, ev(4.0, pt(0, 4)))
        again = await feed.watch("ab", keep_points=False)  # a run list asks: same watch
        return first, again

    first, again = asyncio.run(scenario())
    assert again is first
    assert client.subscribed == [topic] and client.reads == 1
    assert [p["step"] for p in first.points or ()] == [1, 2, 3, 4]


def test_a_panel_after_a_run_list_reloads_with_points_without_subscribing_again() -> None:
    topic = events.metrics_topic("ab")
    client = FakeClient(backlog=[ev(1.0, pt(0, 1), pt(1, 1))])

    async def scenario() -> tuple[_Watch, _Watch]:
        feed = _SchedulerFeed("tcp://x:1", client)
        listed = await feed.watch("ab", keep_points=False)
        client.backlog.append(ev(2.0, pt(0, 2)))
        panel = await feed.watch("ab", keep_points=True)
        return listed, panel

    listed, panel = asyncio.run(scenario())
    assert listed.points is None
    assert [p["step"] for p in panel.points or ()] == [1, 2] and panel.count == 3
    assert client.subscribed == [topic] and client.reads == 2


def test_a_backlog_that_does_not_come_unsubscribes_and_says_so() -> None:
    client = FakeClient(backlog=[], fail=True)

    async def scenario() -> _SchedulerFeed:
        feed = _SchedulerFeed("tcp://x:1", client)
        with pytest.raises(feeds.SchedulerUnreachable,
                           match="the scheduler at tcp://x:1 did not send run ab's points"):
            await feed.watch("ab", keep_points=True)
        return feed

    feed = asyncio.run(scenario())
    assert feed.watches == {}
    assert client.unsubscribed == [events.metrics_topic("ab")]


def test_watches_nobody_asked_about_lately_are_let_go() -> None:
    client = FakeClient(backlog=[])

    async def scenario() -> _SchedulerFeed:
        feed = _SchedulerFeed("tcp://x:1", client)
        await feed.watch("aa", keep_points=False)
        await feed.watch("bb", keep_points=False)
        return feed

    feed = asyncio.run(scenario())
    now = time.monotonic()
    feed.watches["aa"].asked = now - feeds.IDLE_S - 1
    feed.sweep(now)
    assert list(feed.watches) == ["bb"]
    assert client.unsubscribed == [events.metrics_topic("aa")]


def test_a_feed_is_broken_once_its_client_is() -> None:
    client = FakeClient(backlog=[])
    feed = _SchedulerFeed("tcp://x:1", client)
    assert not feed.broken
    client.status = "connecting"
    assert not feed.broken
    client.status = "closed"
    assert feed.broken
