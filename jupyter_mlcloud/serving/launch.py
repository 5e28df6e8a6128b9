"""From the kernel: one replica started on a Dask worker, and stopped again.

The model is turned into bytes here (:class:`~jupyter_mlcloud.scoring.model.ModelBlob`: a
module, a callable, a saved file or a ``models:/`` URI) and sent to the chosen worker only.
The certificate is generated here for the worker's host, so the kernel holds the PEM that
verifies the replica (``ca_file``) and the worker gets its own private copy of the key.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..monitoring.window import WindowOptions
from ..scoring.model import DEVICES, ModelBlob
from . import host as worker_side
from .batching import BatchOptions
from .security import KeyPair, TLSFiles, new_token, self_signed, tls_files, write_private

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CALL_TIMEOUT_S = 300.0  # no worker call waits longer: a lost reply fails, never hangs the kernel
STOP_TIMEOUT_S = 60.0  # a stop drains for at most 30 s on the worker


@dataclass(frozen=True)
class Replica:
    """A running replica: where it answers and how to reach it safely.

    ``url`` is ``https://HOST:PORT``; send ``Authorization: Bearer <token>`` and verify TLS
    with ``ca_file``. ``worker`` is the Dask worker serving it.
    """

    id: str
    name: str
    version: str
    url: str
    token: str
    ca_file: str
    worker: str
    host: str
    port: int
    device: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    tls: TLSFiles

    def infer_url(self, *, versioned: bool = False) -> str:
        """The Open Inference Protocol infer URL of this replica's model."""
        middle = f"/versions/{self.version}" if versioned else ""
        return f"{self.url}/v2/models/{self.name}{middle}/infer"


def _check(name: str, version: str, device: str, max_body_bytes: int) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"name {name!r} is not a valid model name; use letters, digits, '_',"
                         " '.' and '-' (up to 128), starting with a letter or digit.")
    if not NAME.match(version):
        raise ValueError(f"version {version!r} is not valid; use a number or a short name of"
                         " letters, digits, '_', '.' and '-'.")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}.")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise ValueError(f"max_body_bytes must be an integer >= 1024, got {max_body_bytes!r}.")


def call(client: Any, fn: Any, *args: Any, worker: str,
         timeout: float = CALL_TIMEOUT_S) -> Any:
    """``fn(*args)`` on ``worker``, in a thread of its own there (see
    :func:`.host.in_thread`), its result; raises what it raised, or :class:`TimeoutError`
    after ``timeout`` seconds without an answer."""
    try:
        return client.run(worker_side.in_thread, fn, *args, workers=[worker],
                          callback_timeout=timeout)[worker]
    except (TimeoutError, asyncio.TimeoutError):
        raise TimeoutError(f"worker {worker} did not answer {fn.__name__} within"
                           f" {timeout:g} s.") from None


def _pick_worker(client: Any) -> str:
    """The worker serving the fewest replicas (the first by address on a tie)."""
    counts = client.run(lambda: len(worker_side.replicas()))
    if not counts:
        raise ValueError("the cluster has no workers to run a replica on.")
    return str(min(sorted(counts), key=lambda w: counts[w]))


def start_replica(client: Any, model: Any, *, name: str, version: str | int = 1,
                  worker: str | None = None, host: str | None = None,
                  token: str | None = None, certfile: str | None = None,
                  keyfile: str | None = None, ca_file: str | None = None,
                  tls: KeyPair | None = None, device: str = "auto",
                  features: int | None = None, max_batch_size: int = 32,
                  max_wait_ms: float = 5.0, max_queue: int = 256, slo_ms: float | None = None,
                  max_body_bytes: int = 16 * 2**20, reference: Any = None,
                  window: WindowOptions | None = None) -> Replica:
    """Serve ``model`` (anything :class:`ModelBlob` takes) as ``name`` (at ``version``) from
    one Dask worker of ``client``; returns once it answers (the server's start is bounded on
    the worker).

    ``worker``: the worker's address (default: the one serving the fewest replicas).
    ``host``: the address to bind (default: the worker's own, 127.0.0.1 on a local
    cluster). TLS uses ``certfile``/``keyfile`` as given (readable on the worker; verified
    with ``ca_file``, default ``certfile``), or ``tls`` (a key pair, e.g. an endpoint's), or
    a certificate generated for the host. ``token``: the bearer token (default: a random one).
    Batching: ``max_batch_size`` rows, ``max_wait_ms``, ``max_queue`` requests waiting,
    ``slo_ms`` (see :mod:`.batching`). ``device="auto"`` uses the worker's GPU if it has one.
    Monitoring: the traffic ``window`` it keeps, and the ``reference`` sample it computes its
    model's reference outputs on.
    """
    version = str(version)
    _check(name, version, device, max_body_bytes)
    options = BatchOptions(max_batch_size, max_wait_ms, max_queue, slo_ms)
    blob = ModelBlob.of(model)
    if worker is None:
        worker = _pick_worker(client)
    elif worker not in client.scheduler_info().get("workers", {}):
        raise ValueError(f"worker {worker!r} is not a worker of this cluster.")
    from distributed.comm import get_address_host

    worker_host = get_address_host(worker)
    bind = host or worker_host
    files: TLSFiles
    if certfile is not None or keyfile is not None:
        files = tls_files(certfile=certfile, keyfile=keyfile, ca_file=ca_file)
        pair = None
    else:
        pair = tls or self_signed([bind, worker_host])  # a wildcard bind is reached by name
        files = write_private(pair)  # the kernel's copy: ca_file for clients
    replica_id = f"{name}-{version}-{uuid.uuid4().hex[:8]}"
    spec = worker_side.ReplicaSpec(
        replica_id, name, version, token or new_token(), host=host, tls=pair,
        certfile=certfile if pair is None else None, keyfile=keyfile if pair is None else None,
        device=device, features=features, batching=options, max_body_bytes=max_body_bytes,
        reference=reference, window=window or WindowOptions())
    try:
        info: worker_side.ReplicaInfo = call(client, worker_side.start_replica, spec, blob,
                                             worker=worker)
    except BaseException:
        files.remove()
        # An interrupted start may still finish on the worker: stop it there too.
        try:
            call(client, worker_side.stop_replica, replica_id, worker=worker)
        except Exception:
            pass
        raise
    return Replica(info.id, info.name, info.version, info.url, spec.token, files.ca_file,
                   info.worker, info.host, info.port, info.device, info.inputs, info.outputs,
                   files)


def stop_replica(client: Any, replica: Replica, timeout: float = 30.0) -> bool:
    """Stop ``replica`` on its worker (its port is free afterwards) and remove the kernel's
    copy of its certificate. False if the worker no longer ran it."""
    try:
        stopped = bool(call(client, worker_side.stop_replica, replica.id, timeout,
                            worker=replica.worker, timeout=timeout + STOP_TIMEOUT_S))
    finally:
        replica.tls.remove()
    return stopped
