"""The router of an endpoint: one HTTPS URL in front of its replicas, on a Dask worker.

It runs like a replica does (see :mod:`.host`): a uvicorn server with a Starlette app, in a
thread of its own on a worker, never in the kernel, so the endpoint outlives the kernel that
made it. It checks the endpoint's bearer token (401 without it, but ``/v2/health/*``) and
forwards the Open Inference Protocol routes to the replicas with an async HTTP client that
verifies them with the endpoint's certificate. Bodies and headers pass through unchanged
(hop-by-hop headers aside), so Triton's binary tensors work end to end.

Each replica serves one version of the model. A request for ``/v2/models/{name}/infer``
first picks a version by the versions' weights, with smooth weighted round robin (nginx's),
so a 10 % canary gets exactly every tenth request rather than 10 % on average; a request for
``/versions/{v}/infer`` goes to version ``v``. Within the version, balancing is least
outstanding requests (ties in turn). An infer that cannot connect, loses its connection, or
is answered 503 is retried on another replica (of the same version while one is left, then
any), up to ``retries`` times, each replica at most once: inference is idempotent, so a retry
never runs work twice in a way anyone can see.

Per version it keeps requests, errors, recent latencies (for p50/p95/p99 and requests per
second) and batch sizes (which replicas report in a header), and the time-average of requests
in flight, which autoscaling follows. ``/metrics`` (behind the token) exposes them to
Prometheus.

Control is a Dask-side call, not an HTTP route: the kernel (or the endpoint controller)
submits :func:`set_backends` (the replicas and weights; it returns once removed replicas have
no request left in flight) and :func:`stats` to the router's worker, so no control surface is
exposed to the network.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .host import Served, serve_app, stop_served
from .replica import (
    BATCH_HEADER,
    VERSION_HEADER,
    BearerAuth,
    Problem,
    error_body,
    read_body,
    receive_body,
    send_answer,
    with_fast_infer,
)
from .security import KeyPair

log = logging.getLogger(__name__)

#: Headers that describe one connection, not the message: never forwarded either way.
# Idle connections to replicas are closed before uvicorn's own 5 s keep-alive ends, so a
# request is never sent on a connection the replica is closing.
KEEPALIVE_S = 4.0
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    # Replicas never compress; asking them to would make the client decode twice.
    "accept-encoding",
})

#: Latencies kept per version for the percentiles; requests per second over the last window.
RECENT = 20_000
RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class Backend:
    """A replica as the router sees it: its id, base URL and the version it serves."""

    id: str
    url: str
    version: str = "1"


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


class _Figures:
    """One version's (or the whole router's) counts, recent latencies and batch sizes, and
    the time-integral of its requests in flight."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=RECENT)  # (answered at, seconds)
        self.batches: collections.deque[int] = collections.deque(maxlen=RECENT)
        self.in_flight = 0
        self.busy_s = 0.0  # integral of in_flight over time
        self._since = time.monotonic()

    def _tick(self) -> None:
        now = time.monotonic()
        self.busy_s += self.in_flight * (now - self._since)
        self._since = now

    def enter(self) -> None:
        self._tick()
        self.in_flight += 1

    def leave(self, status: int, seconds: float, batch: int | None) -> None:
        self._tick()
        self.in_flight -= 1
        self.requests += 1
        if status >= 400:
            self.errors += 1
        elif batch is not None:
            self.batches.append(batch)
        if status < 400:
            self.latencies.append((time.monotonic(), seconds))

    def summary(self) -> dict[str, Any]:
        """requests, errors, rps, p50/p95/p99 in ms, batch size mean and max, in flight now
        and ``busy_s`` (requests in flight integrated over time, for averages)."""
        self._tick()
        now = time.monotonic()
        recent = [s for t, s in self.latencies if now - t <= 60.0]
        window = [t for t, _ in self.latencies if now - t <= RATE_WINDOW_S]
        span = min(RATE_WINDOW_S, max(now - window[0], 1e-3)) if window else RATE_WINDOW_S
        out: dict[str, Any] = {"requests": self.requests, "errors": self.errors,
                               "rps": len(window) / span if window else 0.0,
                               "in_flight": self.in_flight, "busy_s": self.busy_s}
        for q in (50, 95, 99):
            out[f"p{q}_ms"] = _quantile(recent, q / 100) * 1000 if recent else None
        batches = list(self.batches)
        out["batch_size_mean"] = sum(batches) / len(batches) if batches else None
        out["batch_size_max"] = max(batches) if batches else None
        return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class _State:
    """What the app reads and the control calls change (changes run on the app's loop)."""

    slots: tuple[_Slot, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)  # version: share of traffic
    credit: dict[str, float] = field(default_factory=dict)  # smooth weighted round robin
    turn: int = 0
    retries: int = 0
    total: _Figures = field(default_factory=_Figures)
    versions: dict[str, _Figures] = field(default_factory=dict)
    gone: dict[str, _Slot] = field(default_factory=dict)  # removed, maybe still in flight
    loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs

    def figures(self, version: str) -> _Figures:
        if version not in self.versions:
            self.versions[version] = _Figures()
        return self.versions[version]

    def _weighted_version(self, versions: set[str]) -> str | None:
        """The next version by weight among ``versions`` (smooth weighted round robin)."""
        weighted = sorted(v for v in versions if self.weights.get(v, 0.0) > 0)
        if not weighted:
            return None
        total = sum(self.weights[v] for v in weighted)
        best = None
        for v in weighted:
            self.credit[v] = self.credit.get(v, 0.0) + self.weights[v]
            if best is None or self.credit[v] > self.credit[best]:
                best = v
        assert best is not None
        self.credit[best] -= total
        return best

    def pick(self, tried: set[str], version: str | None = None,
             prefer: str | None = None) -> _Slot | None:
        """The untried replica with the fewest requests in flight, of ``version`` (a request
        for that version), else of ``prefer`` (a retry keeps its version while it can), else of
        a version picked by weight; ties in turn, so a quiet endpoint still spreads its
        requests."""
        untried = [s for s in self.slots if s.backend.id not in tried]
        if version is not None:
            untried = [s for s in untried if s.backend.version == version]
        elif prefer is not None and any(s.backend.version == prefer for s in untried):
            untried = [s for s in untried if s.backend.version == prefer]
        else:
            chosen = self._weighted_version({s.backend.version for s in untried})
            if chosen is not None:
                untried = [s for s in untried if s.backend.version == chosen]
        if not untried:
            return None
        self.turn += 1
        least = min(s.outstanding for s in untried)
        tied = [s for s in untried if s.outstanding == least]
        return tied[self.turn % len(tied)]


def _ssl_context(ca_pem: bytes, check_hostname: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    # A generated certificate is its own, only trust anchor (pinned): any replica host holding
    # its key is genuine, including workers added after the certificate was made.
    context.check_hostname = check_hostname
    return context


def _order(version: str) -> tuple[int, str]:
    """Versions in numeric order where they are numbers."""
    return (int(version), "") if version.isdigit() else (1 << 62, version)


class _RouterMetrics:
    """The router's Prometheus series, in a registry of its own: answered requests by
    version and status, their latency through the router, retries, requests in flight."""

    def __init__(self, name: str, state: _State) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from .metrics import LATENCY_BUCKETS

        self.registry = CollectorRegistry()
        self._requests = Counter("mlcloud_router_requests", "Infer requests answered through"
                                 " the router.", ("model", "version", "code"),
                                 registry=self.registry)
        self._latency = Histogram("mlcloud_router_latency_seconds", "Time of infer requests"
                                  " through the router.", ("model", "version"),
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retries = Counter("mlcloud_router_retries", "Infer requests sent again to"
                               " another replica.", ("model",),
                               registry=self.registry).labels(name)
        Gauge("mlcloud_router_in_flight", "Infer requests inside the router.", ("model",),
              registry=self.registry).labels(name).set_function(
                  lambda: state.total.in_flight)
        self._name = name

    def answered(self, version: str, status: int, seconds: float) -> None:
        self._requests.labels(self._name, version, str(status)).inc()
        if status < 400:
            self._latency.labels(self._name, version).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def build_app(spec: RouterSpec, state: _State) -> ASGIApp:
    """The router's ASGI app for ``spec``; ``state`` holds its replicas and counters.

    Replicas are called with aiohttp's client (its C parser and plain connection pool): with
    httpx, finding a free connection in the pool took most of the router's time per request
    at concurrency 64."""
    import aiohttp

    metrics = _RouterMetrics(spec.name, state)

    holder: dict[str, aiohttp.ClientSession] = {}
    # The replica is gone or going: another may answer.
    gone = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def failed(status: int, message: str, headers: dict[str, str] | None = None) -> _Answer:
        content, with_type = error_body(message, headers)
        return _Answer(status, with_type, content)

    async def relay(method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                    wanted: str | None) -> _Answer:
        """Send one request to a replica (another on a connection error or a 503, up to
        ``spec.retries`` more), counting it; the answer to give the client."""
        counted = method == "POST"
        if wanted is not None and not any(s.backend.version == wanted for s in state.slots):
            live = ", ".join(sorted({s.backend.version for s in state.slots}, key=_order))
            return failed(404, f"version {wanted!r} of model {spec.name!r} is not served;"
                          f" the endpoint serves version(s) {live or 'none'}.")
        tried: set[str] = set()
        last: _Answer | None = None
        started = time.perf_counter()
        figures: list[_Figures] = [state.total] if counted else []
        for f in figures:
            f.enter()
        version: str | None = None
        batch: int | None = None
        for attempt in range(spec.retries + 1):
            slot = state.pick(tried, wanted, prefer=version)
            if slot is None:
                break
            if attempt:
                state.retries += 1
                metrics.retries.inc()
            if counted and version is None:
                version = slot.backend.version
                figures.append(state.figures(version))
                figures[-1].enter()
            tried.add(slot.backend.id)
            slot.outstanding += 1
            slot.requests += 1
            try:
                async with holder["client"].request(
                        method, slot.backend.url + path, data=body, headers=headers) as answer:
                    content = await answer.read()
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                slot.errors += 1
                last = failed(504, f"the replica did not answer within {spec.timeout_s:g} s.")
                break
            except gone as e:
                slot.errors += 1
                log.info("replica %s failed (%s); trying another", slot.backend.id,
                         type(e).__name__)
                continue
            finally:
                slot.outstanding -= 1
            last = _Answer(answer.status, {k: v for k, v in answer.headers.items()
                                           if k.lower() not in HOP_BY_HOP}, content)
            if answer.status == 503 and counted:  # overloaded or stopping: try another
                slot.errors += 1
                continue
            size = answer.headers.get(BATCH_HEADER)
            batch = int(size) if size and size.isdigit() else None
            break
        if last is None:
            last = failed(503, f"no replica of {spec.name!r} could take the request; retry"
                          " later.", {"Retry-After": "1"})
        if counted:
            seconds = time.perf_counter() - started
            for f in figures:
                f.leave(last.status, seconds, batch)
            answered = last.headers.get(VERSION_HEADER) or version or "none"
            metrics.answered(answered, last.status, seconds)
        return last

    async def forward(request: Request) -> Response:
        try:
            body = await read_body(request, spec.max_body_bytes)
        except Problem as p:
            return error(p.status, p.message, p.headers)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        answer = await relay(request.method, path, headers, body,
                             request.path_params.get("version"))
        return Response(answer.content, status_code=answer.status, headers=answer.headers)

    async def infer_fast(scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v2/models/{name}/infer``, the hot path, straight on ASGI: the same relay
        as :func:`forward`, without Starlette's request, routing and response objects."""
        headers, declared = [], None
        for key, value in scope["headers"]:
            name = key.decode("latin-1").lower()
            if name == "content-length":
                declared = value
            if name not in HOP_BY_HOP:
                headers.append((name, value.decode("latin-1")))
        try:
            body = await receive_body(receive, declared, spec.max_body_bytes)
            query = scope.get("query_string", b"")
            path = scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
            answer = await relay("POST", path, headers, body, None)
        except Problem as p:
            answer = failed(p.status, p.message, p.headers)
        except Exception:  # as Starlette's routes do: a sentence, never a traceback
            log.exception("the router failed to answer a request")
            answer = failed(500, "the router failed to answer this request.")
        await send_answer(send, answer.status, answer.headers, answer.content)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        if not state.slots:
            return error(503, "the endpoint has no replica ready.")
        return JSONResponse({"ready": True})

    async def prometheus(request: Request) -> Response:
        data, content_type = metrics.render()
        return Response(data, headers={"content-type": content_type})

    async def not_found(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return error(exc.status_code, f"{request.method} {request.url.path} is not a"
                         f" route of this endpoint ({exc.detail}).")
        return error(500, "the router failed to answer this request.")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=_ssl_context(spec.ca_pem, spec.check_hostname), limit=1024,
                limit_per_host=0, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=spec.timeout_s, connect=10.0),
            # Bodies pass through as they are: no cookies, no decompression, no default
            # headers beyond what the client sent.
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        holder["client"] = client
        state.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            await client.close()

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
        Route("/metrics", prometheus, methods=get),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    return BearerAuth(with_fast_infer(app, infer_fast), spec.token)


@dataclass
class _Answer:
    """What the router answers: status, headers, body."""

    status: int
    headers: dict[str, str]
    content: bytes



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
    it accepts connections (at once, if this worker already runs it). Fails with one
    sentence, leaving nothing behind."""
    with _lock:
        if spec.id in _running:  # started by an earlier try whose caller did not hear back
            return _running[spec.id].info
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


def set_backends(router_id: str, backends: Sequence[Backend],
                 weights: Mapping[str, float] | None = None, drain_timeout: float = 60.0
                 ) -> list[str]:
    """On the router's worker: route to ``backends`` with the versions' ``weights`` (default:
    all traffic to the newest version) from now on. Returns, with their ids, once the
    replicas taken out have no request of this router in flight (or after
    ``drain_timeout``), so they can be stopped without losing one."""
    running = _get(router_id)
    state = running.state
    if weights is None:
        newest = max((b.version for b in backends), key=_order, default=None)
        weights = {newest: 1.0} if newest is not None else {}

    def change() -> list[str]:
        keep = {s.backend.id: s for s in state.slots}
        slots = tuple(keep.get(b.id) or _Slot(b) for b in backends)
        wanted = {b.id for b in backends}
        removed = [s for s in state.slots if s.backend.id not in wanted]
        state.slots = slots
        if dict(weights) != state.weights:  # a new split starts a fresh round
            state.weights, state.credit = dict(weights), {}
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
    """On the router's worker: the router's figures in total (see ``_Figures.summary``)
    and ``retries``; per version its figures and weight; per replica id its version,
    requests sent, failures and requests in flight."""
    state = _get(router_id).state

    def read() -> dict[str, Any]:  # on the loop: the figures change there
        out = state.total.summary()
        out["retries"] = state.retries
        out["versions"] = {v: {**f.summary(), "weight": state.weights.get(v, 0.0)}
                           for v, f in state.versions.items()}
        for v, w in state.weights.items():
            out["versions"].setdefault(v, {**_Figures().summary(), "weight": w})
        out["replicas"] = {s.backend.id: {"version": s.backend.version,
                                          "requests": s.requests, "errors": s.errors,
                                          "outstanding": s.outstanding}
                           for s in state.slots}
        return out

    return dict(_on_loop(_get(router_id), read))


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

