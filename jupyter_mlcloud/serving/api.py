"""From the kernel: an endpoint, one HTTPS URL over replicas on the cluster's workers.

:func:`serve` ships the model to the cluster once (the scheduler keeps it), starts the
replicas and a router on workers (see :mod:`.router`), all with one certificate and one
bearer token, and publishes the endpoint's state on the cluster (see :mod:`.control`). The
state holds no model bytes, only what another kernel needs to reach and manage the endpoint,
so :func:`endpoints` in any client of the same scheduler finds it and can scale, update,
roll back or close it. A controller on the scheduler (:mod:`.controller`) brings the router
back when its process dies, replaces replicas whose workers died, and autoscales.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..cluster import api as clusters
from ..monitoring.reference import Reference
from ..scoring.model import ModelBlob
from . import control, launch, usage
from . import router as router_side
from .batching import BatchOptions
from .protocol import DATATYPES, HEADER_LENGTH
from .security import new_token, self_signed, tls_files
from .watch import ALERT_TOPIC, MonitorOptions


def _replica_count(n: Any, what: str = "replicas") -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {n!r}.")
    return n


def _canary(share: Any) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"canary must be a share of the traffic in (0, 1], e.g. 0.1, got"
                         f" {share!r}.")
    return float(share)


def _source(model: Any) -> str:
    """How a version's model is named in listings."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return type(model).__name__


class Endpoint:
    """A served model: ``url`` (its router), ``token``, ``ca_file`` (the PEM verifying it),
    ``replicas`` (the workers serving it), ``versions`` (with their traffic weights). Call it
    with :meth:`predict`, or any Open Inference Protocol v2 client (tritonclient included) at
    ``url``.
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
        """The worker addresses of the live replicas (every version's)."""
        self._refresh_quietly()
        return [r["worker"] for r in control.all_replicas(self._desc)]

    @property
    def replica_info(self) -> list[dict[str, Any]]:
        """Each live replica's id, worker, URL and version (replicas take the endpoint's
        token too)."""
        self._refresh_quietly()
        return [{**r, "version": v["version"]} for v in self._desc["versions"]
                for r in v["replicas"]]

    @property
    def versions(self) -> list[dict[str, Any]]:
        """The live versions, oldest first: ``[{"version": 1, "weight": 0.9, "replicas": 2},
        ...]``; weights are shares of the traffic and sum to 1."""
        self._refresh_quietly()
        return control.summary(self._desc)

    @property
    def autoscale(self) -> tuple[int, int] | None:
        """``(min, max)`` replicas when the controller scales the endpoint, else None."""
        self._refresh_quietly()
        bounds = self._desc.get("autoscale")
        return (bounds["min"], bounds["max"]) if bounds else None

    @property
    def cost(self) -> Any:
        """What the endpoint's replicas have held so far (a :class:`~jupyter_mlcloud.cost.Cost`:
        ``worker_seconds``, ``gpu_seconds`` and, with ``mlcloud.cost.prices``, ``cost``):
        every replica counts from its start to its stop, whatever stopped it."""
        self._refresh_quietly()
        return usage.cost(self._desc)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran here."""
        return self._closed

    def infer_url(self, version: int | None = None) -> str:
        """The Open Inference Protocol infer URL of the endpoint's model (of one
        ``version`` if given)."""
        middle = f"/versions/{version}" if version is not None else ""
        return f"{self.url}/v2/models/{self.name}{middle}/infer"

    def __repr__(self) -> str:
        if self._closed:
            return f"<Endpoint {self.name!r} {self.url} closed>"
        parts = ", ".join(f"v{v['version']} {v['weight']:.0%} x{v['replicas']}"
                          for v in control.summary(self._desc))
        return f"<Endpoint {self.name!r} {self.url} {parts}>"

    # ----------------------------------------------------------------- calling it

    def _session(self) -> Any:
        import httpx

        if self._http is None:
            self._http = httpx.Client(
                headers={"Authorization": f"Bearer {self.token}"}, timeout=120.0,
                verify=ssl.create_default_context(cafile=self.ca_file))
        return self._http

    def predict(self, x: Any, version: int | None = None, return_id: bool = False) -> Any:
        """The model's outputs for rows ``x`` (numpy or a tensor), computed by the endpoint
        through its URL (Triton's binary tensors both ways), as a numpy array. ``version``:
        ask that version (default: the one the traffic weights pick). ``return_id``: also the
        request's id, for labels sent later with :meth:`feedback`."""
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
            self.infer_url(version), content=header + raw,
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
            result = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            result = np.frombuffer(body, dtype=dtype.newbyteorder("<"), offset=split).astype(
                dtype).reshape(out["shape"])
        return (result, str(doc["id"])) if return_id else result

    def stats(self) -> dict[str, Any]:
        """What the router measured: ``requests``, ``errors``, ``rps`` (over the last 10 s),
        ``p50_ms``, ``p95_ms``, ``p99_ms`` (over the last minute), ``batch_size_mean`` and
        ``batch_size_max``, ``in_flight`` and ``retries`` in total, and the same per version
        under ``versions`` (with each version's ``weight`` and ``replicas``); per replica id
        under ``replicas``: its version, requests, errors and requests in flight."""
        self._need_open("stats")
        self._refresh_quietly()
        router = self._desc["router"]
        figures = dict(launch.call(self._client, router_side.stats, router["id"],
                                   worker=router["worker"]))
        figures.pop("busy_s", None)
        counts = {str(v["version"]): v["replicas"] for v in control.summary(self._desc)}
        versions = {}
        for number, values in figures.get("versions", {}).items():
            values.pop("busy_s", None)
            versions[int(number) if number.isdigit() else number] = {
                **values, "replicas": counts.get(number, 0)}
        from . import watch

        for number, values in watch.version_quality(self._client, self._desc).items():
            versions.setdefault(number, {"replicas": counts.get(str(number), 0)})
            values.pop("kind", None)
            versions[number].update(values)
        figures["versions"] = versions
        figures["cost"] = usage.cost(self._desc).as_dict()
        return figures

    # ----------------------------------------------------------------- watching it

    def drift(self, version: int | None = None) -> Any:
        """How far the recent traffic of ``version`` (default: the main one) is from the
        reference: a DataFrame indexed by feature (inputs, then ``output_J``) with ``psi``,
        ``ks_stat``, ``p_value``, ``p_adjusted``, ``effect``, ``drifted`` and the sample
        sizes (see :mod:`..monitoring.drift`)."""
        from . import watch

        self._need_open("drift")
        self._refresh_quietly()
        return watch.drift(self._client, self._desc, version)

    def feedback(self, request_ids: Any, labels: Any) -> int:
        """Labels that arrived later, one per request id (a value, or one per row of a
        request of several rows); they become each version's quality in :meth:`stats`
        (``accuracy`` for classification, ``rmse`` and ``mae`` for regression). Returns how
        many requests were joined (the replicas remember the last ones they answered)."""
        from . import watch

        self._need_open("feedback")
        self._refresh_quietly()
        ids = [str(i) for i in ([request_ids] if isinstance(request_ids, str) else request_ids)]
        values = list(np.asarray(labels, dtype=object)) if not isinstance(labels, list) \
            else labels
        return watch.feedback(self._client, self._desc, ids, values)

    @property
    def alerts(self) -> list[dict[str, Any]]:
        """The endpoint's recent alerts (drift that started, quality past its threshold),
        oldest first: ``kind``, ``version``, ``features``, ``message``, ``time``."""
        self._refresh_quietly()
        return list(self._desc.get("alerts") or [])

    def on_alert(self, callback: Any) -> None:
        """Call ``callback(alert)`` (a dict as in :attr:`alerts`) on each new alert of this
        endpoint, from a thread of this process, while it runs: retrain, register and
        :meth:`update` with a canary, for instance."""
        if not callable(callback):
            raise ValueError(f"on_alert needs a function taking the alert, got"
                             f" {type(callback).__name__}.")
        _listen(self._client).setdefault(self.name, []).append(callback)

    # ----------------------------------------------------------------- managing it

    def scale(self, n: int) -> None:
        """Run ``n`` replicas of the main version (the one taking the most traffic). New
        ones join the router once they answer; removed ones leave it first and are stopped
        once their requests are done, so none is lost. Turns autoscaling off."""
        self._need_open("scale")
        _replica_count(n)
        with self._editing() as state:
            state["autoscale"] = None
            control.set_replicas(self._client, state, control.primary(state), n)

    def update(self, model: Any, canary: float = 1.0, replicas: int | None = None) -> None:
        """Serve ``model`` (anything :func:`serve` takes) as a new version. It gets
        ``canary`` of the traffic (0.1: every tenth request) once its ``replicas`` (default:
        as many as the main version has) answer; the other versions keep the rest in
        proportion. ``canary=1.0`` replaces the old versions (drained, then stopped).
        Then :meth:`promote` or :meth:`rollback`."""
        self._need_open("update")
        share = _canary(canary)
        blob = ModelBlob.of(model)
        with self._editing() as state:
            count = (_replica_count(replicas) if replicas is not None
                     else max(len(control.primary(state)["replicas"]), 1))
            control.add_version(self._client, state, blob, _source(model), share, count)

    def promote(self) -> None:
        """All traffic to the newest version; the older ones are drained and stopped."""
        self._need_open("promote")
        with self._editing() as state:
            control.promote(self._client, state)

    def rollback(self) -> None:
        """Back to the previous version: the newest is drained and stopped, and the others
        take its traffic (or, after a promote, the version before it starts again)."""
        self._need_open("rollback")
        with self._editing() as state:
            control.rollback(self._client, state)

    def set_autoscale(self, bounds: str | tuple[int, int] | None, **options: float) -> None:
        """Let the controller scale the main version between ``bounds`` replicas
        (``"MIN:MAX"``), following requests in flight per replica; None turns it off. See
        :mod:`.autoscale` for ``options`` (``target``, ``up_delay_s``, ``down_delay_s``)."""
        from .autoscale import AutoscalePolicy

        self._need_open("set_autoscale")
        policy = AutoscalePolicy.parse(bounds, **options) if bounds is not None else None
        with self._editing() as state:
            state["autoscale"] = policy.as_dict() if policy else None
            if policy is not None:
                main = control.primary(state)
                n = min(max(len(main["replicas"]), policy.min), policy.max)
                control.set_replicas(self._client, state, main, n)

    def close(self) -> None:
        """Stop the router and every replica, free their ports, and forget the endpoint on
        the cluster. Closing again (here or from another kernel) is a no-op."""
        if self._closed:
            return
        self._closed = True
        if self._http is not None:
            self._http.close()
        try:
            with self._editing() as state:
                control.close(self._client, state)
        except LookupError:
            pass  # closed by another client already: its processes are gone too
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

    @contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        """The endpoint's newest state under its lock (see :func:`control.editing`); this
        handle sees what the block left."""
        with control.editing(self._client, self.name, self._desc["id"]) as state:
            self._desc = state
            yield state

    def _refresh_quietly(self) -> None:
        """Read the newest state, keeping the last one known if the endpoint is gone."""
        if self._closed:
            return
        try:
            state = control.read(self._client, self.name)
        except LookupError:
            return
        if state["id"] == self._desc["id"]:
            self._desc = state


_alert_callbacks: dict[str, dict[str, list[Any]]] = {}  # client id: endpoint: callbacks


def _listen(client: Any) -> dict[str, list[Any]]:
    """This client's alert callbacks by endpoint, subscribed to the alert topic once."""
    if client.id in _alert_callbacks:
        return _alert_callbacks[client.id]
    callbacks: dict[str, list[Any]] = {}
    _alert_callbacks[client.id] = callbacks

    def on_event(event: tuple[float, Any]) -> None:
        alert = dict(event[1])
        for callback in list(callbacks.get(alert.get("endpoint", ""), ())):
            threading.Thread(target=callback, args=(alert,), daemon=True,
                             name="mlcloud-endpoint-alert").start()

    client.subscribe_topic(ALERT_TOPIC, on_event)
    return callbacks


_growing: dict[str, Any] = {}  # client id: the cluster handle scaled on the controller's asks


def _grow_on_request(handle: Any) -> None:
    """Scale ``handle``'s cluster up when the endpoint controller asks for workers (once per
    client; only up: workers an endpoint no longer uses are the cluster's to retire)."""
    from .controller import SCALE_TOPIC

    if handle.client.id in _growing:
        return
    _growing[handle.client.id] = handle

    def on_request(event: tuple[float, Any]) -> None:
        wanted = int(event[1]["workers"])

        def grow() -> None:
            try:
                have = len(control.workers(handle.client))
                if wanted > have:
                    handle.scale(wanted)
            except Exception:  # a closed cluster: nothing to grow
                pass

        threading.Thread(target=grow, name="mlcloud-endpoint-grow", daemon=True).start()

    handle.client.subscribe_topic(SCALE_TOPIC, on_request)


def _follow(model: Any, canary: float) -> tuple[dict[str, Any] | None, str]:
    """What the controller needs to follow a ``models:/NAME@ALIAS`` model (None for any
    other model), and the served version's name in listings."""
    from ..tracking import registry

    target = registry.alias_of(model)
    if target is None:
        return None, _source(model)
    from ..tracking import store

    uri = store.tracking_uri()
    version = registry.alias_version(*target, uri)
    follow = {"uri": model, "tracking_uri": uri, "version": version, "canary": canary}
    return follow, f"models:/{target[0]}/{version} (@{target[1]})"


def serve(model: Any, *, name: str, cluster: Any = None, replicas: int = 1,
          autoscale: str | tuple[int, int] | None = None, max_batch_size: int = 32,
          max_wait_ms: float = 5.0, max_queue: int = 256, slo_ms: float | None = None,
          host: str | None = None, certfile: str | None = None, keyfile: str | None = None,
          device: str = "auto", canary: float = 1.0, reference: Any = None,
          monitor: dict[str, Any] | None = None, track: bool = True) -> Endpoint:
    """Serve ``model`` (anything :func:`mlc.score` takes, ``models:/name@alias`` included)
    as ``name`` from ``replicas`` replicas on ``cluster``'s workers, behind one router URL
    with TLS and a bearer token.

    ``autoscale="MIN:MAX"``: the controller scales the replicas between those bounds instead
    (see :mod:`.autoscale`). Batching per replica: ``max_batch_size`` rows, ``max_wait_ms``,
    at most ``max_queue`` requests waiting, and 503 when the estimated wait passes
    ``slo_ms``. ``host``: the address to bind (default each worker's own, 127.0.0.1 on a
    local cluster). TLS uses ``certfile``/``keyfile`` (readable on the workers) or a
    certificate generated for this endpoint. ``device="auto"`` uses each worker's GPU when
    it has one. Fails early, in one sentence, on bad input, leaving nothing running.

    A ``models:/NAME@ALIAS`` endpoint follows the alias: when it moves to another registered
    version, that version is rolled out as :meth:`Endpoint.update` would, taking ``canary``
    of the traffic (1.0: all of it, replacing the old one).

    ``reference``: a sample of inputs (array, DataFrame, xarray object or dask collection) to
    watch the traffic against: :meth:`Endpoint.drift`, alerts (:meth:`Endpoint.on_alert`).
    A registered model's reference (``ctx.keep_reference``, ``mlc.register(reference=)``)
    is used when none is given.
    ``monitor``: how (see :class:`.watch.MonitorOptions`: ``rows``, ``seconds``, ``alpha``,
    ``min_effect``, ``min_accuracy``, ``max_rmse``, ``every_s``).

    ``track``: record the endpoint in MLflow (a run ``serve-<name>`` in the store in force):
    its alerts as they come, and what its replicas held (``worker_seconds``, ``gpu_seconds``,
    ``cost``) when it closes.
    """
    from .autoscale import AutoscalePolicy
    from .controller import ensure_controller

    client = clusters.resolve_client(cluster)
    handle = cluster if isinstance(cluster, clusters.ClusterHandle) else (
        clusters.get(cluster) if cluster is None or isinstance(cluster, str) else None)
    launch._check(name, "1", device, 16 * 2**20)
    _replica_count(replicas)
    BatchOptions(max_batch_size, max_wait_ms, max_queue, slo_ms)  # checks them
    policy = AutoscalePolicy.parse(autoscale) if autoscale is not None else None
    share = _canary(canary)
    watching = MonitorOptions.parse(monitor) if monitor is not None else None
    sample = Reference.of(reference) if reference is not None else None
    if control.dataset(name) in client.list_datasets():
        raise ValueError(f"an endpoint named {name!r} already runs on this cluster; close it"
                         " first (mlc.endpoints()) or pick another name.")
    workers = control.workers(client)
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
    if sample is None and isinstance(model, str) and model.startswith(("models:/", "runs:/")):
        from ..tracking import registry

        sample = registry.reference_of(model)  # logged with the version: watched by default
    if sample is None and watching is not None:
        raise ValueError("monitor= needs a reference= sample to compare the traffic with (or"
                         " a registered model that keeps one).")
    if sample is not None and watching is None:
        watching = MonitorOptions()
    if not isinstance(track, bool):
        raise ValueError(f"track must be True or False, got {track!r}.")
    tracking = None
    if track:  # alerts and the final cost are recorded in MLflow, where the runs are
        from ..tracking import store

        tracking = {"uri": store.tracking_uri(), "experiment": store.experiment_name()}
        # Made here, once: a new SQLite store set up by two processes at once can fail.
        store.experiment_id(store.client(tracking["uri"]), tracking["experiment"])
    follow, source = _follow(model, share)
    ensure_controller(client)
    if policy is not None and handle is not None and handle.cluster is not None:
        _grow_on_request(handle)
    endpoint_id = uuid.uuid4().hex[:8]
    token = new_token()
    spec = router_side.RouterSpec(
        f"{name}-router-{endpoint_id}", name, token, ca_pem, check_hostname=pair is None,
        host=host, tls=pair, certfile=certfile if pair is None else None,
        keyfile=keyfile if pair is None else None)
    info: router_side.RouterInfo = launch.call(client, router_side.start_router, spec,
                                               worker=workers[0])
    state: dict[str, Any] = {
        "id": endpoint_id, "name": name, "token": token, "ca_pem": ca_pem,
        "router": {"id": info.id, "worker": info.worker, "url": info.url, "port": info.port,
                   "spec": spec},
        "versions": [], "inputs": [], "host": host, "tls": pair, "certfile": certfile,
        "keyfile": keyfile, "device": device, "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms, "max_queue": max_queue, "slo_ms": slo_ms,
        "autoscale": policy.as_dict() if policy else None, "created": time.time(),
        "follow": follow, "monitor": watching.as_dict() if watching else None, "alerts": [],
        "tracking": tracking,
    }
    control.publish(client, state)
    if sample is not None:
        control.keep_reference(client, name, sample)
    endpoint = Endpoint(client, state)
    try:
        with endpoint._editing() as current:
            first = policy.min if policy else replicas
            control.add_version(client, current, blob, source, 1.0, first)
    except BaseException:
        endpoint.close()
        raise
    return endpoint


def endpoints(cluster: Any = None) -> list[Endpoint]:
    """The endpoints running on ``cluster`` (a name, a handle or any ``Client`` of its
    scheduler), whoever started them; each can be called, scaled, updated and closed from
    here."""
    client = clusters.resolve_client(cluster)
    found = []
    for name in control.names(client):
        try:
            found.append(Endpoint(client, control.read(client, name)))
        except LookupError:
            continue  # closed meanwhile
    return found
