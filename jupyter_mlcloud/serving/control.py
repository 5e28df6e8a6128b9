"""An endpoint's state on the cluster, and every change to it.

The state is a plain dict published as the Dask dataset ``mlcloud-endpoint-<name>``: the
router (where it runs, and its spec, to start it again), the versions (each with its weight
and its replicas), the token, the certificate and the batching options. It holds no model
bytes, so any client of the scheduler reads it cheaply. Each version's model is published
apart (``mlcloud-endpoint-model-<name>-<version>``), so the scheduler keeps its bytes: a
replica can always be started again, even after every worker that had the model died (worker
memory would not do: Dask's memory manager keeps one copy of a key, on one worker).

Whoever changes it (a kernel's :class:`~.api.Endpoint`, the server extension, the CLI, or
the :mod:`.controller` that heals and autoscales) does so inside :func:`editing`, which holds a
cluster-wide lock on the endpoint, reads the newest state and publishes what the block left.
So two kernels scaling the same endpoint, or a kernel and the controller, never overwrite
each other.

Traffic moves in an order that loses no request: replicas start and answer before the
router sends them anything; the router stops sending to replicas before they stop, and
waits for their requests in flight (:func:`~.router.set_backends`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..cluster import info as cluster_info
from ..cost import cpu_kind, worker_kind
from . import host as worker_side
from . import launch, usage
from . import router as router_side

PREFIX = "mlcloud-endpoint-"
MODEL_PREFIX = "mlcloud-endpoint-model-"  # not a PREFIX name: "model-" is no endpoint name
#: How many versions keep their model on the cluster (for rollback); older ones drop it.
KEPT_MODELS = 3
LOCK_TIMEOUT_S = 300.0


def dataset(name: str) -> str:
    """The Dask dataset holding endpoint ``name``'s state."""
    return PREFIX + name


def workers(client: Any) -> list[str]:
    """The scheduler's workers now, sorted."""
    return sorted(client.scheduler_info(n_workers=-1).get("workers", {}))


def names(client: Any) -> list[str]:
    """The endpoints published on ``client``'s scheduler."""
    return sorted(d[len(PREFIX):] for d in client.list_datasets()
                  if isinstance(d, str) and d.startswith(PREFIX)
                  and not d.startswith(MODEL_PREFIX))


def read(client: Any, name: str) -> dict[str, Any]:
    """Endpoint ``name``'s state; LookupError if it does not run."""
    if dataset(name) not in client.list_datasets():
        raise LookupError(f"endpoint {name!r} no longer runs on this cluster.")
    return dict(client.get_dataset(dataset(name)))


def publish(client: Any, state: dict[str, Any]) -> None:
    """Make ``state`` the endpoint's published state, in one step: a reader in between an
    unpublish and a publish would take the endpoint for gone."""
    client.publish_dataset(**{dataset(state["name"]): state}, override=True)


def unpublish(client: Any, name: str) -> None:
    """Forget endpoint ``name`` on the cluster, its models included."""
    keys = [d for d in client.list_datasets() if d == dataset(name)
            or (isinstance(d, str) and d.startswith(f"{MODEL_PREFIX}{name}-"))]
    for key in keys:
        client.unpublish_dataset(key)


def _model_key(name: str, version: int) -> str:
    return f"{MODEL_PREFIX}{name}-{version}"


def keep_model(client: Any, name: str, version: int, blob: Any) -> None:
    """Keep ``blob`` (a :class:`ModelBlob`) on the scheduler as ``version``'s model."""
    client.publish_dataset(**{_model_key(name, version): blob}, override=True)


def _reference_key(name: str) -> str:
    return f"{MODEL_PREFIX}{name}-reference"  # under the model prefix: forgotten with them


def keep_reference(client: Any, name: str, reference: Any) -> None:
    """Keep ``reference`` (a :class:`~..monitoring.reference.Reference`) on the scheduler as
    what endpoint ``name``'s inputs are compared with."""
    client.publish_dataset(**{_reference_key(name): reference}, override=True)


def reference(client: Any, name: str) -> Any:
    """Endpoint ``name``'s reference sample; None without one."""
    key = _reference_key(name)
    return client.get_dataset(key) if key in client.list_datasets() else None


def _drop_model(client: Any, name: str, version: int) -> None:
    key = _model_key(name, version)
    if key in client.list_datasets():
        client.unpublish_dataset(key)


@contextmanager
def editing(client: Any, name: str, endpoint_id: str | None = None
            ) -> Iterator[dict[str, Any]]:
    """Hold the endpoint's lock and yield its newest state; what the block leaves in it is
    published when the block ends, by an error too (every step records a replica once it
    runs and forgets it once it stopped, so the state never loses a running process).
    LookupError if the endpoint is gone (or, with ``endpoint_id``, replaced by another of the
    same name)."""
    from distributed import Lock

    lock = Lock(f"mlcloud-endpoint-lock-{name}", scheduler_rpc=client.scheduler,
                loop=client.loop)
    if not lock.acquire(timeout=LOCK_TIMEOUT_S):
        raise TimeoutError(f"endpoint {name!r} is being changed by another client; try again.")
    try:
        state = read(client, name)
        if endpoint_id is not None and state["id"] != endpoint_id:
            raise LookupError(f"endpoint {name!r} was replaced by another.")
        before = {r["id"]: dict(r) for r in all_replicas(state)}
        try:
            yield state
        finally:
            usage.settle(before, state)  # the seconds of the replicas this edit stopped
            if state.get("closed"):
                unpublish(client, name)
            else:
                publish(client, state)
    finally:
        lock.release()


# ---------------------------------------------------------------- what the state says


def live(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The versions with replicas, oldest first."""
    return [v for v in state["versions"] if v["replicas"]]


def wanted(version: dict[str, Any]) -> int:
    """How many replicas ``version`` should run: what it was served, scaled or rolled back
    with, kept apart from the list of those running so that a replacement that failed is
    tried again."""
    return int(version.get("wanted", len(version["replicas"])))


def primary(state: dict[str, Any]) -> dict[str, Any]:
    """The live version taking the most traffic (the newest on a tie)."""
    versions = live(state) or state["versions"][-1:]
    return max(versions, key=lambda v: (v["weight"], v["version"]))


def summary(state: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"version", "weight", "replicas"}]`` of the live versions, oldest first."""
    return [{"version": v["version"], "weight": round(v["weight"], 6),
             "replicas": len(v["replicas"])} for v in live(state)]


def all_replicas(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every replica of every live version."""
    return [r for v in state["versions"] for r in v["replicas"]]


# ---------------------------------------------------------------- replicas and routing


@contextmanager
def _ca_file(state: dict[str, Any]) -> Iterator[str | None]:
    """A file with the endpoint's PEM, for user-given certificates (none needed otherwise)."""
    if not state["certfile"]:
        yield None
        return
    directory = tempfile.mkdtemp(prefix="mlcloud-ca-")
    path = os.path.join(directory, "ca.pem")
    with open(path, "wb") as f:
        f.write(state["ca_pem"])
    try:
        yield path
    finally:
        os.remove(path)
        os.rmdir(directory)


def start_replicas(client: Any, state: dict[str, Any], version: dict[str, Any], n: int
                   ) -> list[dict[str, Any]]:
    """Start ``n`` more replicas of ``version`` (each on the worker serving the fewest of the
    endpoint's replicas) and add them to it; they answer before this returns. Not routed yet.
    """
    if not version.get("model"):
        raise ValueError(f"version {version['version']} of endpoint {state['name']!r} no longer"
                         " keeps its model on the cluster; serve it again with update().")
    key = _model_key(state["name"], version["version"])
    if key not in client.list_datasets():
        raise ValueError(f"the model of version {version['version']} of endpoint"
                         f" {state['name']!r} is gone from the scheduler.")
    blob = client.get_dataset(key)
    from ..monitoring.window import WindowOptions

    monitor = state.get("monitor") or {}
    sample = reference(client, state["name"]) if monitor else None
    window = WindowOptions(**monitor["window"]) if monitor else WindowOptions()
    started = []
    try:
        kinds = {w: worker_kind(i) for w, i in cluster_info.workers(client).items()}
    except Exception:  # the cost only: a replica starts without it
        kinds = {}
    for _ in range(n):
        alive = workers(client)
        if not alive:
            raise ValueError("the cluster has no workers to run a replica on.")
        load = {w: 0 for w in alive}
        for r in all_replicas(state):
            if r["worker"] in load:
                load[r["worker"]] += 1
        worker = min(alive, key=lambda w: (load[w], w))
        with _ca_file(state) as ca_file:
            replica = launch.start_replica(
                client, blob, name=state["name"], version=version["version"],
                worker=worker, host=state["host"], token=state["token"], tls=state["tls"],
                certfile=state["certfile"], keyfile=state["keyfile"], ca_file=ca_file,
                device=state["device"], max_batch_size=state["max_batch_size"],
                max_wait_ms=state["max_wait_ms"], max_queue=state["max_queue"],
                slo_ms=state["slo_ms"], reference=sample, window=window)
        replica.tls.remove()  # this client's copy: clients verify with the endpoint's PEM
        state["inputs"] = replica.inputs
        entry = {"id": replica.id, "worker": replica.worker, "url": replica.url}
        usage.started(entry, kinds.get(replica.worker, cpu_kind()))
        version["replicas"].append(entry)
        started.append(entry)
    return started


def stop_replica(client: Any, replica: dict[str, Any]) -> bool:
    """Stop one replica on its worker; False if it (or its worker) was gone already."""
    try:
        return bool(launch.call(client, worker_side.stop_replica, replica["id"],
                                worker=replica["worker"], timeout=launch.STOP_TIMEOUT_S))
    except Exception:
        return False


def route(client: Any, state: dict[str, Any]) -> None:
    """Tell the router the live replicas and the versions' weights; returns once replicas
    no longer listed have no request in flight."""
    router = state["router"]
    backends = [router_side.Backend(r["id"], r["url"], str(v["version"]))
                for v in state["versions"] for r in v["replicas"]]
    weights = {str(v["version"]): v["weight"] for v in live(state)}
    launch.call(client, router_side.set_backends, router["id"], backends, weights,
                worker=router["worker"])


def retire(client: Any, state: dict[str, Any], versions: list[dict[str, Any]]) -> None:
    """Take ``versions`` out of traffic (weight 0, no replicas), drain and stop their replicas."""
    before = [(v, v["weight"], v["replicas"]) for v in versions]
    for v in versions:
        v["weight"], v["replicas"] = 0.0, []
    _route_or_restore(client, state, before)
    for v in versions:
        v["wanted"] = 0
    for _, _, replicas in before:
        for replica in replicas:
            stop_replica(client, replica)


def _route_or_restore(client: Any, state: dict[str, Any],
                      before: list[tuple[dict[str, Any], float, list[dict[str, Any]]]]) -> None:
    """:func:`route`; if the router cannot be told, the versions get their weights and
    replicas back (they still run, and still get traffic)."""
    try:
        route(client, state)
    except BaseException:
        for v, weight, replicas in before:
            v["weight"], v["replicas"] = weight, replicas
        raise


def normalize(state: dict[str, Any]) -> None:
    """Make the live versions' weights sum to 1 (the primary takes all if they sum to 0)."""
    versions = live(state)
    total = sum(v["weight"] for v in versions)
    if versions and total <= 0:
        versions[-1]["weight"] = 1.0
        total = 1.0
    for v in versions:
        v["weight"] = v["weight"] / total
    for v in state["versions"]:
        if not v["replicas"]:
            v["weight"] = 0.0


def drop_old_models(client: Any, state: dict[str, Any]) -> None:
    """Keep models on the cluster for the newest versions only (rollback needs them)."""
    for v in state["versions"][:-KEPT_MODELS]:
        if not v["replicas"] and v["model"]:
            _drop_model(client, state["name"], v["version"])
            v["model"] = False


def set_replicas(client: Any, state: dict[str, Any], version: dict[str, Any], n: int) -> None:
    """Run ``n`` replicas of ``version``: new ones join once they answer; removed ones leave
    the router first and stop once their requests are done, so none is lost."""
    current = version["replicas"]
    version["wanted"] = n
    if n > len(current):
        start_replicas(client, state, version, n - len(current))
        route(client, state)
    elif n < len(current):
        leaving = current[n:]
        version["replicas"] = current[:n]
        _route_or_restore(client, state, [(version, version["weight"], current)])
        for replica in leaving:
            stop_replica(client, replica)


def add_version(client: Any, state: dict[str, Any], blob: Any, source: str, canary: float,
                replicas: int) -> dict[str, Any]:
    """Start a new version of ``blob`` (a :class:`ModelBlob`) with ``replicas`` replicas and
    give it ``canary`` of the traffic (the others keep the rest in proportion; with 1.0 they
    are retired)."""
    number = max((v["version"] for v in state["versions"]), default=0) + 1
    version: dict[str, Any] = {"version": number, "weight": 0.0, "model": True,
                               "source": source, "replicas": [], "wanted": replicas}
    keep_model(client, state["name"], number, blob)
    state["versions"].append(version)
    try:
        start_replicas(client, state, version, replicas)
    except BaseException:
        for replica in version["replicas"]:
            stop_replica(client, replica)
        state["versions"].remove(version)
        _drop_model(client, state["name"], number)
        raise
    others = [v for v in live(state) if v is not version]
    for v in others:
        v["weight"] *= 1.0 - canary
    version["weight"] = canary
    normalize(state)
    route(client, state)
    if canary >= 1.0 and others:
        retire(client, state, others)
    drop_old_models(client, state)
    return version


def promote(client: Any, state: dict[str, Any]) -> dict[str, Any]:
    """All traffic to the newest live version; the others are drained and stopped."""
    versions = live(state)
    if not versions:
        raise ValueError(f"endpoint {state['name']!r} has no live version to promote.")
    newest = versions[-1]
    newest["weight"] = 1.0
    retire(client, state, versions[:-1])
    normalize(state)
    return newest


def rollback(client: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Back to the previous version: the newest live one is drained and stopped; the other
    live ones take its traffic, or, with none left, the last version before it that was not
    itself rolled back is started again."""
    versions = live(state)
    if not versions:
        raise ValueError(f"endpoint {state['name']!r} has no live version to roll back.")
    newest = versions[-1]
    rest = versions[:-1]
    if not rest:
        earlier = [v for v in state["versions"]
                   if v["version"] < newest["version"] and not v.get("rolled_back")]
        if not earlier:
            raise ValueError(f"endpoint {state['name']!r} has only version"
                             f" {newest['version']}: there is nothing to roll back to.")
        previous = earlier[-1]
        start_replicas(client, state, previous, len(newest["replicas"]))
        previous["wanted"] = len(previous["replicas"])
        rest = [previous]
    for v in rest:
        v["weight"] = v["weight"] or 1.0 / len(rest)
    newest["weight"] = 0.0
    normalize(state)
    retire(client, state, [newest])
    newest["rolled_back"] = True  # never the version a later rollback goes back to
    normalize(state)
    return rest[-1]


def close(client: Any, state: dict[str, Any]) -> None:
    """Stop the router and every replica; the state is marked closed (unpublished by
    :func:`editing`)."""
    router = state["router"]
    try:
        launch.call(client, router_side.stop_router, router["id"], worker=router["worker"],
                    timeout=launch.STOP_TIMEOUT_S)
    except TimeoutError as e:
        warnings.warn(f"endpoint {state['name']!r}: its router may still run: {e}",
                      stacklevel=3)
    except Exception:
        pass  # its worker is gone: so is the router
    finally:
        for replica in all_replicas(state):
            stop_replica(client, replica)
        state["closed"] = True
        _record_cost(state)


def _record_cost(state: dict[str, Any]) -> None:
    """What the closed endpoint's replicas held, in its MLflow run (when it is tracked); a
    store that refuses it costs a warning, never the close."""
    tracking = state.get("tracking")
    if not tracking:
        return
    from ..tracking.alerts import log_cost

    try:
        log_cost(tracking["uri"], tracking["experiment"], state["name"],
                 usage.cost(state).as_dict())
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"the cost of endpoint {state['name']!r} could not be recorded in"
                      f" MLflow ({e}).", stacklevel=3)
