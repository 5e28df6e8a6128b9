"""Start, connect, scale, adapt and close Dask clusters.

``up()`` picks ``dask_cuda.LocalCUDACluster`` when NVML sees GPUs, else a process-based
``distributed.LocalCluster``; or it builds any Dask cluster class named by the Dask config
key ``mlcloud.cluster.factory`` (how Slurm, Kubernetes and Dask-Gateway plug in); or it
connects to an address, scheduler file, ``Cluster`` or ``Client``. Every cluster gets a
discovery file (see :mod:`jupyter_mlcloud.cluster.discovery`) for as long as it lives.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib
import os
import re
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dask
from dask.utils import format_bytes, parse_bytes, parse_timedelta

from . import discovery, revive
from . import info as cluster_info
from .discovery import ClusterRecord
from .hardware import gpu_count
from .tls import ClusterCertificates

if TYPE_CHECKING:
    import pandas as pd

KINDS = ("local-cpu", "local-gpu", "factory", "remote")
FACTORY_KEY = "mlcloud.cluster.factory"

_lock = threading.RLock()
_registry: dict[str, ClusterHandle] = {}  # this process's clusters, by name
_current: list[str] = []  # names, most recent last


class ClusterHandle:
    """One cluster this process started or attached to.

    ``.client`` is a ``distributed.Client`` on it; ``.cluster`` the Dask ``Cluster`` object
    when there is one (``None`` when attached by address). Use as a context manager to
    close it on exit.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        client: Any,
        cluster: Any = None,
        *,
        owned: bool,
        record: ClusterRecord | None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.client = client
        self.cluster = cluster
        self.owned = owned  # closing the handle closes the cluster itself
        self._record = record  # the discovery file this handle wrote, if any
        self._closed = False

    @property
    def address(self) -> str:
        """The scheduler's address."""
        return str(self.client.scheduler.address)

    @property
    def dashboard_link(self) -> str | None:
        """URL of the Dask dashboard, when the scheduler serves one."""
        try:
            return str(self.client.dashboard_link)
        except Exception:
            return None

    @property
    def closed(self) -> bool:
        return self._closed

    def info(self) -> dict[str, Any]:
        """Live figures: name, kind, workers, threads, memory (bytes), gpus, dashboard."""
        workers = cluster_info.workers(self.client)
        return {
            "name": self.name,
            "kind": self.kind,
            "address": self.address,
            **cluster_info.summarize(workers),
            "dashboard": self.dashboard_link,
        }

    def scale(self, n: int) -> None:
        """Ask for ``n`` workers (stops adaptive scaling)."""
        _check_count("scale", n, minimum=0)
        self._need_cluster("scale")
        self.cluster.scale(n)

    def adapt(self, minimum: int, maximum: int) -> None:
        """Let the cluster scale itself between ``minimum`` and ``maximum`` workers."""
        minimum, maximum = parse_adapt((minimum, maximum))
        self._need_cluster("adapt")
        self.cluster.adapt(minimum=minimum, maximum=maximum)

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        """Block until ``n`` workers are connected (``TimeoutError`` after ``timeout`` s)."""
        self.client.wait_for_workers(n, timeout=timeout)

    def close(self) -> None:
        """Close the client (and the cluster, if this process started it). Idempotent."""
        with _lock:
            if self._closed:
                return
            self._closed = True
            _registry.pop(self.name, None)
            if self.name in _current:
                _current.remove(self.name)
        try:
            # Out of every listing first: closing a cluster's workers can take seconds.
            if self._record is not None:
                discovery.remove(self.name, pid=self._record.pid)
        finally:
            if self.owned or self._client_is_ours:
                self.client.close()
            if self.owned and self.cluster is not None:
                self.cluster.close()

    # A Client handed to connect() belongs to the caller; one we made is ours to close.
    _client_is_ours = True

    def _need_cluster(self, action: str) -> None:
        if self.cluster is None:
            raise ValueError(
                f"cluster {self.name!r} was attached by address, so it cannot {action} from"
                " here; do it where the cluster was started, or connect with its Cluster object."
            )

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.address
        return f"<ClusterHandle {self.name!r} {self.kind} {state}>"


# ---------------------------------------------------------------- validation


def _check_count(option: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}.")
    return value


def parse_adapt(value: Any) -> tuple[int, int]:
    """``"MIN:MAX"`` or ``(MIN, MAX)`` -> ``(MIN, MAX)`` with ``0 <= MIN <= MAX`` and MAX >= 1."""
    pair: tuple[Any, ...] | None = None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        pair = (int(match.group(1)), int(match.group(2))) if match else None
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(value)
    ok = (
        pair is not None
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        and 0 <= pair[0] <= pair[1]
        and pair[1] >= 1
    )
    if not ok:
        raise ValueError(
            f"adapt must be MIN:MAX with whole numbers 0 <= MIN <= MAX and MAX >= 1, got {value!r}."
        )
    assert pair is not None
    return int(pair[0]), int(pair[1])


def _check_memory_limit(value: Any) -> str | int | float | None:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and value > 0:
        return value
    elif isinstance(value, float) and 0 < value <= 1:
        return value  # a fraction of the machine's memory, as Dask allows
    elif isinstance(value, str):
        try:
            if parse_bytes(value) > 0:
                return value
        except ValueError:
            pass
    raise ValueError(
        f"memory_limit {value!r} is not understood; use 'auto', a size such as '4GiB',"
        " a byte count, or a fraction between 0 and 1."
    )


def _factory_spec() -> Mapping[str, Any] | None:
    spec = dask.config.get(FACTORY_KEY, default=None)
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or not spec.get("module") or not spec.get("class"):
        raise ValueError(
            f"Dask config {FACTORY_KEY} must be a mapping with 'module' and 'class' (and optional"
            f" 'args', 'kwargs'), got {spec!r}."
        )
    return spec


def _free_name() -> str:
    taken = {r.name for r in discovery.list_records()} | set(_registry)
    i = 1
    while f"cluster-{i}" in taken:
        i += 1
    return f"cluster-{i}"


def _check_free_name(name: str) -> None:
    discovery.check_name(name)
    if name in _registry:
        raise ValueError(
            f"a cluster named {name!r} already exists in this process; choose another name or"
            " shut it down first."
        )


# ---------------------------------------------------------------- starting


def _local_worker_defaults() -> None:
    """Keep Dask's nanny from setting MALLOC_TRIM_THRESHOLD_ for local workers.

    The nanny's default (65536) roughly halves torch throughput per worker, and it is
    also written into this process's environment, whence later workers inherit it.
    """
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":
        del os.environ["MALLOC_TRIM_THRESHOLD_"]


# Dask's event-loop health tick runs every 20 ms in each server. A local cluster's scheduler and
# nannies live in this process (the kernel): their ticks cost about 3 % of a core at rest, taken
# from the ranks of a run on the same machine. Half a second still reports a stuck loop
# (``distributed.admin.tick.limit``, 3 s by default) in time.
LOCAL_TICK_S = 0.5


def _start_local(
    kind: str,
    workers: int | None,
    threads_per_worker: int | None,
    memory_limit: Any,
    security: Any,
    gpus: int,
) -> Any:
    _local_worker_defaults()
    common: dict[str, Any] = {
        "threads_per_worker": threads_per_worker or 1,
        "dashboard_address": ":0",  # a free port: several clusters can live side by side
    }
    if memory_limit is not None:
        common["memory_limit"] = memory_limit
    if security is not None:
        common.update(security=security, protocol="tls://")
    import distributed  # noqa: F401 - its config defaults, which the block below must not drop

    configured = dask.config.get("distributed.admin.tick.interval")
    tick = max(LOCAL_TICK_S, parse_timedelta(configured))  # a slower tick set by the user stays
    # Read when each server starts: the scheduler, the nannies and (from their nanny's copy of
    # the config) the workers. A rank slows its worker's tick itself while it runs.
    with dask.config.set({"distributed.admin.tick.interval": f"{tick}s"}):
        if kind == "local-gpu":
            from dask_cuda import LocalCUDACluster

            n = workers or gpus
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = [d for d in visible.split(",") if d.strip()] if visible else list(range(gpus))
            devices_str = ",".join(str(d) for d in devices[:n])
            cluster = LocalCUDACluster(n_workers=n, CUDA_VISIBLE_DEVICES=devices_str, **common)
        else:
            from dask.system import CPU_COUNT
            from distributed import LocalCluster

            n = workers if workers is not None else max(1, CPU_COUNT // (threads_per_worker or 1))
            cluster = LocalCluster(n_workers=n, processes=True, **common)
    revive.watch(cluster)
    return cluster


def _start_factory(spec: Mapping[str, Any], workers: int | None) -> Any:
    try:
        module = importlib.import_module(str(spec["module"]))
        cls = getattr(module, str(spec["class"]))
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"Dask config {FACTORY_KEY} names {spec['module']}.{spec['class']}, which cannot be"
            f" imported ({e}); install that package or fix the config."
        ) from None
    cluster = cls(*spec.get("args", ()), **dict(spec.get("kwargs", {})))
    if workers:
        cluster.scale(workers)
    return cluster


def up(
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | float | None = "auto",
    gpu: bool | None = None,
    name: str | None = None,
    adapt: str | tuple[int, int] | None = None,
    tls: bool | str | os.PathLike[str] | ClusterCertificates = False,
    address: str | None = None,
    scheduler_file: str | None = None,
    cluster: Any = None,
    timeout: float = 10.0,
) -> ClusterHandle:
    """Start a cluster (or attach to one) and make it this process's current cluster.

    With no arguments: one worker per GPU on ``LocalCUDACluster`` when NVML sees GPUs, else a
    ``LocalCluster`` of worker processes with one thread each. ``gpu=True`` insists on GPUs,
    ``gpu=False`` forces CPU workers. When the Dask config ``mlcloud.cluster.factory`` is set
    (``{module, class, args, kwargs}``) and ``gpu`` is not given, that class is built instead.
    ``adapt="MIN:MAX"`` turns on adaptive scaling; ``tls=True`` secures every connection with
    ``Security.temporary()`` (one machine), and ``tls=`` a directory or
    :class:`ClusterCertificates` (see :func:`cluster_certificates`) with those files, which
    workers on other hosts can share. ``address``, ``scheduler_file`` or ``cluster`` (a
    ``Cluster`` or ``Client``) attach instead of starting (see :func:`connect`).

    Raises ``ValueError`` with one sentence for bad input; nothing is left running then.
    """
    attach = [x for x in (address, scheduler_file, cluster) if x is not None]
    if attach:
        started_only = {
            "workers": workers,
            "threads_per_worker": threads_per_worker,
            "gpu": gpu,
            "adapt": adapt,
            "tls": tls or None,
        }
        given = [k for k, v in started_only.items() if v is not None]
        if len(attach) > 1 or given:
            raise ValueError(
                "address, scheduler_file and cluster attach to an existing cluster: give exactly"
                f" one of them and none of {', '.join(started_only)}"
                f" (got {', '.join(given) or 'several targets'})."
            )
        return connect(attach[0], name=name, timeout=timeout)

    if workers is not None:
        _check_count("workers", workers, minimum=1)
    if threads_per_worker is not None:
        _check_count("threads_per_worker", threads_per_worker, minimum=1)
    memory_limit = _check_memory_limit(memory_limit)
    adapt_range = parse_adapt(adapt) if adapt is not None else None
    if gpu not in (None, True, False):
        raise ValueError(f"gpu must be True, False or None (auto), got {gpu!r}.")
    if name is not None:
        _check_free_name(name)
    security = None
    if tls is not True and tls is not False:
        security = _security_from(tls, "tls")
    tls = tls is not False

    spec = _factory_spec() if gpu is None else None
    gpus = 0 if gpu is False or spec is not None else gpu_count()
    if spec is not None:
        kind = "factory"
    elif gpu is True and gpus == 0:
        raise ValueError(
            "gpu=True (--gpu) was asked for but NVML sees no NVIDIA GPU on this machine; use"
            " --cpu or leave both out to pick automatically."
        )
    else:
        kind = "local-gpu" if gpus else "local-cpu"
    if kind == "local-gpu" and workers is not None and workers > gpus:
        raise ValueError(
            f"workers={workers} is more than the {gpus} visible GPU(s); a GPU cluster runs one"
            f" worker per GPU, so use at most {gpus} (or --cpu)."
        )
    if adapt_range is not None and workers is None:
        workers = max(adapt_range[0], 1) if kind != "factory" else adapt_range[0] or None

    with _lock:
        name = name or _free_name()
        _check_free_name(name)
        record = ClusterRecord(name=name, kind=kind, tls=tls, owner=_owner())
        discovery.reserve(record)  # raises if another process holds the name

    dask_cluster = client = None
    try:
        if tls and security is None:
            from distributed.security import Security

            security = Security.temporary()
        if spec is not None:
            dask_cluster = _start_factory(spec, workers)
        else:
            dask_cluster = _start_local(
                kind, workers, threads_per_worker, memory_limit, security, gpus
            )
        from distributed import Client

        client = Client(dask_cluster, security=security, timeout=timeout)
        if adapt_range is not None:
            dask_cluster.adapt(minimum=adapt_range[0], maximum=adapt_range[1])
        record.address = dask_cluster.scheduler_address
        record.dashboard = getattr(dask_cluster, "dashboard_link", None) or None
        record.gpus = gpus if kind == "local-gpu" else 0
        record.status = "running"
        discovery.write(record)
    except BaseException:
        for thing in (client, dask_cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:
                    pass
        discovery.remove(name, pid=record.pid)
        raise

    handle = ClusterHandle(name, kind, client, dask_cluster, owned=True, record=record)
    _register(handle)
    return handle


def connect(
    target: Any,
    *,
    name: str | None = None,
    timeout: float = 10.0,
    security: Any = None,
) -> ClusterHandle:
    """Attach to a running cluster and make it current.

    ``target`` is a scheduler address (``tcp://host:8786``), a scheduler file (JSON path), the
    name of a discovered cluster (see :func:`list_clusters`), a Dask ``Cluster`` or a
    ``Client``. The cluster is not closed when the handle is; only our connection is.
    A ``tls://`` scheduler needs ``security``: a ``distributed.Security``, a
    :class:`ClusterCertificates` or the directory :func:`cluster_certificates` wrote (or the
    same in Dask config, ``distributed.comm.tls.*``).
    """
    from distributed import Client
    from distributed.deploy import Cluster

    if name is not None:
        _check_free_name(name)
    if security is not None:
        if isinstance(target, Client):
            raise ValueError(
                "security= applies when connecting by address, scheduler file or Cluster; a"
                " Client given to connect() already has its own."
            )
        security = _security_from(security, "security")
    known = {r.name: r for r in discovery.list_records()}
    client_given = False
    dask_cluster = None
    if isinstance(target, Client):
        client, client_given = target, True
    elif isinstance(target, Cluster):
        dask_cluster = target
        client = Client(target, timeout=timeout, security=security)
    elif isinstance(target, str) and target in known and known[target].address:
        name = name or target
        client = _client_for_address(known[target].address or "", timeout, security)
    elif isinstance(target, str) and target.endswith(".json"):
        if not os.path.isfile(target):
            raise ValueError(
                f"scheduler file {target!r} does not exist; pass the JSON file a scheduler wrote"
                " with --scheduler-file."
            )
        try:
            client = Client(scheduler_file=target, timeout=timeout, security=security)
        except Exception as e:
            raise ValueError(
                f"could not reach the scheduler named in {target!r} within {timeout:g} s ({e})."
            ) from None
    elif isinstance(target, str) and target:
        client = _client_for_address(target, timeout, security)
    else:
        raise ValueError(
            f"cannot connect to {target!r}; pass a scheduler address such as tcp://host:8786, a"
            " scheduler file, a discovered cluster's name, a Dask Cluster or a Client."
        )

    address = str(client.scheduler.address)
    same = next((r for r in known.values() if r.address == address), None)
    record = None
    try:
        with _lock:
            if name is None:
                name = same.name if same is not None and same.name not in _registry else None
                name = name or _free_name()
            _check_free_name(name)
            if same is None:  # make it visible to the sidebar too
                record = ClusterRecord(
                    name=name,
                    kind="remote",
                    address=address,
                    dashboard=_safe_dashboard(client),
                    status="running",
                    owner=_owner(),
                    tls=address.startswith("tls://"),
                )
                discovery.reserve(record)
    except BaseException:
        if not client_given:
            client.close()
        raise
    kind = same.kind if same is not None else "remote"
    handle = ClusterHandle(name, kind, client, dask_cluster, owned=False, record=record)
    handle._client_is_ours = not client_given
    _register(handle)
    return handle


def _security_from(value: Any, option: str) -> Any:
    """A ``distributed.Security`` from one, a :class:`ClusterCertificates` or a directory."""
    from distributed.security import Security

    if isinstance(value, Security):
        return value
    if isinstance(value, ClusterCertificates):
        value.check_key_permissions()
        return value.security()
    if isinstance(value, (str, os.PathLike)) and os.path.isdir(os.path.expanduser(value)):
        return ClusterCertificates.from_directory(value).security()
    raise ValueError(
        f"{option}={value!r} is not understood; give a distributed.Security, a"
        " ClusterCertificates, or an existing directory holding ca.pem, cert.pem and key.pem"
        + (" (or True for a certificate of this machine only)." if option == "tls" else ".")
    )


def _client_for_address(address: str, timeout: float, security: Any = None) -> Any:
    from distributed import Client

    if address.startswith("tls://") and security is None and not dask.config.get(
        "distributed.comm.tls.ca-file", default=None
    ):
        raise ValueError(
            f"the scheduler at {address!r} speaks TLS: pass security= (the directory"
            " mlc.cluster_certificates wrote, a ClusterCertificates or a distributed.Security),"
            " or set distributed.comm.tls.* in Dask config."
        )
    try:
        return Client(address, timeout=timeout, security=security)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"could not reach a Dask scheduler at {address!r} within {timeout:g} s ({reason});"
            " pass the address of a running scheduler, e.g. tcp://host:8786."
        ) from None


def _safe_dashboard(client: Any) -> str | None:
    try:
        return str(client.dashboard_link)
    except Exception:
        return None


OWNER: str | None = None  # set by a host process that knows what it is (the Jupyter server)


def _owner() -> str:
    """Who holds the cluster: a kernel, a Jupyter server, or a plain Python process."""
    if OWNER is not None:
        return OWNER
    try:
        from IPython import get_ipython

        ip = get_ipython()
        if ip is not None and getattr(ip, "kernel", None) is not None:
            return "kernel"
    except Exception:
        pass
    return "python"


def _register(handle: ClusterHandle) -> None:
    with _lock:
        _registry[handle.name] = handle
        _current.append(handle.name)


# ---------------------------------------------------------------- this process's clusters


def current() -> ClusterHandle:
    """The most recently started or attached cluster that is still open."""
    with _lock:
        if not _current:
            raise ValueError(
                "there is no cluster in this process; start one with `%mlcloud up --workers 2`"
                " or jupyter_mlcloud.up(), or attach with `%mlcloud connect ADDRESS`."
            )
        return _registry[_current[-1]]


def get(name: str | None = None) -> ClusterHandle:
    """This process's cluster called ``name`` (the current one when ``name`` is None)."""
    if name is None:
        return current()
    with _lock:
        if name in _registry:
            return _registry[name]
    other = discovery.get(name)
    if other is not None:
        raise ValueError(
            f"cluster {name!r} belongs to another process (pid {other.pid} on {other.host},"
            f" {other.owner}); attach to it with `%mlcloud connect {name}` first."
        )
    raise ValueError(f"no cluster named {name!r}; known here: {', '.join(_registry) or 'none'}.")


def resolve(cluster: Any) -> tuple[Any, str]:
    """(client, kind) for a ClusterHandle, a cluster name, a Client, or the current cluster."""
    from distributed import Client

    if isinstance(cluster, Client):
        return cluster, "remote"
    if cluster is None or isinstance(cluster, str):
        handle = get(cluster)
    elif isinstance(cluster, ClusterHandle):
        handle = cluster
    else:
        raise ValueError(
            f"cluster must be a cluster name, a ClusterHandle or a Client, got"
            f" {type(cluster).__name__}."
        )
    return handle.client, handle.kind


def resolve_client(cluster: Any) -> Any:
    """The ``Client`` of :func:`resolve`."""
    return resolve(cluster)[0]


def handles() -> list[ClusterHandle]:
    """This process's open clusters, oldest first."""
    with _lock:
        return list(_registry.values())


def scale(n: int, *, name: str | None = None) -> ClusterHandle:
    """Scale the current (or named) cluster to ``n`` workers."""
    handle = get(name)
    handle.scale(n)
    return handle


def adapt(minimum: int, maximum: int, *, name: str | None = None) -> ClusterHandle:
    """Make the current (or named) cluster adaptive between ``minimum`` and ``maximum``."""
    handle = get(name)
    handle.adapt(minimum, maximum)
    return handle


def down(*, name: str | None = None, all: bool = False) -> list[str]:
    """Close the current cluster, the named one, or (``all=True``) every one of this process.

    Returns the names closed. A cluster owned by another process is refused with its owner.
    """
    if all and name is not None:
        raise ValueError("give either name or all=True (--name or --all), not both.")
    targets = handles() if all else [get(name)]
    for handle in targets:
        handle.close()
    return [h.name for h in targets]


@atexit.register
def _close_all_at_exit() -> None:
    for handle in handles():
        try:
            handle.close()
        except Exception:
            pass


# ---------------------------------------------------------------- every discovered cluster


def list_clusters(*, live: bool = False, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Every live cluster on this machine's Jupyter runtime dir, from their discovery files.

    Each entry has name, kind, address, dashboard, pid, host, user, owner, created, status,
    tls, gpus. With ``live=True`` the schedulers are asked (concurrently) for workers, threads,
    memory and GPUs; those are None, and ``reachable`` False, when one does not answer within
    ``timeout`` seconds.
    """
    if not live:
        return [r.to_dict() for r in discovery.list_records()]
    # A thread of its own, so this works inside a running event loop (a kernel) too.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, list_clusters_async(timeout=timeout)).result()


async def list_clusters_async(*, timeout: float = 2.0) -> list[dict[str, Any]]:
    """``list_clusters(live=True)`` for event-loop code (the Jupyter server)."""

    async def live(entry: dict[str, Any]) -> dict[str, Any]:
        probeable = entry["address"] and not entry["tls"]  # TLS needs certificates we lack
        summary = await cluster_info.probe(entry["address"], timeout) if probeable else None
        return {**entry, **_with_summary(summary)}

    return list(await asyncio.gather(*(live(r.to_dict()) for r in discovery.list_records())))


def _with_summary(summary: cluster_info.Summary | None) -> dict[str, Any]:
    if summary is None:
        return {"workers": None, "threads": None, "memory": None, "reachable": False}
    return {**summary, "reachable": True}


def status() -> pd.DataFrame:
    """A table of every known cluster: name, kind, workers, threads, memory, GPUs, dashboard.

    Clusters of this process are asked through their client; others through their
    discovery file's address. ``owner`` says who holds each one.
    """
    import pandas as pd

    rows = []
    mine = handles()
    for handle in mine:
        try:
            info = handle.info()
        except Exception:
            info = {"workers": None, "threads": None, "memory": None, "gpus": None}
        rows.append({**info, "name": handle.name, "kind": handle.kind, "owner": "this process",
                     "dashboard": handle.dashboard_link})
    mine_addresses = {h.address for h in mine}
    for entry in list_clusters(live=True):
        if entry["name"] in _registry or entry["address"] in mine_addresses:
            continue
        rows.append({**entry, "owner": f"pid {entry['pid']} ({entry['owner']}, {entry['host']})"})
    current_name = _current[-1] if _current else None
    columns = ["name", "kind", "workers", "threads", "memory", "gpus", "dashboard", "owner"]
    table = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    table["memory"] = [format_bytes(m) if m else None for m in table["memory"]]
    table["current"] = [n == current_name for n in table["name"]]
    return table
