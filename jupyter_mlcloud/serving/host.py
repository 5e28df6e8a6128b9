"""On a worker: the replicas this worker process serves, each a uvicorn server in a thread
of its own, with its own event loop, batcher thread and listening socket.

:func:`start_replica` and :func:`stop_replica` are what the kernel runs on a worker (see
``launch``, which calls them through :func:`in_thread`); :func:`replicas` lists what a worker
runs. The socket is bound here before
uvicorn starts (port 0: the OS picks a free one), so there is no window in which another
process can take the port between choosing and binding it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..monitoring.window import Predictions, Window, WindowOptions
from ..scoring.model import ModelBlob
from .batching import BatchOptions
from .security import KeyPair, TLSFiles, write_private

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
WILDCARDS = ("0.0.0.0", "::", "[::]")
#: Longest wait for requests in flight when a replica stops; then connections are cut.
GRACEFUL_S = 5


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a worker needs to serve one replica (the model travels separately)."""

    id: str
    name: str
    version: str
    token: str
    host: str | None = None  # None: the worker's own address
    port: int = 0  # 0: a free port
    tls: KeyPair | None = None  # the certificate to serve; None with certfile/keyfile
    certfile: str | None = None  # user-given files, read on the worker as they are
    keyfile: str | None = None
    device: str = "auto"
    features: int | None = None
    batching: BatchOptions = field(default_factory=BatchOptions)
    max_body_bytes: int = 16 * 2**20
    reference: Any = None  # a monitoring.Reference: drift is measured against it
    window: WindowOptions = field(default_factory=WindowOptions)


@dataclass(frozen=True)
class ReplicaInfo:
    """A started replica, as the worker reports it."""

    id: str
    name: str
    version: str
    url: str
    host: str
    port: int
    worker: str
    pid: int
    device: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@dataclass
class _Running:
    info: ReplicaInfo
    served: Served
    model: Any
    window: Window
    predictions: Predictions
    reference_outputs: Any  # the model's outputs on the reference's rows (None without one)


_running: dict[str, _Running] = {}
_lock = threading.Lock()


_calling = threading.local()  # .worker: the worker that handed this thread its call


def _worker_host() -> tuple[str, str]:
    """This worker's contact address and its host part."""
    from distributed.comm import get_address_host

    worker = getattr(_calling, "worker", None)
    if worker is None:  # a task: Dask knows its worker
        from distributed import get_worker

        worker = get_worker()
    return worker.address, get_address_host(worker.address)


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}).") from None
    return sock


@dataclass
class Served:
    """An ASGI app served over HTTPS by uvicorn on a thread of this worker."""

    server: Any  # uvicorn.Server
    thread: threading.Thread
    sock: socket.socket
    tls: TLSFiles | None
    url: str
    host: str
    port: int
    worker: str


def serve_app(app: Any, *, what: str, thread_name: str, host: str | None, port: int,
              tls: KeyPair | None, certfile: str | None, keyfile: str | None) -> Served:
    """On a worker: serve ``app`` over HTTPS on ``host`` (default the worker's own address),
    with ``tls`` (written to private files) or ``certfile``/``keyfile``; returns once it
    accepts connections. ``what`` names it in errors. Fails leaving nothing behind."""
    import uvicorn

    worker, worker_host = _worker_host()
    host = host or worker_host
    files: TLSFiles | None = None
    if tls is not None:
        files = write_private(tls)
        certfile, keyfile = files.certfile, files.keyfile
    elif not (certfile and keyfile):
        raise ValueError(f"a {what} needs a certificate: pass tls= or certfile= and keyfile=.")
    sock = None
    try:
        sock = _bind(host, port)
        config = uvicorn.Config(app, ssl_certfile=certfile, ssl_keyfile=keyfile,
                                log_level="warning", access_log=False, lifespan="on",
                                # uvloop and httptools where installed (a dependency
                                # on Linux and macOS): about twice the requests per core.
                                loop="auto", http="auto", timeout_graceful_shutdown=GRACEFUL_S,
                                server_header=False)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                  name=thread_name, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the {what}'s server stopped while starting; see the"
                                   " worker's log.")
            if time.monotonic() > deadline:
                server.should_exit = True
                thread.join(GRACEFUL_S + 5)
                raise RuntimeError(f"the {what}'s server did not start within"
                                   f" {START_TIMEOUT_S:g} s.")
            time.sleep(0.01)
    except BaseException:
        if sock is not None:
            sock.close()
        if files is not None:
            files.remove()
        raise
    bound = int(sock.getsockname()[1])
    reach = worker_host if host in WILDCARDS else host  # a URL names a host, not "any"
    return Served(server, thread, sock, files, f"https://{url_host(reach)}:{bound}", host,
                  bound, worker)


def stop_served(served: Served, timeout: float = 30.0) -> bool:
    """Stop ``served`` (requests in flight get up to a few seconds), close its port and
    remove its files; False if its thread did not end."""
    served.server.should_exit = True
    served.thread.join(timeout)
    if served.thread.is_alive():  # a stuck request: cut the connections, close the loop
        served.server.force_exit = True
        served.thread.join(GRACEFUL_S)
    served.sock.close()
    if served.tls is not None:
        served.tls.remove()
    return not served.thread.is_alive()


def start_replica(spec: ReplicaSpec, blob: ModelBlob) -> ReplicaInfo:
    """On a worker: load ``blob``'s model and serve it over HTTPS as ``spec`` says; returns
    once the server accepts connections. Fails with one sentence, leaving nothing behind."""
    from .batching import Batcher
    from .metrics import ReplicaMetrics
    from .replica import build_app
    from .runner import ModelRunner

    with _lock:
        if spec.id in _running:
            raise ValueError(f"replica {spec.id!r} already runs on this worker.")
    model = ModelRunner(blob, device=spec.device, features=spec.features)
    metrics = ReplicaMetrics(spec.name, spec.version, spec.batching.max_batch_size,
                             lambda: batcher.queued)  # read at scrape time, once it exists
    batcher = Batcher(model, spec.batching, thread_name=f"mlcloud-replica-{spec.id}-compute",
                      on_batch=metrics.batch)
    window, predictions = Window(spec.window), Predictions(spec.window)

    def observe(request_id: str, rows: Any, outputs: Any) -> None:
        window.add(rows, outputs)
        predictions.add(request_id, outputs)

    reference_outputs = None
    if spec.reference is not None:  # what the outputs looked like on the reference inputs
        rows = spec.reference.values.astype(model.input_dtype)
        reference_outputs = np.concatenate([model(rows[i:i + 1024])
                                            for i in range(0, len(rows), 1024)])
    app = build_app(model, batcher, metrics, name=spec.name, version=spec.version,
                    token=spec.token, max_body_bytes=spec.max_body_bytes, observe=observe)
    served = serve_app(app, what="replica", thread_name=f"mlcloud-replica-{spec.id}",
                       host=spec.host, port=spec.port, tls=spec.tls, certfile=spec.certfile,
                       keyfile=spec.keyfile)
    info = ReplicaInfo(spec.id, spec.name, spec.version, served.url, served.host, served.port,
                       served.worker, os.getpid(), model.device, [model.input.as_json()],
                       [model.output.as_json()])
    with _lock:
        _running[spec.id] = _Running(info, served, model.model, window, predictions,
                                     reference_outputs)
    return info


def stop_replica(replica_id: str, timeout: float = 30.0) -> bool:
    """On a worker: stop serving ``replica_id`` (requests in flight get up to a few seconds),
    close its port and remove its files. False if it does not run here."""
    with _lock:
        running = _running.pop(replica_id, None)
    if running is None:
        return False
    if not stop_served(running.served, timeout):
        log.warning("replica %s did not stop within %g s", replica_id, timeout)
        return False
    return True


async def in_thread(fn: Any, *args: Any, dask_worker: Any = None) -> Any:
    """On a worker, from ``client.run`` (which passes ``dask_worker``): ``fn(*args)`` in a
    thread beside the worker's event loop. Not a task: the worker's task slots may be held by
    training for hours, and an endpoint must still be started, scaled and healed meanwhile;
    not on the event loop either, since starting or draining waits for seconds."""

    def call() -> Any:
        _calling.worker = dask_worker
        try:
            return fn(*args)
        finally:
            _calling.worker = None

    return await asyncio.get_running_loop().run_in_executor(None, call)


def stop_all(timeout: float = 30.0) -> list[str]:
    """On a worker: stop every replica it serves; their ids."""
    with _lock:
        ids = list(_running)
    return [i for i in ids if stop_replica(i, timeout)]


def replicas() -> list[ReplicaInfo]:
    """On a worker: the replicas it serves now."""
    with _lock:
        return [r.info for r in _running.values()]


def _find(replica_id: str) -> _Running:
    with _lock:
        running = _running.get(replica_id)
    if running is None:
        raise KeyError(f"replica {replica_id!r} does not run on this worker.")
    return running


def traffic(replica_id: str, since: int | None = None) -> dict[str, Any] | None:
    """On a worker: replica ``replica_id``'s window of recent traffic (``times``, ``inputs``,
    ``outputs``), its model's ``reference_outputs`` and its delayed-label ``quality`` parts;
    None if it no longer runs here (stopped meanwhile). With ``since`` (0, or an earlier
    answer's ``written``): only the rows written after it, of any age (see
    :meth:`..monitoring.window.Window.since`), for a caller that keeps the window itself and
    drops the rows older than its ``seconds`` by ``now``, this worker's clock."""
    with _lock:
        running = _running.get(replica_id)
    if running is None:
        return None
    written = None
    if since is None:
        times, inputs, outputs = running.window.snapshot()
    else:
        times, inputs, outputs, written = running.window.since(since)
    return {"version": running.info.version, "times": times, "inputs": inputs,
            "outputs": outputs, "reference_outputs": running.reference_outputs,
            "quality": running.predictions.parts(), "written": written, "now": time.time()}


def quality_parts(replica_id: str) -> dict[str, Any] | None:
    """On a worker: replica ``replica_id``'s delayed-label quality parts alone (no window);
    None if it no longer runs here."""
    with _lock:
        running = _running.get(replica_id)
    return running.predictions.parts() if running is not None else None


def feedback(replica_id: str, request_ids: list[str], labels: list[Any]) -> int:
    """On a worker: join ``labels`` to the requests replica ``replica_id`` answered; how many
    it had answered."""
    return _find(replica_id).predictions.feedback(request_ids, labels)


def loaded_model(replica_id: str) -> Any:
    """On a worker: the model object replica ``replica_id`` serves (for inspection)."""
    with _lock:
        running = _running.get(replica_id)
    if running is None:
        raise KeyError(f"replica {replica_id!r} does not run on this worker.")
    return running.model
