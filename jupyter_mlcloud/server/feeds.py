"""Live points of training runs for the Jupyter server, kept current by subscriptions.

Reading a run's whole metrics topic costs its scheduler time in proportion to the run's length
(about a millisecond per thousand points, on every refresh of every panel); a subscription
costs it one message per flush of each rank. So the server holds one asynchronous
``distributed.Client`` per scheduler it is asked about, subscribes to the topics of the runs
that panels and run lists look at, and lets them go when nobody has asked for a while.

Everything here runs on the Jupyter server's event loop; nothing blocks it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..cluster import discovery
from ..cluster import info as cluster_info
from ..telemetry import events, fold

IDLE_S = 60.0  # a run nobody asked about for this long is unsubscribed; a client, closed
QUIET_S = 1.0  # with no event for this long, check that the scheduler still answers
TIMEOUT_S = 2.0  # for connecting, reading a backlog and each liveness check


class RunGone(LookupError):
    """The run is on no discovered cluster (any more)."""


class SchedulerUnreachable(ConnectionError):
    """The scheduler that holds the run does not answer (now)."""


class _Watch:
    """What the server knows of one run: how many points, the last one, and (for panels)
    rank 0's recent points. Events are taken once each, in the scheduler's order."""

    def __init__(self, keep_points: bool) -> None:
        self.count = 0
        self.last: dict[str, Any] | None = None
        self.points: deque[dict[str, Any]] | None = (
            deque(maxlen=fold.HISTORY) if keep_points else None)
        self.newest = -math.inf  # scheduler time stamp of the newest event taken in
        self.pending: list[tuple[float, Any]] | None = []  # pushed while the backlog loads
        self.asked = time.monotonic()

    def receive(self, event: tuple[float, Any]) -> None:
        if self.pending is not None:
            self.pending.append(event)
        else:
            self._take(event)

    def load(self, backlog: list[tuple[float, Any]]) -> None:
        """Take the topic's backlog, then what was pushed meanwhile (duplicates dropped)."""
        for event in backlog:
            self._take(event)
        pushed, self.pending = self.pending or [], None
        for event in pushed:
            self._take(event)

    def _take(self, event: tuple[float, Any]) -> None:
        if event[0] <= self.newest:
            return  # already in the backlog
        self.newest = event[0]
        for item in events.items_of([event]):
            if not isinstance(item, dict):
                continue
            self.count += 1
            self.last = item
            if self.points is not None and item.get("rank") == 0:
                self.points.append(item)


class _SchedulerFeed:
    """One client on one scheduler, and the runs watched through it."""

    def __init__(self, address: str, client: Any) -> None:
        self.address = address
        self.client = client
        self.watches: dict[str, _Watch] = {}
        self.heard = time.monotonic()
        self.used = time.monotonic()
        self._probe = asyncio.Lock()
        self._loading = asyncio.Lock()

    @property
    def broken(self) -> bool:
        """The client lost its scheduler (and with it, perhaps, its subscriptions)."""
        return self.client.status not in ("running", "connecting")

    def _on_event(self, run_id: str, event: tuple[float, Any]) -> None:
        self.heard = time.monotonic()
        watch = self.watches.get(run_id)
        if watch is not None:
            watch.receive(event)

    async def watch(self, run_id: str, keep_points: bool) -> _Watch:
        """The run's watch, subscribing and loading the backlog the first time it is asked."""
        self.used = time.monotonic()
        async with self._loading:  # one backlog read at a time; later askers reuse it
            watch = self.watches.get(run_id)
            if watch is not None and (watch.points is not None or not keep_points):
                watch.asked = time.monotonic()
                return watch
            topic = events.metrics_topic(run_id)
            fresh = _Watch(keep_points)
            if watch is None:
                self.client.subscribe_topic(topic, lambda ev: self._on_event(run_id, ev))
            self.watches[run_id] = fresh
            try:
                backlog = await asyncio.wait_for(self.client.get_events(topic), TIMEOUT_S)
            except Exception:
                self.watches.pop(run_id, None)
                self._unsubscribe(topic)
                raise SchedulerUnreachable(
                    f"the scheduler at {self.address} did not send run {run_id}'s points;"
                    " retrying.") from None
            self.heard = time.monotonic()
            fresh.load(list(backlog))
            return fresh

    async def alive(self) -> bool:
        """True when the scheduler was heard from lately or answers a short question now."""
        if self.client.status != "running":
            return False
        if time.monotonic() - self.heard < QUIET_S:
            return True
        async with self._probe:
            if time.monotonic() - self.heard < QUIET_S:
                return True
            try:
                await asyncio.wait_for(self.client.scheduler.identity(), TIMEOUT_S)
            except Exception:
                return False
            self.heard = time.monotonic()
            return True

    def sweep(self, now: float) -> None:
        for run_id, watch in list(self.watches.items()):
            if now - watch.asked > IDLE_S:
                del self.watches[run_id]
                self._unsubscribe(events.metrics_topic(run_id))

    def _unsubscribe(self, topic: str) -> None:
        try:
            self.client.unsubscribe_topic(topic)
        except Exception:
            pass

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.close(), TIMEOUT_S)
        except Exception:
            pass


class Feeds:
    """The server's view of every run on every discovered cluster (see the module doc).

    ``points(run)`` serves the loss panels, ``list_runs()`` the sidebar's run list. Both raise
    nothing unexpected: an unknown run is :class:`RunGone`, a silent scheduler
    :class:`SchedulerUnreachable`, each with one sentence for the user.
    """

    def __init__(self, *, connect: Callable[[str], Any] | None = None) -> None:
        self._feeds: dict[str, _SchedulerFeed] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._homes: dict[str, tuple[str, str]] = {}  # run id -> (cluster name, address)
        # run id -> cluster name, for runs whose cluster was shut down: every later ask (the
        # panel's poll, the sidebar's list) hears why, not just the first.
        self._gone: dict[str, str] = {}
        self._listed: dict[tuple[str, str], list[dict[str, Any]]] = {}  # last run lists
        self._connect = connect or _connect

    async def _feed(self, address: str) -> _SchedulerFeed:
        self._sweep()
        lock = self._connecting.setdefault(address, asyncio.Lock())
        async with lock:
            feed = self._feeds.get(address)
            if feed is not None and feed.broken:
                del self._feeds[address]
                await feed.close()
                feed = None
            if feed is None:
                try:
                    client = await self._connect(address)
                except Exception:
                    raise SchedulerUnreachable(
                        f"the scheduler at {address} is unreachable; retrying.") from None
                feed = self._feeds[address] = _SchedulerFeed(address, client)
            return feed

    async def locate(self, run_id: str) -> discovery.ClusterRecord:
        """The discovered cluster that ran ``run_id``."""
        home = self._homes.get(run_id)
        if home is not None:
            name, address = home
            record = discovery.get(name)
            if record is not None and record.address == address:
                return record
            del self._homes[run_id]
            self._gone[run_id] = name
        if run_id in self._gone:
            raise RunGone(f"no run {run_id!r} any more: its cluster {self._gone[run_id]!r} was"
                          " shut down.")
        records = [r for r in discovery.list_records() if r.address and not r.tls]
        answers = await asyncio.gather(*(
            cluster_info.try_events(r.address or "", events.RUNS_TOPIC, TIMEOUT_S)
            for r in records))
        silent = []
        for record, history in zip(records, answers, strict=True):
            if history is None:
                silent.append(record.name)
            elif run_id in fold.fold_run_events(history):
                self._homes[run_id] = (record.name, record.address or "")
                return record
        if silent:
            raise SchedulerUnreachable(
                f"run {run_id!r} is on no cluster that answers, and the scheduler of"
                f" {', '.join(map(repr, silent))} is unreachable; retrying.")
        raise RunGone(f"no run {run_id!r} on any discovered cluster.")

    async def points(self, run_id: str) -> list[dict[str, Any]]:
        """Rank 0's recent points of ``run_id`` (at most ``fold.HISTORY``), oldest first."""
        record = await self.locate(run_id)
        feed = await self._feed(record.address or "")
        watch = await feed.watch(run_id, keep_points=True)
        if not await feed.alive():
            raise SchedulerUnreachable(
                f"the scheduler of cluster {record.name!r} does not answer.")
        return list(watch.points or ())

    async def panel_metrics(self, run_ids: list[str]) -> tuple[list[str], list[str]]:
        """The metric names reported so far by any of ``run_ids``, and one sentence for each
        run that is gone. A run whose scheduler is silent counts as neither."""
        names: dict[str, None] = {}
        gone: list[str] = []
        for run_id in run_ids:
            try:
                names.update(dict.fromkeys(fold.metric_names(await self.points(run_id))))
            except RunGone as e:
                gone.append(str(e))
            except SchedulerUnreachable:
                pass
        return list(names), gone

    async def list_runs(self) -> list[dict[str, Any]]:
        """Every run on every reachable discovered cluster, newest first, with its last point."""

        async def of_cluster(record: discovery.ClusterRecord) -> list[dict[str, Any]]:
            history = await cluster_info.try_events(record.address or "", events.RUNS_TOPIC,
                                                   TIMEOUT_S)
            key = (record.name, record.address or "")
            if history is None:  # silent for now: its runs as last seen, marked so
                return [{**run, "reachable": False} for run in self._listed.get(key, [])]
            found = fold.fold_run_events(history)
            self._listed[key] = list(found.values())
            if not found:
                return []
            try:
                feed = await self._feed(record.address or "")
            except SchedulerUnreachable:
                return []
            for run in found.values():
                self._homes.setdefault(run["run"], (record.name, record.address or ""))
                try:
                    watch = await feed.watch(run["run"], keep_points=False)
                except SchedulerUnreachable:
                    watch = None
                last = (watch.last if watch else None) or {}
                run.update(cluster=record.name, points=watch.count if watch else 0,
                           step=last.get("step"),
                           last={k: v for k, v in last.items() if k not in fold.NOT_METRICS})
            return list(found.values())

        records = [r for r in discovery.list_records() if r.address and not r.tls]
        known = {(r.name, r.address or "") for r in records}
        for key in [k for k in self._listed if k not in known]:
            del self._listed[key]  # the cluster was shut down: its runs with it
        per_cluster = await asyncio.gather(*(of_cluster(r) for r in records))
        found = [run for group in per_cluster for run in group]
        return sorted(found, key=lambda r: r["started"], reverse=True)

    def _sweep(self) -> None:
        now = time.monotonic()
        for address, feed in list(self._feeds.items()):
            feed.sweep(now)
            if not feed.watches and now - feed.used > IDLE_S:
                del self._feeds[address]
                asyncio.ensure_future(feed.close())

    async def close(self) -> None:
        """Close every client (the server is stopping)."""
        feeds, self._feeds = list(self._feeds.values()), {}
        await asyncio.gather(*(feed.close() for feed in feeds))


async def _connect(address: str) -> Any:
    """An asynchronous client on the running loop, for subscriptions only."""
    from distributed import Client

    client = Client(address, asynchronous=True, timeout=TIMEOUT_S, set_as_default=False)
    try:
        await asyncio.wait_for(client, 2 * TIMEOUT_S)
    except BaseException:
        await client.close()
        raise
    return client


Listener = Callable[[dict[str, Any]], None]


class ListWatcher:
    """The cluster and run lists, recomputed while anyone listens; listeners hear each change.

    Lists are recomputed every ``interval`` seconds, and at once when a discovery file comes or
    goes, so a cluster started or shut down anywhere shows within a fraction of a second and a
    run within ``interval``. Nothing runs while nobody listens.
    """

    def __init__(self, feeds: Feeds, *, interval: float = 1.0) -> None:
        self.feeds = feeds
        self.interval = interval
        self.latest: dict[str, Any] | None = None
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(lists)`` now (when the lists are known) and after every change."""
        self._listeners.append(listener)
        if self.latest is not None:
            listener(self.latest)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def snapshot(self) -> dict[str, Any]:
        """``{"clusters": [...], "runs": [...]}`` as ``GET /mlcloud/clusters`` and ``/runs``."""
        from ..cluster import api as clusters

        found, listed = await asyncio.gather(clusters.list_clusters_async(timeout=TIMEOUT_S),
                                             self.feeds.list_runs())
        return {"clusters": found, "runs": listed}

    async def _run(self) -> None:
        import json

        shown = None
        while self._listeners:
            try:
                lists = await self.snapshot()
            except Exception:  # a bad discovery file or scheduler: try again next round
                lists = None
            text = json.dumps(lists, sort_keys=True, default=str)
            if lists is not None and text != shown:
                shown, self.latest = text, lists
                for listener in list(self._listeners):
                    try:
                        listener(lists)
                    except Exception:
                        self.unsubscribe(listener)
            await self._pause()
        self.latest = None  # stale by the time anyone listens again

    async def _pause(self) -> None:
        """Wait ``interval`` seconds, or less when the set of discovery files changes."""
        before = _folder_state()
        deadline = time.monotonic() + self.interval
        while self._listeners and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if _folder_state() != before:
                return

    async def close(self) -> None:
        self._listeners.clear()
        if self._task is not None:
            self._task.cancel()


def _folder_state() -> tuple[str, ...]:
    folder = discovery.discovery_dir()
    try:
        return tuple(sorted(p.name for p in folder.iterdir()))
    except OSError:
        return ()
