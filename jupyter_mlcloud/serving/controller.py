"""The endpoint controller: a scheduler plugin that keeps every endpoint of the cluster whole.

It lives on the scheduler (the one process an endpoint cannot outlive), so it works with no
kernel attached. Every ``interval`` seconds, for each endpoint, it:

- starts the router again when its worker died, on a worker of the same host and on the same
  port, so the URL does not change (a nanny restarts a killed worker on the same host);
- takes replicas whose worker died out of the router and starts as many again elsewhere;
- applies the endpoint's autoscale policy (see :mod:`.autoscale`): one replica a worker; for
  replicas the cluster has no worker for, it asks for workers on :data:`SCALE_TOPIC`, which
  the process holding the cluster object answers with ``cluster.scale``;
- rolls out the version a followed ``models:/NAME@ALIAS`` points at (see :mod:`.follow`);
- checks a watched endpoint's drift and quality, and raises alerts (see :mod:`.watch`).

It changes an endpoint only inside :func:`.control.editing`, like any kernel does. The
scheduler has no client of its own, so the controller makes one, in a thread, to its own
scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from . import control, launch, watch
from . import router as router_side
from .autoscale import AutoscalePolicy, Autoscaler

log = logging.getLogger(__name__)

NAME = "mlcloud-endpoint-controller"
INTERVAL_S = 0.5
REFILL_RETRY_S = 5.0  # a version short of replicas, after a failed start: the next try
#: Where the controller asks for workers; the process holding the cluster object listens
#: (see ``api.serve``) and scales the cluster up.
SCALE_TOPIC = "mlcloud-endpoint-scale"


def ensure_controller(client: Any) -> None:
    """Register the controller on ``client``'s scheduler (once: later calls change nothing)."""
    client.register_plugin(EndpointController(), name=NAME)


class EndpointController(SchedulerPlugin):
    """Heals and autoscales the scheduler's endpoints (see the module)."""

    idempotent = True

    def __init__(self, interval: float = INTERVAL_S) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scalers: dict[str, Autoscaler] = {}
        self._asked: dict[str, float] = {}  # endpoint: when its followed alias was last read
        self._watched: dict[str, dict[str, Any]] = {}  # endpoint: what its last check saw
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # travels to the scheduler without its thread
        return {"interval": self.interval}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["interval"])  # type: ignore[misc]

    async def start(self, scheduler: Any) -> None:
        self._thread = threading.Thread(target=self._run,
                                        args=(scheduler.address, scheduler.security),
                                        name=NAME, daemon=True)
        self._thread.start()

    async def close(self) -> None:
        # Called while the scheduler still runs: its client closes now, instead of trying
        # to reconnect to a scheduler that is going away.
        self._stop.set()
        client = self._client
        if client is not None:
            await asyncio.get_running_loop().run_in_executor(None, client.close, 10)

    def _run(self, address: str, security: Any) -> None:
        from distributed import Client

        try:
            client = self._client = Client(address, security=security, set_as_default=False,
                                           timeout=30, name=NAME)
        except Exception:
            log.exception("the endpoint controller could not connect to its scheduler")
            return
        try:
            while not self._stop.wait(self.interval):
                try:
                    names = control.names(client)
                except Exception:
                    if self._stop.is_set() or client.status != "running":
                        return
                    continue
                for memory in (self._scalers, self._asked, self._watched):
                    for gone in set(memory) - set(names):
                        del memory[gone]
                for name in names:
                    if self._stop.is_set():
                        return
                    try:
                        tend(client, name, self._scalers, self._asked, self._watched)
                    except LookupError:
                        self._scalers.pop(name, None)  # closed meanwhile
                    except Exception:
                        log.exception("the endpoint controller could not tend endpoint %s",
                                      name)
        finally:
            client.close()


def tend(client: Any, name: str, scalers: dict[str, Autoscaler],
         asked: dict[str, float] | None = None,
         watched: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """One look at endpoint ``name``: revive, replace, scale, follow its alias, check its
    model as needed; what it did. ``asked``: when each endpoint's alias was last read (every
    ``follow.INTERVAL_S``); ``watched``: what each endpoint's last check saw."""
    state = control.read(client, name)
    if not state["versions"] or state.get("closed"):
        return []  # being served (its first version is starting) or being closed
    alive = set(control.workers(client))
    if not alive:
        return []  # nothing to run anything on: wait for workers
    router_gone = state["router"]["worker"] not in alive
    dead = [r for r in control.all_replicas(state) if r["worker"] not in alive]
    short = [v for v in state["versions"] if _short(v)]
    wanted = None if router_gone else _autoscale(client, state, scalers)
    moved = None if router_gone else _alias_moved(client, state, asked)
    alerts, summary = (None, None) if router_gone or dead else _check(client, state, watched)
    if not (router_gone or dead or short or wanted is not None or moved is not None
            or alerts is not None):
        return []
    done: list[str] = []
    with control.editing(client, name, state["id"]) as state:
        # Each step on its own: a router brought back is kept even if a replica cannot be.
        alive = set(control.workers(client))
        if state["router"]["worker"] not in alive:
            _attempt(done, "router started again", _revive_router, client, state,
                     sorted(alive))
        for version in state["versions"]:
            lost = [r for r in version["replicas"] if r["worker"] not in alive]
            if lost:
                _attempt(done, f"{len(lost)} replica(s) of version {version['version']}"
                         " replaced", _replace, client, state, version, lost)
            elif _short(version):
                _attempt(done, f"version {version['version']} back to"
                         f" {control.wanted(version)} replica(s)", _refill, client, state,
                         version)
        if wanted is not None and state.get("autoscale"):
            main = control.primary(state)
            wanted = _fit(client, state, main, wanted, alive)
            if wanted != len(main["replicas"]):
                _attempt(done, f"version {main['version']} scaled to {wanted}",
                         control.set_replicas, client, state, main, wanted)
        if summary is not None:
            state["drift"] = summary
        if alerts:
            state["alerts"] = [*state.get("alerts", []), *alerts][-watch.KEPT_ALERTS:]
            done.append(f"{len(alerts)} alert(s)")
            _record(client, state, alerts)
        if moved is not None and state.get("follow"):
            _attempt(done, f"registered version {moved[0]} rolled out", _roll_out, client,
                     state, *moved)
    if done:
        log.info("endpoint %s: %s", name, "; ".join(done))
    return done


def _fit(client: Any, state: dict[str, Any], main: dict[str, Any], wanted: int,
         alive: set[str]) -> int:
    """``wanted`` replicas, or as many as there are workers for (one replica a worker when
    autoscaling); for the rest, ask for workers on :data:`SCALE_TOPIC`."""
    current = len(main["replicas"])
    if wanted <= current:
        return wanted
    busy = {r["worker"] for r in control.all_replicas(state)}
    free = len(alive - busy)
    if wanted - current <= free:
        return wanted
    needed = len(alive) + (wanted - current - free)
    client.log_event(SCALE_TOPIC, {"endpoint": state["name"], "workers": needed})
    return current + free


def _record(client: Any, state: dict[str, Any], alerts: list[dict[str, Any]]) -> None:
    """Log ``alerts`` to MLflow from a worker (fire and forget: a store that does not answer
    must not hold the controller)."""
    from distributed import fire_and_forget

    from ..tracking.alerts import log_alert

    tracking = state.get("tracking")
    if not tracking:
        return
    for alert in alerts:
        fire_and_forget(client.submit(log_alert, tracking["uri"], tracking["experiment"],
                                      state["name"], alert, pure=False))


def _check(client: Any, state: dict[str, Any], watched: dict[str, dict[str, Any]] | None
           ) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """A watched endpoint's new alerts and drift summary, every ``every_s`` seconds; (None,
    None) between checks."""
    if not state.get("monitor") or watched is None:
        return None, None
    seen = watched.setdefault(state["name"], {"at": float("-inf")})
    now = time.monotonic()
    if now - seen["at"] < state["monitor"]["every_s"]:
        return None, None
    seen["at"] = now
    try:
        alerts = watch.check(client, state, seen)
    except Exception as e:
        log.warning("endpoint %s: could not check its model: %s", state["name"], e)
        return None, None
    return alerts, seen.get("summary")


def _alias_moved(client: Any, state: dict[str, Any], asked: dict[str, float] | None
                 ) -> tuple[int, Any] | None:
    """``(version, blob)`` when the followed alias points at another version now."""
    from . import follow

    spec = state.get("follow")
    if not spec or asked is None:
        return None
    now = time.monotonic()
    if now - asked.get(state["name"], float("-inf")) < follow.INTERVAL_S:
        return None
    asked[state["name"]] = now
    try:  # on a worker: it has MLflow and the model's libraries
        result: tuple[int, Any] | None = client.submit(
            follow.moved, spec["uri"], spec["tracking_uri"], spec["version"],
            pure=False).result(timeout=120)
    except Exception as e:
        log.warning("endpoint %s: could not read %s: %s", state["name"], spec["uri"], e)
        return None
    return result


def _roll_out(client: Any, state: dict[str, Any], version: int, blob: Any) -> None:
    spec = state["follow"]
    name = spec["uri"].split("@")[0]
    alias = spec["uri"].rsplit("@", 1)[1]
    count = max(len(control.primary(state)["replicas"]), 1)
    control.add_version(client, state, blob, f"{name}/{version} (@{alias})", spec["canary"],
                        count)
    spec["version"] = version


def _attempt(done: list[str], what: str, step: Any, *args: Any) -> None:
    try:
        step(*args)
    except Exception as e:  # the next tick tries again
        log.warning("endpoint controller: not yet %s: %s", what, e)
    else:
        done.append(what)


def _replace(client: Any, state: dict[str, Any], version: dict[str, Any],
             lost: list[dict[str, Any]]) -> None:
    """Take ``lost`` replicas out of the router, then start as many elsewhere."""
    version["replicas"] = [r for r in version["replicas"] if r not in lost]
    control.route(client, state)  # no request goes to them from now on
    control.start_replicas(client, state, version, len(lost))
    control.route(client, state)


def _short(version: dict[str, Any]) -> bool:
    """Whether ``version`` runs fewer replicas than it should and may be refilled now."""
    return (len(version["replicas"]) < control.wanted(version)
            and time.time() >= version.get("refill_after", 0.0))


def _refill(client: Any, state: dict[str, Any], version: dict[str, Any]) -> None:
    """Start the replicas ``version`` lacks (a replacement that failed, for want of a worker
    or of its model); after a failure, tried again :data:`REFILL_RETRY_S` later."""
    try:
        control.start_replicas(client, state, version,
                               control.wanted(version) - len(version["replicas"]))
    except Exception:
        version["refill_after"] = time.time() + REFILL_RETRY_S
        raise
    finally:
        control.route(client, state)  # whatever did start takes traffic
    version.pop("refill_after", None)


def _revive_router(client: Any, state: dict[str, Any], alive: list[str]) -> None:
    """Start the router again, on its old host and port where possible (the URL stays)."""
    from distributed.comm import get_address_host

    old = state["router"]
    host = get_address_host(old["worker"])
    same_host = [w for w in alive if get_address_host(w) == host]
    spec = old["spec"]
    if same_host:
        spec = dataclasses.replace(spec, port=old["port"])
    info: router_side.RouterInfo = launch.call(
        client, router_side.start_router, spec, worker=(same_host or alive)[0])
    state["router"] = {**old, "worker": info.worker, "url": info.url, "port": info.port}
    control.route(client, state)


def _autoscale(client: Any, state: dict[str, Any], scalers: dict[str, Autoscaler]
               ) -> int | None:
    bounds = state.get("autoscale")
    if not bounds:
        scalers.pop(state["name"], None)
        return None
    policy = AutoscalePolicy(**bounds)
    scaler = scalers.get(state["name"])
    if scaler is None or scaler.policy != policy:
        scaler = scalers[state["name"]] = Autoscaler(policy)
    router = state["router"]
    try:
        figures = launch.call(client, router_side.stats, router["id"],
                              worker=router["worker"])
    except Exception:
        return None  # closing, or its worker just went: the next tick sees which
    return scaler.observe(time.monotonic(), figures["busy_s"],
                          len(control.primary(state)["replicas"]))
