"""From the kernel: an endpoint, one HTTPS URL over replicas on the cluster's workers.

:func:`serve` ships the model to the cluster once (a future the endpoint keeps), starts the
replicas and a router on workers (see :mod:`.router`), all with one certificate and one
bearer token, and publishes the endpoint's description as a Dask dataset
(``mlcloud-endpoint-<name>``). The description holds no model bytes, only what another
kernel needs to reach and manage the endpoint, so :func:`endpoints` in any client of the
same scheduler finds it and can scale or close it.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import tempfile
import uuid
from typing import Any

import numpy as np

from ..cluster import api as clusters
from ..scoring.model import ModelBlob
from . import host as worker_side
from . import launch
from . import router as router_side
from .protocol import DATATYPES, HEADER_LENGTH
from .security import new_token, self_signed, tls_files

PREFIX = "mlcloud-endpoint-"


def _submit(client: Any, fn: Any, *args: Any, worker: str, timeout: float = 120.0) -> Any:
    """``fn(*args)`` as a task on ``worker`` (not ``client.run``: waits must not block the
    worker's event loop), its result."""
    return client.submit(fn, *args, workers=[worker], allow_other_workers=False,
                         pure=False).result(timeout=timeout)


def _workers(client: Any) -> list[str]:
    return sorted(client.scheduler_info().get("workers", {}))


class Endpoint:
    """A served model: ``url`` (its router), ``token``, ``ca_file`` (the PEM verifying it),
    ``replicas`` (the workers serving it). Call it with :meth:`predict`, or any Open
    Inference Protocol v2 client (tritonclient included) at ``url``.
    """

    def __init__(self, client: Any, description: dict[str, Any]) -> None:
        self._client = client
        self._desc = description
        self._closed = False
        self._http: Any = None
        self._ca_dir: str | None = None

    @property
    def ca_file(self) -> str:
        """The PEM file that verifies the endpoint's certificate (written on first use,
        removed by :meth:`close`)."""
        if self._ca_dir is None:
            self._ca_dir = tempfile.mkdtemp(prefix="mlcloud-ca-")
            with open(os.path.join(self._ca_dir, "ca.pem"), "wb") as f:
                f.write(self._desc["ca_pem"])
        return os.path.join(self._ca_dir, "ca.pem")

    # ----------------------------------------------------------------- what it is

    @property
    def name(self) -> str:
        """The model's name in URLs."""
        return str(self._desc["name"])

    @property
    def url(self) -> str:
        """The router's base URL, ``https://HOST:PORT``."""
        return str(self._desc["router"]["url"])

    @property
    def token(self) -> str:
        """The bearer token every request but health checks needs."""
        return str(self._desc["token"])

    @property
    def replicas(self) -> list[str]:
        """The worker addresses of the live replicas."""
        return [r["worker"] for r in self._desc["replicas"]]

    @property
    def replica_info(self) -> list[dict[str, Any]]:
        """Each replica's id, worker and URL (replicas take the endpoint's token too)."""
        return [dict(r) for r in self._desc["replicas"]]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran here."""
        return self._closed

    def infer_url(self) -> str:
        """The Open Inference Protocol infer URL of the endpoint's model."""
        return f"{self.url}/v2/models/{self.name}/infer"

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._desc['replicas'])} replica(s)"
        return f"<Endpoint {self.name!r} {self.url} {state}>"

    # ----------------------------------------------------------------- calling it

    def _session(self) -> Any:
        import httpx

        if self._http is None:
            self._http = httpx.Client(
                headers={"Authorization": f"Bearer {self.token}"}, timeout=120.0,
                verify=ssl.create_default_context(cafile=self.ca_file))
        return self._http

    def predict(self, x: Any) -> np.ndarray:
        """The model's outputs for rows ``x`` (numpy or a tensor), computed by the endpoint
        through its URL (Triton's binary tensors both ways), as a numpy array."""
        self._need_open("predict")
        if hasattr(x, "detach"):  # a tensor, without importing torch here
            x = x.detach().cpu().numpy()
        datatype = self._desc["inputs"][0]["datatype"]
        rows = np.ascontiguousarray(np.asarray(x, dtype=DATATYPES[datatype].newbyteorder("<")))
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        raw = rows.tobytes()
        header = json.dumps({
            "inputs": [{"name": self._desc["inputs"][0]["name"], "datatype": datatype,
                        "shape": list(rows.shape),
                        "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True}}).encode()
        answer = self._session().post(
            self.infer_url(), content=header + raw,
            headers={HEADER_LENGTH: str(len(header)),
                     "content-type": "application/octet-stream"})
        if answer.status_code != 200:
            try:
                message = answer.json()["error"]
            except Exception:
                message = answer.text[:200]
            raise RuntimeError(f"endpoint {self.name!r} answered {answer.status_code}:"
                               f" {message}")
        body = answer.content
        split = int(answer.headers.get(HEADER_LENGTH, len(body)))
        doc = json.loads(body[:split])
        (out,) = doc["outputs"]
        dtype = DATATYPES[out["datatype"]]
        if "data" in out:
            return np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        return np.frombuffer(body, dtype=dtype.newbyteorder("<"), offset=split).astype(
            dtype).reshape(out["shape"])

    def stats(self) -> dict[str, Any]:
        """The router's counters: ``requests`` and ``errors`` (infer requests answered, and
        those with an error status), ``retries``, and per replica id its ``requests``,
        ``errors`` and ``outstanding``."""
        self._need_open("stats")
        router = self._desc["router"]
        return dict(_submit(self._client, router_side.stats, router["id"],
                            worker=router["worker"], timeout=30))

    # ----------------------------------------------------------------- managing it

    def scale(self, n: int) -> None:
        """Run ``n`` replicas. New ones join the router once they answer; removed ones
        leave it first and are stopped once their requests are done, so none is lost."""
        self._need_open("scale")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {n!r}.")
        self._refresh()
        current = list(self._desc["replicas"])
        if n > len(current):
            for _ in range(n - len(current)):
                current.append(self._start_one(current))
            self._route(current)
        elif n < len(current):
            leaving, current = current[n:], current[:n]
            self._route(current)  # waits until the router has nothing in flight on them
            for replica in leaving:
                _stop_replica(self._client, replica)
        self._desc["replicas"] = current
        self._publish()

    def close(self) -> None:
        """Stop the router and every replica, free their ports, and forget the endpoint on
        the cluster. Closing again (here or from another kernel) is a no-op."""
        if self._closed:
            return
        self._closed = True
        if self._http is not None:
            self._http.close()
        try:
            self._refresh()
        except LookupError:
            pass  # closed by another client already: its processes are gone too
        else:
            router = self._desc["router"]
            try:
                _submit(self._client, router_side.stop_router, router["id"],
                        worker=router["worker"], timeout=60)
            finally:
                for replica in self._desc["replicas"]:
                    _stop_replica(self._client, replica)
                self._unpublish()
        if self._ca_dir is not None:
            shutil.rmtree(self._ca_dir, ignore_errors=True)

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _need_open(self, action: str) -> None:
        if self._closed:
            raise RuntimeError(f"cannot {action}: endpoint {self.name!r} is closed.")

    def _refresh(self) -> None:
        dataset = PREFIX + self.name
        if dataset not in self._client.list_datasets():
            raise LookupError(f"endpoint {self.name!r} no longer runs on this cluster.")
        description = self._client.get_dataset(dataset)
        if description["id"] != self._desc["id"]:
            raise LookupError(f"endpoint {self.name!r} was replaced by another.")
        self._desc = description

    def _publish(self) -> None:
        dataset = PREFIX + self.name
        if dataset in self._client.list_datasets():
            self._client.unpublish_dataset(dataset)
        self._client.publish_dataset(**{dataset: self._desc})

    def _unpublish(self) -> None:
        dataset = PREFIX + self.name
        if dataset in self._client.list_datasets():
            self._client.unpublish_dataset(dataset)

    def _start_one(self, current: list[dict[str, Any]]) -> dict[str, Any]:
        workers = _workers(self._client)
        if not workers:
            raise ValueError("the cluster has no workers to run a replica on.")
        load = {w: sum(r["worker"] == w for r in current) for w in workers}
        worker = min(workers, key=lambda w: (load[w], w))
        d = self._desc
        tls = d["tls"]
        replica = launch.start_replica(
            self._client, d["model"], name=d["name"], worker=worker, host=d["host"],
            token=d["token"], tls=tls, certfile=d["certfile"], keyfile=d["keyfile"],
            ca_file=self.ca_file if d["certfile"] else None, device=d["device"],
            max_batch_size=d["max_batch_size"], max_wait_ms=d["max_wait_ms"])
        replica.tls.remove()  # the kernel's copy: the endpoint has its own ca_file
        self._desc["inputs"] = replica.inputs
        return {"id": replica.id, "worker": replica.worker, "url": replica.url}

    def _route(self, replicas: list[dict[str, Any]]) -> None:
        router = self._desc["router"]
        backends = [router_side.Backend(r["id"], r["url"]) for r in replicas]
        _submit(self._client, router_side.set_backends, router["id"], backends,
                worker=router["worker"])


def _stop_replica(client: Any, replica: dict[str, Any]) -> bool:
    try:
        return bool(_submit(client, worker_side.stop_replica, replica["id"],
                            worker=replica["worker"], timeout=60))
    except Exception:
        return False  # its worker is gone: so is the replica


def serve(model: Any, *, name: str, cluster: Any = None, replicas: int = 1,
          max_batch_size: int = 32, max_wait_ms: float = 5.0, host: str | None = None,
          certfile: str | None = None, keyfile: str | None = None,
          device: str = "auto") -> Endpoint:
    """Serve ``model`` (anything :func:`mlc.score` takes) as ``name`` from ``replicas``
    replicas on ``cluster``'s workers, behind one router URL with TLS and a bearer token.

    ``host``: the address to bind (default each worker's own, 127.0.0.1 on a local
    cluster). TLS uses ``certfile``/``keyfile`` (readable on the workers) or a certificate
    generated for this endpoint. Batching: ``max_batch_size`` rows, ``max_wait_ms``.
    ``device="auto"`` uses each worker's GPU when it has one. Fails early, in one sentence,
    on bad input, leaving nothing running.
    """
    client = clusters.resolve_client(cluster)
    launch._check(name, "1", device, 16 * 2**20)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}.")
    if PREFIX + name in client.list_datasets():
        raise ValueError(f"an endpoint named {name!r} already runs on this cluster; close it"
                         " first (mlc.endpoints()) or pick another name.")
    workers = _workers(client)
    if not workers:
        raise ValueError("the cluster has no workers to run an endpoint on.")
    from distributed.comm import get_address_host

    hosts = sorted({get_address_host(w) for w in workers} | ({host} if host else set()))
    if certfile is not None or keyfile is not None:
        files = tls_files(certfile=certfile, keyfile=keyfile)
        with open(files.ca_file, "rb") as f:
            ca_pem = f.read()
        pair = None
    else:
        pair = self_signed(hosts)
        ca_pem = pair.cert_pem
    blob = ModelBlob.of(model)
    # The model stays on the cluster with the endpoint: replicas added later, from any
    # kernel, load it from there.
    (model_future,) = client.scatter([blob], hash=False)
    endpoint_id = uuid.uuid4().hex[:8]
    token = new_token()
    router_worker = workers[0]
    spec = router_side.RouterSpec(
        f"{name}-router-{endpoint_id}", name, token, ca_pem, check_hostname=pair is None,
        host=host, tls=pair, certfile=certfile if pair is None else None,
        keyfile=keyfile if pair is None else None)
    info: router_side.RouterInfo = _submit(client, router_side.start_router, spec,
                                           worker=router_worker)
    description: dict[str, Any] = {
        "id": endpoint_id, "name": name, "token": token, "ca_pem": ca_pem, "model": model_future,
        "router": {"id": info.id, "worker": info.worker, "url": info.url},
        "replicas": [], "inputs": [], "host": host, "tls": pair, "certfile": certfile,
        "keyfile": keyfile, "device": device, "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
    }
    endpoint = Endpoint(client, description)
    try:
        endpoint._publish()
        endpoint.scale(replicas)
    except BaseException:
        endpoint.close()
        raise
    return endpoint


def endpoints(cluster: Any = None) -> list[Endpoint]:
    """The endpoints running on ``cluster`` (a name, a handle or any ``Client`` of its
    scheduler), whoever started them; each can be called, scaled and closed from here."""
    client = clusters.resolve_client(cluster)
    found = []
    for dataset in sorted(client.list_datasets()):
        if isinstance(dataset, str) and dataset.startswith(PREFIX):
            found.append(Endpoint(client, client.get_dataset(dataset)))
    return found
