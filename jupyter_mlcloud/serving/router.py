"""The router of an endpoint: one HTTPS URL in front of its replicas, on a Dask worker.

It runs like a replica does (see :mod:`.host`): a uvicorn server with a Starlette app, in a
thread of its own on a worker, never in the kernel, so the endpoint outlives the kernel that
made it. It checks the endpoint's bearer token (401 without it, but ``/v2/health/*``) and
forwards the Open Inference Protocol routes to the replicas with an async HTTP client that
verifies them with the endpoint's certificate. Bodies and headers pass through unchanged
(hop-by-hop headers aside), so Triton's binary tensors work end to end.

Balancing is least outstanding requests (ties in turn). An infer that cannot connect, loses
its connection, or is answered 503 is retried on another replica, up to ``retries`` times,
each replica at most once: inference is idempotent, so a retry never runs work twice in a way
anyone can see.

Control is a Dask-side call, not an HTTP route: the kernel submits :func:`set_backends` (the
replica list; it returns once removed replicas have no request left in flight) and
:func:`stats` to the router's worker, so no control surface is exposed to the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from .host import Served, serve_app, stop_served
from .replica import BearerAuth, Problem, read_body
from .security import KeyPair

log = logging.getLogger(__name__)

#: Headers that describe one connection, not the message: never forwarded either way.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    # Replicas never compress; asking them to would make the client decode twice.
    "accept-encoding",
})


@dataclass(frozen=True)
class Backend:
    """A replica as the router sees it: its id and base URL."""

    id: str
    url: str


@dataclass(frozen=True)
class RouterSpec:
    """Everything a worker needs to run an endpoint's router."""

    id: str
    name: str
    token: str
    ca_pem: bytes  # verifies the replicas
    check_hostname: bool = True  # False for a generated certificate, pinned by ca_pem
    host: str | None = None  # None: the worker's own address
    port: int = 0
    tls: KeyPair | None = None
    certfile: str | None = None
    keyfile: str | None = None
    retries: int = 2
    max_body_bytes: int = 16 * 2**20
    timeout_s: float = 120.0


@dataclass(frozen=True)
class RouterInfo:
    """A started router, as its worker reports it."""

    id: str
    url: str
    host: str
    port: int
    worker: str


@dataclass
class _Slot:
    backend: Backend
    outstanding: int = 0
    requests: int = 0
    errors: int = 0


@dataclass
class _State:
    """What the app reads and the control calls change (changes run on the app's loop)."""

    slots: tuple[_Slot, ...] = ()
    turn: int = 0
    requests: int = 0
    errors: int = 0
    retries: int = 0
    gone: dict[str, _Slot] = field(default_factory=dict)  # removed, maybe still in flight
    loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs

    def pick(self, tried: set[str]) -> _Slot | None:
        """The untried replica with the fewest requests in flight; ties in turn, so a quiet
        endpoint still spreads its requests."""
        candidates = [s for s in self.slots if s.backend.id not in tried]
        if not candidates:
            return None
        self.turn += 1
        least = min(s.outstanding for s in candidates)
        tied = [s for s in candidates if s.outstanding == least]
        return tied[self.turn % len(tied)]


def _ssl_context(ca_pem: bytes, check_hostname: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    # A generated certificate is its own, only trust anchor (pinned): any replica host holding
    # its key is genuine, including workers added after the certificate was made.
    context.check_hostname = check_hostname
    return context


def build_app(spec: RouterSpec, state: _State) -> ASGIApp:
    """The router's ASGI app for ``spec``; ``state`` holds its replicas and counters."""
    import httpx

    holder: dict[str, httpx.AsyncClient] = {}

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def forward(request: Request) -> Response:
        counted = request.method == "POST"
        try:
            body = await read_body(request, spec.max_body_bytes)
        except Problem as p:
            return error(p.status, p.message, p.headers)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        tried: set[str] = set()
        last: Response | None = None
        if counted:
            state.requests += 1
        for attempt in range(spec.retries + 1):
            slot = state.pick(tried)
            if slot is None:
                break
            if attempt:
                state.retries += 1
            tried.add(slot.backend.id)
            slot.outstanding += 1
            slot.requests += 1
            try:
                answer = await holder["client"].request(
                    request.method, slot.backend.url + path, content=body, headers=headers)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                # The replica is gone or going: another may answer.
                slot.errors += 1
                log.info("replica %s failed (%s); trying another", slot.backend.id,
                         type(e).__name__)
                continue
            except httpx.TimeoutException:
                slot.errors += 1
                last = error(504, f"the replica did not answer within {spec.timeout_s:g} s.")
                break
            finally:
                slot.outstanding -= 1
            out_headers = {k: v for k, v in answer.headers.items()
                           if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"}
            last = Response(answer.content, status_code=answer.status_code, headers=out_headers)
            if answer.status_code == 503 and counted:  # overloaded or stopping: try another
                slot.errors += 1
                continue
            break
        if last is None:
            last = error(503, f"no replica of {spec.name!r} could take the request; retry"
                         " later.", {"Retry-After": "1"})
        if counted and last.status_code >= 400:
            state.errors += 1
        return last

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        if not state.slots:
            return error(503, "the endpoint has no replica ready.")
        return JSONResponse({"ready": True})

    async def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return error(exc.status_code, f"{request.method} {request.url.path} is not a"
                         f" route of this endpoint ({exc.detail}).")
        return error(500, "the router failed to answer this request.")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        client = httpx.AsyncClient(
            verify=_ssl_context(spec.ca_pem, spec.check_hostname),
            timeout=httpx.Timeout(spec.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))
        holder["client"] = client
        state.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            await client.aclose()

    get, post = ["GET"], ["POST"]
    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", forward, methods=get),
        Route("/v2/models/{name}", forward, methods=get),
        Route("/v2/models/{name}/ready", forward, methods=get),
        Route("/v2/models/{name}/versions/{version}", forward, methods=get),
        Route("/v2/models/{name}/versions/{version}/ready", forward, methods=get),
        Route("/v2/models/{name}/infer", forward, methods=post),
        Route("/v2/models/{name}/versions/{version}/infer", forward, methods=post),
        Route("/v1/models/{name}:predict", forward, methods=post),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    return BearerAuth(app, spec.token)


# ---------------------------------------------------------------- on the worker


@dataclass
class _Running:
    info: RouterInfo
    served: Served
    state: _State


_running: dict[str, _Running] = {}
_lock = threading.Lock()


def start_router(spec: RouterSpec, backends: Sequence[Backend] = ()) -> RouterInfo:
    """On a worker: serve ``spec``'s router over HTTPS in front of ``backends``; returns once
    it accepts connections. Fails with one sentence, leaving nothing behind."""
    with _lock:
        if spec.id in _running:
            raise ValueError(f"router {spec.id!r} already runs on this worker.")
    state = _State(tuple(_Slot(b) for b in backends))
    served = serve_app(build_app(spec, state), what="router",
                       thread_name=f"mlcloud-router-{spec.id}", host=spec.host, port=spec.port,
                       tls=spec.tls, certfile=spec.certfile, keyfile=spec.keyfile)
    info = RouterInfo(spec.id, served.url, served.host, served.port, served.worker)
    with _lock:
        _running[spec.id] = _Running(info, served, state)
    return info


def _get(router_id: str) -> _Running:
    with _lock:
        running = _running.get(router_id)
    if running is None:
        raise KeyError(f"router {router_id!r} does not run on this worker.")
    return running


def _on_loop(running: _Running, change: Any, timeout: float = 30.0) -> Any:
    """Run ``change()`` on the router's event loop (where requests pick replicas), so a
    request never sees half a change."""
    loop = running.state.loop
    if loop is None or not loop.is_running():
        return change()
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def apply() -> None:
        try:
            done.set_result(change())
        except BaseException as e:  # pragma: no cover - change() is simple
            done.set_exception(e)

    loop.call_soon_threadsafe(apply)
    return done.result(timeout)


def set_backends(router_id: str, backends: Sequence[Backend], drain_timeout: float = 60.0
                 ) -> list[str]:
    """On the router's worker: route to ``backends`` from now on. Returns, with their ids,
    once the replicas taken out have no request of this router in flight (or after
    ``drain_timeout``), so they can be stopped without losing one."""
    running = _get(router_id)
    state = running.state

    def change() -> list[str]:
        keep = {s.backend.id: s for s in state.slots}
        slots = tuple(keep.get(b.id) or _Slot(b) for b in backends)
        wanted = {b.id for b in backends}
        removed = [s for s in state.slots if s.backend.id not in wanted]
        state.slots = slots
        for slot in removed:
            state.gone[slot.backend.id] = slot
        return [s.backend.id for s in removed]

    removed: list[str] = _on_loop(running, change)
    deadline = time.monotonic() + drain_timeout
    while any(state.gone[i].outstanding for i in removed) and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in removed:
        state.gone.pop(i, None)
    return removed


def stats(router_id: str) -> dict[str, Any]:
    """On the router's worker: the router's counters (infer requests answered, errors,
    retries) and, per replica, requests sent, failures and requests in flight."""
    state = _get(router_id).state
    return {
        "requests": state.requests, "errors": state.errors, "retries": state.retries,
        "replicas": {s.backend.id: {"requests": s.requests, "errors": s.errors,
                                    "outstanding": s.outstanding} for s in state.slots},
    }


def stop_router(router_id: str, timeout: float = 30.0) -> bool:
    """On a worker: stop ``router_id`` (requests in flight get a few seconds), close its
    port and remove its files. False if it does not run here."""
    with _lock:
        running = _running.pop(router_id, None)
    if running is None:
        return False
    return stop_served(running.served, timeout)


def routers() -> list[RouterInfo]:
    """On a worker: the routers it runs now."""
    with _lock:
        return [r.info for r in _running.values()]

