"""Launching a run: pick workers, rendezvous, one pinned task per rank.

Rank 0's worker picks a free port; every rank joins ``tcp://host:port`` with gloo (CPU) or
NCCL (GPU). The workers stay warm, so a run starts in well under a second once torch has been
imported there.
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from .. import clusters, metrics
from .run import Run
from .worker import FunctionPayload, RankSpec, free_port, run_rank

BACKENDS = ("gloo", "nccl")
STRATEGIES = ("ddp",)
COMPRESSIONS = ("none",)

_lock = threading.RLock()
_active: dict[str, Run] = {}  # this process's runs in flight, by id


def _forget(run: Run) -> None:
    with _lock:
        _active.pop(run.id, None)


def active_runs() -> list[Run]:
    """This process's runs that have not ended."""
    with _lock:
        return list(_active.values())


def _check_options(strategy: str, checkpoint_dir: Any, compression: str, backend: str | None,
                   seed: Any, timeout: Any, epochs: Any) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy {strategy!r} is not available; allowed: {', '.join(STRATEGIES)}."
        )
    if checkpoint_dir is not None:
        raise ValueError(
            f"checkpoint_dir {checkpoint_dir!r} cannot be used yet: checkpointing is not"
            " available in this version; leave it out."
        )
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"compression {compression!r} is not available; allowed: {', '.join(COMPRESSIONS)}."
        )
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported; allowed: {', '.join(BACKENDS)}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}.")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}.")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or epochs < 0):
        raise ValueError(f"epochs must be a whole number >= 0, got {epochs!r}.")


def _pick_workers(client: Any, workers: int | None) -> tuple[list[str], dict[str, Any]]:
    info = client.scheduler_info(n_workers=-1)["workers"]
    busy = {w for run in active_runs() for w in run.workers}
    free = sorted((w for w in info if w not in busy), key=lambda w: (info[w]["host"], w))
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")
    wanted = workers or len(free)
    if not info:
        raise ValueError("the cluster has no workers; scale it up first (`%mlcloud scale 2`).")
    if wanted > len(free):
        raise ValueError(
            f"workers={wanted} but the cluster has {len(info)} worker(s), {len(busy & set(info))}"
            f" busy with other runs; use --workers {len(free) or 1} or scale up with"
            f" `%mlcloud scale {wanted + len(busy & set(info))}`."
        )
    return free[:wanted], info


def _backend(requested: str | None, kind: str, info: dict[str, Any], chosen: list[str]) -> str:
    gpu_workers = all((info[w].get("metrics") or {}).get("gpu") for w in chosen)
    if requested is None:
        return "nccl" if (kind == "local-gpu" or gpu_workers) else "gloo"
    if requested == "nccl" and not (kind == "local-gpu" or gpu_workers):
        raise ValueError(
            "backend 'nccl' needs a GPU on every worker, and these workers have none; use gloo."
        )
    return requested


def launch(
    payload: Any,
    *,
    cluster: Any = None,
    workers: int | None = None,
    backend: str | None = None,
    seed: int = 0,
    out: Sequence[str] = (),
    timeout: float = 300.0,
    epochs: int | None = None,
    strategy: str = "ddp",
    checkpoint_dir: str | None = None,
    compression: str = "none",
) -> Run:
    """Start ``payload`` (a function or cell payload) as one rank per worker; see :func:`train`."""
    _check_options(strategy, checkpoint_dir, compression, backend, seed, timeout, epochs)
    client, kind = clusters.resolve(cluster)
    with _lock:  # two launches must not pick the same free workers
        chosen, info = _pick_workers(client, workers)
        backend = _backend(backend, kind, info, chosen)
        run = Run(uuid.uuid4().hex[:12], client, chosen)
        _active[run.id] = run
    try:
        port = client.run(free_port, workers=[chosen[0]])[chosen[0]]
        master = str(info[chosen[0]]["host"])
        hosts = [info[w]["host"] for w in chosen]
        local_world = {h: hosts.count(h) for h in hosts}
        counters = {h: itertools.count() for h in local_world}
        try:
            shipped = client.scatter(payload, broadcast=True, hash=False, workers=chosen)
        except Exception as e:
            raise ValueError(
                f"the training code or a name it uses cannot be sent to the workers ({e});"
                " define such objects inside the cell or function instead."
            ) from None
        run.subscribe()
        futures = [
            client.submit(
                run_rank,
                shipped,
                RankSpec(
                    run_id=run.id,
                    rank=rank,
                    world_size=len(chosen),
                    local_rank=next(counters[hosts[rank]]),
                    local_world_size=local_world[hosts[rank]],
                    master_addr=master,
                    master_port=port,
                    backend=backend,
                    timeout=float(timeout),
                    seed=seed,
                    epochs=epochs,
                    out=list(out),
                ),
                key=f"mlcloud-train-{run.id}-rank-{rank}",
                workers=[address],
                allow_other_workers=False,
                pure=False,
                retries=0,
            )
            for rank, address in enumerate(chosen)
        ]
    except BaseException:
        _forget(run)
        raise
    client.log_event(metrics.RUNS_TOPIC, {"run": run.id, "state": "started",
                                          "workers": chosen, "pid": os.getpid()})
    run.start(futures, shipped)
    return run


def train(
    fn: Callable[..., Any],
    *args: Any,
    cluster: Any = None,
    workers: int | None = None,
    backend: str | None = None,
    seed: int = 0,
    timeout: float = 300.0,
    epochs: int | None = None,
    strategy: str = "ddp",
    checkpoint_dir: str | None = None,
    compression: str = "none",
    **kwargs: Any,
) -> Run:
    """Run ``fn(ctx, *args, **kwargs)`` on every selected worker, data-parallel; return a ``Run``.

    ``cluster``: a cluster name, ``ClusterHandle`` or ``Client`` (default: the current
    cluster). ``workers``: how many ranks (default: every free worker). ``backend``: gloo or
    nccl (default: NCCL on GPU workers, else gloo). ``seed`` seeds python, numpy and torch on
    every rank. ``timeout`` (s) bounds the rendezvous and each collective. ``epochs`` is the
    default count of ``ctx.epochs()``. The torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are set while ``fn`` runs.

    ``run.result()`` returns rank 0's return value (models unwrapped from DDP, on CPU).
    """
    if not callable(fn):
        raise ValueError(f"train needs a function taking ctx, got {type(fn).__name__}.")
    return launch(
        FunctionPayload(fn, args, kwargs),
        cluster=cluster,
        workers=workers,
        backend=backend,
        seed=seed,
        timeout=timeout,
        epochs=epochs,
        strategy=strategy,
        checkpoint_dir=checkpoint_dir,
        compression=compression,
    )
