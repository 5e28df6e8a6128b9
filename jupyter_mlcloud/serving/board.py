"""Every endpoint of every discovered cluster, for the Jupyter server: listed with live
figures, scaled, promoted and rolled back, and their figures over time for the endpoint panel.

The server holds one :class:`Board`. It keeps one synchronous ``distributed.Client`` per
scheduler it was asked about and does its blocking work in threads of its own, off the
server's event loop. Reads are bounded: connecting, listing the endpoints' states and asking
routers for their figures each wait at most ``timeout`` seconds, so a scheduler that does not
answer never holds a request up; its endpoints are listed as last seen, marked unreachable.
Changes go through :class:`~.api.Endpoint`, inside the endpoint's lock like any kernel's.

A router's figures are instantaneous (requests per second over the last seconds, latency
percentiles over the last minute). The board samples them when asked (at most every
``MIN_SAMPLE_S``) and keeps the samples per endpoint, so the panel plots them over time.

Nothing here imports torch or MLflow, and Dask-side modules load at the first request, not
when the server extension loads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..cluster import discovery
from ..panels.endpoint import (
    DRIFT_FIGURES,
    ENDPOINT_FIGURES,
    endpoint_columns,
    endpoint_features,
    endpoint_versions,
    feature_column,
    version_column,
)

TIMEOUT_S = 2.0  # each bounded wait: connecting, reading states, a router's figures
MIN_SAMPLE_S = 0.5  # figures fresher than this are reused (the list and the panels share)
HISTORY = 900  # samples kept per endpoint (15 minutes at one a second)
MAX_FEATURES = 8  # drift features an endpoint panel plots: the first that were among the largest
FIGURES = ENDPOINT_FIGURES
TARGET = re.compile(r"^(?P<cluster>[^:]+):(?P<name>.+)$")


class EndpointUnknown(LookupError):
    """No such cluster, or no such endpoint on it (any more)."""


class SchedulerSilent(ConnectionError):
    """The endpoint's scheduler does not answer (now)."""


def parse_target(target: str) -> tuple[str, str]:
    """``"CLUSTER:NAME"`` (an endpoint panel's target) as ``(cluster, name)``."""
    match = TARGET.match(target)
    if match is None:
        raise ValueError(f"{target!r} is not an endpoint; give CLUSTER:NAME, e.g. local:digits.")
    return match["cluster"], match["name"]


def _version_key(version: Any) -> tuple[int, str]:
    text = str(version)
    return (int(text), "") if text.isdigit() else (1 << 62, text)


def describe(cluster: str, state: dict[str, Any], figures: dict[str, Any] | None,
             *, reachable: bool = True) -> dict[str, Any]:
    """One endpoint as ``GET /mlcloud/endpoints`` lists it: where it answers, its live
    versions (weight, replicas and their workers, figures), its replicas in all, autoscale
    bounds and the router's figures (None where the router did not answer); for a watched
    one, the last drift summary and its three newest alerts."""
    from . import control

    per_version = (figures or {}).get("versions") or {}
    versions = []
    for v in control.live(state):
        found = per_version.get(str(v["version"])) or {}
        versions.append({
            "version": v["version"], "weight": round(v["weight"], 6),
            "source": v.get("source"), "replicas": len(v["replicas"]),
            "workers": [r["worker"] for r in v["replicas"]],
            **{k: found.get(k) if figures else None for k in FIGURES}})
    replicas = control.all_replicas(state)
    bounds = state.get("autoscale")
    return {
        "cluster": cluster, "name": state["name"], "id": state["id"],
        "url": state["router"]["url"], "router_worker": state["router"]["worker"],
        "versions": versions, "replicas": len(replicas),
        "workers": [r["worker"] for r in replicas],
        "autoscale": {"min": bounds["min"], "max": bounds["max"]} if bounds else None,
        "created": state.get("created"), "reachable": reachable,
        "watched": bool(state.get("monitor")), "drift": state.get("drift"),
        "alerts": list(state.get("alerts") or [])[-3:],
        **{k: figures.get(k) if figures else None for k in FIGURES},
    }


def details(entry: dict[str, Any] | None) -> str:
    """One line about a listed endpoint: its URL, versions with weights and replicas, and
    autoscale bounds ("" when unknown)."""
    if not entry:
        return ""
    parts = [entry["url"], *(f"v{v['version']} {v['weight']:.0%} ×{v['replicas']}"
                             for v in entry["versions"])]
    if entry.get("autoscale"):
        parts.append(f"autoscale {entry['autoscale']['min']}:{entry['autoscale']['max']}")
    return " · ".join(parts)


def _drift_figures(state: dict[str, Any]) -> dict[str, Any]:
    """The panel's drift and quality columns from the controller's last check (None when
    unwatched)."""
    drift = state.get("drift")
    if not drift:
        return dict.fromkeys(DRIFT_FIGURES)
    quality = drift.get("quality") or {}
    return {"drifted_features": len(drift["drifted"]),
            "largest_effect": max((t[1] for t in drift["top"]), default=0.0),
            "accuracy": quality.get("accuracy"), "rmse": quality.get("rmse"),
            "effects": {str(t[0]): t[1] for t in drift["top"]}}


def _router_figures(router_ids: list[str]) -> dict[str, dict[str, Any]]:
    """On a worker: the figures of those of ``router_ids`` it runs."""
    from . import router as router_side

    here = {r.id for r in router_side.routers()}
    return {i: router_side.stats(i) for i in router_ids if i in here}


class _History:
    """One endpoint's sampled figures, oldest first."""

    def __init__(self, endpoint_id: str) -> None:
        self.id = endpoint_id
        self.samples: deque[tuple[float, dict[str, Any]]] = deque(maxlen=HISTORY)
        self.taken = -float("inf")  # monotonic time of the newest sample
        self.versions: set[str] = set()
        self.features: dict[str, None] = {}  # plotted drift features, first seen first

    def add(self, figures: dict[str, Any]) -> None:
        self.samples.append((time.time(), figures))
        self.taken = time.monotonic()
        self.versions.update(str(v) for v in figures.get("versions") or {})
        for feature in figures.get("effects") or {}:
            if len(self.features) < MAX_FEATURES:
                self.features.setdefault(feature)

    def columns(self, live: list[str]) -> dict[str, list[Any]]:
        """The panel's columns (see :mod:`jupyter_mlcloud.panels.endpoint`) over every
        version sampled or live, and every drift feature plotted."""
        versions = sorted(self.versions | set(live), key=_version_key)
        columns: dict[str, list[Any]] = {c: [] for c in endpoint_columns(versions,
                                                                         self.features)}
        for at, figures in self.samples:
            columns["time"].append(at * 1000.0)
            for key in (*FIGURES, *DRIFT_FIGURES):
                columns[key].append(figures.get(key))
            for version in versions:
                found = (figures.get("versions") or {}).get(version) or {}
                for key in FIGURES:
                    columns[version_column(version, key)].append(found.get(key))
            effects = figures.get("effects") or {}
            for feature in self.features:  # a check names its five largest: others are gaps
                columns[feature_column(feature)].append(effects.get(feature))
        return columns


class Board:
    """The server's view of the endpoints on every discovered cluster (see the module)."""

    def __init__(self, *, timeout: float = TIMEOUT_S, threads: int = 8) -> None:
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="mlcloud-endpoints")
        self._lock = threading.Lock()
        self._attempts: dict[str, threading.Thread] = {}  # connecting, per scheduler
        self._clients: dict[str, Any] = {}
        self._closed = False
        self._listed: dict[tuple[str, str], list[dict[str, Any]]] = {}  # last seen, per cluster
        self._history: dict[tuple[str, str], _History] = {}

    # ------------------------------------------------------------ what the routes call

    async def list_endpoints(self) -> dict[str, Any]:
        """``{"endpoints": [...], "unreachable": [cluster, ...]}``: every endpoint of every
        discovered cluster (see :func:`describe`), by cluster and name; those of a silent
        scheduler as last seen, with ``reachable`` False."""
        records = [r for r in discovery.list_records() if r.address and not r.tls]
        known = {(r.name, r.address or "") for r in records}
        with self._lock:
            for key in [k for k in self._listed if k not in known]:
                del self._listed[key]  # the cluster was shut down: its endpoints with it
        await self._run(self._forget_clients, {a for _, a in known})

        async def of_cluster(record: discovery.ClusterRecord) -> list[dict[str, Any]] | None:
            try:
                return await asyncio.wait_for(
                    self._run(self._list_cluster, record.name, record.address or ""),
                    4 * self.timeout + 1)
            except (SchedulerSilent, asyncio.TimeoutError):
                return None

        found = await asyncio.gather(*(of_cluster(r) for r in records))
        endpoints: list[dict[str, Any]] = []
        unreachable = []
        for record, entries in zip(records, found, strict=True):
            key = (record.name, record.address or "")
            if entries is None:
                unreachable.append(record.name)
                with self._lock:
                    last = self._listed.get(key, [])
                endpoints += [{**e, "reachable": False, **dict.fromkeys(FIGURES)}
                              for e in last]
            else:
                with self._lock:
                    self._listed[key] = entries
                endpoints += entries
        endpoints.sort(key=lambda e: (e["cluster"], e["name"]))
        return {"endpoints": endpoints, "unreachable": sorted(unreachable)}

    async def scale(self, cluster: str, name: str, replicas: Any) -> dict[str, Any]:
        """Run ``replicas`` replicas of the endpoint's main version; the endpoint as listed."""
        return await self._run(self._change, cluster, name, lambda ep: ep.scale(replicas))

    async def promote(self, cluster: str, name: str) -> dict[str, Any]:
        """All traffic to the newest version; the endpoint as listed."""
        return await self._run(self._change, cluster, name, lambda ep: ep.promote())

    async def rollback(self, cluster: str, name: str) -> dict[str, Any]:
        """Back to the previous version; the endpoint as listed."""
        return await self._run(self._change, cluster, name, lambda ep: ep.rollback())

    async def stats(self, cluster: str, name: str) -> dict[str, list[Any]]:
        """The endpoint's figures over time as the panel's columns (a sample taken now)."""
        columns, _ = await self._run(self._sampled, cluster, name)
        return columns

    async def panel(self, cluster: str, name: str
                    ) -> tuple[dict[str, Any] | None, list[str], list[str]]:
        """What the endpoint's panel page is built from: the endpoint as listed (None while
        its scheduler is silent), the versions and the drift features to plot."""
        try:
            columns, entry = await self._run(self._sampled, cluster, name)
        except SchedulerSilent:
            with self._lock:
                history = self._history.get((cluster, name))
                versions = sorted(history.versions if history else (), key=_version_key)
                features = list(history.features) if history else []
            return None, versions, features
        return entry, endpoint_versions(columns), endpoint_features(columns)

    async def close(self) -> None:
        """Close every client (the server is stopping)."""
        with self._lock:
            self._closed = True
        await self._run(self._forget_clients, set())
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------ in the board's threads

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _client(self, address: str) -> Any:
        """The board's client on ``address``, connected within ``timeout``.

        A scheduler that accepts the connection and then says nothing (a hung or stopped one)
        keeps ``Client(address, timeout=...)`` waiting for good, so clients are made in a
        thread of their own, one at a time per scheduler, and waited for ``timeout``; one
        that connects later is kept for the next request.
        """
        stale = None
        with self._lock:
            client = self._clients.get(address)
            if client is not None and client.status == "running":
                return client
            if client is not None:
                stale = self._clients.pop(address)
            attempt = self._attempts.get(address)
            if attempt is None or not attempt.is_alive():
                attempt = self._attempts[address] = threading.Thread(
                    target=self._connect, args=(address,), daemon=True,
                    name="mlcloud-endpoints-connect")
                attempt.start()
        if stale is not None:
            self._close(stale)
        attempt.join(self.timeout + 1.0)
        with self._lock:
            client = self._clients.get(address)
        if client is None:
            raise SchedulerSilent(f"the scheduler at {address} does not answer; retrying.")
        return client

    def _connect(self, address: str) -> None:
        from distributed import Client

        try:
            client = Client(address, timeout=self.timeout, set_as_default=False,
                            name="mlcloud-server-endpoints")
        except Exception:
            return
        with self._lock:
            keep = not self._closed and address not in self._clients
            if keep:
                self._clients[address] = client
        if not keep:
            self._close(client)

    def _close(self, client: Any) -> None:
        with self._lock:
            for address, known in list(self._clients.items()):
                if known is client:
                    del self._clients[address]
        try:
            client.close(timeout=self.timeout)
        except Exception:
            pass

    def _forget_clients(self, keep: set[str]) -> None:
        with self._lock:
            leaving = [c for a, c in self._clients.items() if a not in keep]
        for client in leaving:
            self._close(client)

    def _states(self, client: Any) -> list[dict[str, Any]]:
        """Every endpoint's published state on ``client``'s scheduler, by name."""
        from . import control

        try:  # versions' models are datasets too, under a longer prefix: never fetched here
            keys = sorted(d for d in client.list_datasets(callback_timeout=self.timeout)
                          if isinstance(d, str) and d.startswith(control.PREFIX)
                          and not d.startswith(control.MODEL_PREFIX))
            if not keys:
                return []
            states = client.get_dataset(keys, default=None, callback_timeout=self.timeout)
        except Exception:
            self._close(client)  # a fresh connection next time
            raise SchedulerSilent(f"the scheduler at {client.scheduler.address} does not"
                                  " answer; retrying.") from None
        return [dict(s) for s in states if isinstance(s, dict) and "router" in s]

    def _figures(self, client: Any, states: list[dict[str, Any]]
                 ) -> list[dict[str, Any] | None]:
        """Each endpoint router's figures (see :func:`.router.stats`), asked of all their
        workers at once, in a thread beside each worker's event loop (not as a task: training
        may hold every task slot); None for a router that did not answer within ``timeout``."""
        from . import host as worker_side

        ids = [s["router"]["id"] for s in states]
        try:
            answers = client.run(worker_side.in_thread, _router_figures, ids,
                                 workers=sorted({s["router"]["worker"] for s in states}),
                                 on_error="return", callback_timeout=self.timeout)
        except Exception:  # not in time: no figures this time
            return [None] * len(states)
        found: dict[str, dict[str, Any]] = {}
        for answer in answers.values():
            if isinstance(answer, dict):  # else the error of a worker that went
                found.update(answer)
        return [dict(found[i]) if i in found else None for i in ids]

    def _sample(self, cluster: str, client: Any, states: list[dict[str, Any]]
                ) -> list[dict[str, Any] | None]:
        """The figures of ``states``' endpoints: a fresh sample kept in their histories, or
        the last one when it is newer than ``MIN_SAMPLE_S``."""
        now = time.monotonic()
        with self._lock:
            histories = []
            for state in states:
                key = (cluster, state["name"])
                history = self._history.get(key)
                if history is None or history.id != state["id"]:  # served again: new figures
                    history = self._history[key] = _History(state["id"])
                histories.append(history)
        stale = [i for i, h in enumerate(histories)
                 if now - h.taken >= MIN_SAMPLE_S or not h.samples]
        fresh = self._figures(client, [states[i] for i in stale]) if stale else []
        found: list[dict[str, Any] | None] = [
            h.samples[-1][1] if h.samples else None for h in histories]
        with self._lock:
            for i, figures in zip(stale, fresh, strict=True):
                if figures is not None:
                    figures = {**figures, **_drift_figures(states[i])}
                    histories[i].add(figures)
                found[i] = figures
        return found

    def _list_cluster(self, cluster: str, address: str) -> list[dict[str, Any]]:
        client = self._client(address)
        states = self._states(client)
        with self._lock:
            names = {s["name"] for s in states}
            for key in [k for k in self._history if k[0] == cluster and k[1] not in names]:
                del self._history[key]  # closed
        figures = self._sample(cluster, client, states)
        return [describe(cluster, s, f) for s, f in zip(states, figures, strict=True)]

    def _find(self, cluster: str, name: str) -> tuple[Any, dict[str, Any]]:
        """The client of ``cluster`` and endpoint ``name``'s state on it."""
        from . import control

        record = discovery.get(cluster)
        if record is None or not record.address:
            raise EndpointUnknown(f"no cluster named {cluster!r}.")
        if record.tls:
            raise SchedulerSilent(f"the scheduler of cluster {cluster!r} needs TLS certificates"
                                  " the Jupyter server does not hold.")
        client = self._client(record.address)
        try:
            known = client.list_datasets(callback_timeout=self.timeout)
            state = (client.get_dataset(control.dataset(name), callback_timeout=self.timeout)
                     if control.dataset(name) in known else None)
        except Exception:
            self._close(client)
            raise SchedulerSilent(f"the scheduler of cluster {cluster!r} does not answer;"
                                  " retrying.") from None
        if state is None:
            raise EndpointUnknown(f"no endpoint {name!r} on cluster {cluster!r}.")
        return client, dict(state)

    def _sampled(self, cluster: str, name: str
                 ) -> tuple[dict[str, list[Any]], dict[str, Any]]:
        from . import control

        client, state = self._find(cluster, name)
        (figures,) = self._sample(cluster, client, [state])
        with self._lock:
            history = self._history[(cluster, name)]
            columns = history.columns([str(v["version"]) for v in control.live(state)])
        return columns, describe(cluster, state, figures)

    def _change(self, cluster: str, name: str, change: Callable[[Any], None]
                ) -> dict[str, Any]:
        from .api import Endpoint

        client, state = self._find(cluster, name)
        endpoint = Endpoint(client, state)
        try:
            change(endpoint)
        except LookupError:
            raise EndpointUnknown(f"no endpoint {name!r} on cluster {cluster!r}.") from None
        _, after = self._find(cluster, name)
        (figures,) = self._sample(cluster, client, [after])
        return describe(cluster, after, figures)

