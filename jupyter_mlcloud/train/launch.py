"""Launching a run: pick workers, rendezvous, one pinned task per rank.

Rank 0's worker picks a free port; every rank joins ``tcp://host:port`` with gloo (CPU) or
NCCL (GPU). The workers stay warm, so a run starts in well under a second once torch has been
imported there.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import itertools
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask

from ..cluster import api as clusters
from ..cluster import handover, preemption, timers
from ..cluster import info as cluster_info
from ..cost import parse_budget
from ..telemetry import events
from . import registry
from .checkpoint import CheckpointDir, Meta, Resume
from .commits import CommitIndex
from .options import (
    BACKENDS,
    STRATEGIES,
    CompressionSpec,
    FaultOptions,
    StrategyOptions,
    check_whole,
    parse_compression,
)
from .rank import ring
from .rank.worker import RANK_KEY_PREFIX, FunctionPayload, RankSpec, free_port, run_rank
from .registry import active_runs
from .registry import lock as _lock
from .run import Run

__all__ = ["STRATEGIES", "FaultOptions", "StrategyOptions", "launch", "train"]


def _check_options(strategy: StrategyOptions, compression: Any, backend: str | None,
                   seed: Any, timeout: Any, epochs: Any) -> CompressionSpec:
    strategy.check()
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported; allowed: {', '.join(BACKENDS)}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}.")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}.")
    check_whole("epochs", epochs, 0, allow_none=True)
    spec = parse_compression(compression)
    strategy.check(str(spec))
    return spec


def _open_checkpoints(faults: FaultOptions) -> tuple[CheckpointDir | None, Meta | None]:
    """The checkpoint directory, checked writable, and the checkpoint ``--resume`` goes on
    from."""
    if faults.checkpoint_dir is None:
        return None, None
    directory = CheckpointDir(str(faults.checkpoint_dir), keep=faults.checkpoint_keep)
    directory.check_writable()
    directory.clean()
    steps = directory.steps()
    if steps and not faults.resume:
        raise ValueError(
            f"checkpoint_dir {faults.checkpoint_dir!r} already holds a checkpoint (step"
            f" {steps[-1]}); pass resume=True (--resume) to go on from it, or use an empty"
            " directory."
        )
    return directory, directory.latest() if faults.resume else None


def free_workers(client: Any, run: Run | None = None) -> tuple[list[str], dict[str, Any]]:
    """Workers no other run of this process is using (sorted by host), and the worker info."""
    info = cluster_info.workers(client)
    busy = {w for other in active_runs() if other is not run for w in other.workers}
    return sorted((w for w in info if w not in busy), key=lambda w: (info[w]["host"], w)), info


def _pick_workers(client: Any, workers: int | None) -> tuple[list[str], dict[str, Any]]:
    free, info = free_workers(client)
    busy = set(info) - set(free)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")
    wanted = workers or len(free)
    if not info:
        raise ValueError("the cluster has no workers; scale it up first (`%mlcloud scale 2`).")
    if wanted > len(free):
        raise ValueError(
            f"workers={wanted} but the cluster has {len(info)} worker(s), {len(busy)}"
            f" busy with other runs; use --workers {len(free) or 1} or scale up with"
            f" `%mlcloud scale {wanted + len(busy)}`."
        )
    return free[:wanted], info


def pick_buddies(chosen: list[str], hosts: dict[str, str], others: list[str]) -> list[str | None]:
    """For each rank, the worker that keeps a copy of its commits: the next rank on another
    host, else the next rank; a worker outside the run for a single rank (None: there is none).
    ``hosts`` maps every worker to its host; ``others`` are the cluster's other workers."""
    if len(chosen) == 1:
        if not others:
            return [None]
        away = [w for w in others if hosts[w] != hosts[chosen[0]]]
        return [(away or others)[0]]
    buddies: list[str | None] = []
    for rank, worker in enumerate(chosen):
        order = [chosen[(rank + k) % len(chosen)] for k in range(1, len(chosen))]
        away = [w for w in order if hosts[w] != hosts[worker]]
        buddies.append((away or order)[0])
    return buddies


def _backend(requested: str | None, kind: str, info: dict[str, Any], chosen: list[str]) -> str:
    gpu_workers = all((info[w].get("metrics") or {}).get("gpu") for w in chosen)
    if requested is None:
        return "nccl" if (kind == "local-gpu" or gpu_workers) else "gloo"
    if requested == "nccl" and not (kind == "local-gpu" or gpu_workers):
        raise ValueError(
            "backend 'nccl' needs a GPU on every worker, and these workers have none; use gloo."
        )
    return requested


def _listen_for_retiring(client: Any) -> None:
    """Route the scheduler's word that a worker is about to retire to the runs on it (once
    per client): each commits one same step at once and moves as planned."""
    if getattr(client, "_mlcloud_retiring_listener", False):
        return

    def on_retiring(event: tuple[float, Any]) -> None:
        said = event[1] if isinstance(event[1], dict) else {}
        for run in active_runs():
            if run.client is client and said.get("worker") in run.workers:
                run.retiring(said["worker"], float(said.get("grace", handover.GRACE_S)))

    client.subscribe_topic(handover.TOPIC, on_retiring)
    client._mlcloud_retiring_listener = True


@dataclass
class RankStarter:
    """Starts one attempt of a run: a rendezvous port, the payload and state shipped, one task
    per rank. Called by ``launch`` for the first attempt and by ``Run`` after each recovery."""

    client: Any
    run_id: str
    payload: Any
    backend: str
    strategy: StrategyOptions = StrategyOptions()
    common: dict[str, Any] = field(default_factory=dict)  # RankSpec fields every rank shares
    shipped: list[Any] = field(default_factory=list)  # futures to release when the run ends
    buddies: list[str] = field(default_factory=list)  # workers keeping commit copies

    def free_workers(self, run: Run) -> list[str]:
        """Workers ``run`` may use now."""
        return free_workers(self.client, run)[0]

    def __call__(self, chosen: list[str], resume: tuple[Meta, ring.Source] | None,
                 attempt: int, info: dict[str, Any] | None = None) -> list[Any]:
        """Start attempt ``attempt``'s ranks on ``chosen``; ``info``: the workers' info
        when the caller just read it (else read now)."""
        info = cluster_info.workers(self.client) if info is None else info
        buddies = pick_buddies(chosen, {w: str(i["host"]) for w, i in info.items()},
                               [w for w in sorted(info) if w not in chosen])
        self.buddies = [b for b in buddies if b is not None]
        if self.common.get("commit_every") or self.common.get("checkpoint_every"):
            self.client.run(ring.install_handlers, workers=[*chosen, *self.buddies])
        port = self.client.run(free_port, workers=[chosen[0]])[chosen[0]]
        hosts = [info[w]["host"] for w in chosen]
        local_world = {h: hosts.count(h) for h in hosts}
        counters = {h: itertools.count() for h in local_world}
        try:
            payload = self.client.scatter(self.payload, broadcast=True, hash=False,
                                          workers=chosen)
        except Exception as e:
            raise ValueError(
                f"the training code or a name it uses cannot be sent to the workers ({e});"
                " define such objects inside the cell or function instead."
            ) from None
        self.shipped.append(payload)
        servers = self._start_servers(chosen, attempt)
        meta, source = resume if resume is not None else (None, None)
        return [
            self.client.submit(
                run_rank,
                payload,
                RankSpec(
                    run_id=self.run_id,
                    rank=rank,
                    world_size=len(chosen),
                    local_rank=next(counters[hosts[rank]]),
                    local_world_size=local_world[hosts[rank]],
                    master_addr=str(info[chosen[0]]["host"]),
                    master_port=port,
                    backend=self.backend,
                    attempt=attempt,
                    strategy=self.strategy,
                    servers=servers,
                    resume=(Resume(meta.position, meta.world_size, None, {}, source)
                            if meta is not None else None),
                    buddy=buddies[rank],
                    send_state=not (self.strategy.replicated and buddies[rank] in chosen),
                    **self.common,
                ),
                key=f"{RANK_KEY_PREFIX}{self.run_id}-a{attempt}-rank-{rank}",
                workers=[address],
                allow_other_workers=False,
                pure=False,
                retries=0,
            )
            for rank, address in enumerate(chosen)
        ]

    def _start_servers(self, chosen: list[str], attempt: int) -> list[tuple[str, str]]:
        """This attempt's parameter-server actors, one per shard, spread over ``chosen``."""
        if not self.strategy.servers:
            return []  # and torch stays unloaded in the kernel
        from .strategies.param_server import ParamServerShard

        mode = "sync" if self.strategy.name == "ps-sync" else "async"
        futures = [
            self.client.submit(ParamServerShard, shard, len(chosen), mode,
                               self.strategy.max_staleness, self.common.get("timeout", 300.0),
                               actor=True, workers=[chosen[shard % len(chosen)]],
                               allow_other_workers=False, pure=False,
                               key=f"mlcloud-ps-{self.run_id}-a{attempt}-shard-{shard}")
            for shard in range(self.strategy.servers)
        ]
        self.shipped.extend(futures)
        return [(chosen[shard % len(chosen)], f.result().key) for shard, f in enumerate(futures)]

    def release(self) -> None:
        """Let the workers drop the shipped payload, states and server actors."""
        for future in self.shipped:
            future.release()
        self.shipped.clear()


def _cluster_name(cluster: Any, client: Any) -> str:
    """The cluster's name as the sidebar shows it (a bare Client: its scheduler address)."""
    if isinstance(cluster, str):
        return cluster
    if isinstance(cluster, clusters.ClusterHandle):
        return cluster.name
    if cluster is None:
        return clusters.get(None).name
    return str(client.scheduler.address)


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
    strategy: str | StrategyOptions = "ddp",
    compression: str = "none",
    faults: FaultOptions = FaultOptions(),
    track: bool = True,
    config: Mapping[str, Any] | None = None,
    budget: float | str | None = None,
) -> Run:
    """Start ``payload`` (a function or cell payload) as one rank per worker; see :func:`train`.

    With ``track``, the run is recorded in MLflow with its options and ``config``."""
    if not isinstance(track, bool):
        raise ValueError(f"track must be True or False, got {track!r}.")
    if not isinstance(strategy, StrategyOptions):
        strategy = StrategyOptions(name=str(strategy))
    spec = _check_options(strategy, compression, backend, seed, timeout, epochs)
    faults.check(workers)
    limit = parse_budget(budget)
    notice = preemption.notice_settings()
    grace = handover.grace_setting()
    client, kind = clusters.resolve(cluster)
    try:  # a worker told to go (SIGTERM, a notice) retires: the run moves as planned
        preemption.install(client, notice)
        _listen_for_retiring(client)
        handover.install(client, (RANK_KEY_PREFIX,), grace)
    except Exception:
        pass
    directory, snap = _open_checkpoints(faults)
    try:
        with _lock:  # two launches must not pick the same free workers
            chosen, info = _pick_workers(client, workers)
            if faults.min_workers is not None and faults.min_workers > len(chosen):
                raise ValueError(
                    f"min_workers={faults.min_workers} is more than the {len(chosen)} worker(s)"
                    f" this run gets; use at most {len(chosen)}."
                )
            backend = _backend(backend, kind, info, chosen)
            strategy.check_backend(backend)
            run_id = uuid.uuid4().hex[:12]
            base_world = snap.base_world if snap is not None else len(chosen)
            starter = RankStarter(client, run_id, payload, backend, strategy, dict(
                timeout=float(timeout), seed=seed, epochs=epochs, out=list(out),
                commit_every=faults.commits.every, checkpoint_every=faults.commits.durable_every,
                compression=str(spec), elastic=faults.elastic, base_world=base_world,
                checkpoint_url=directory.url if directory is not None else None,
                bind_cores=bool(dask.config.get("mlcloud.train.bind-cores", False)),
            ))
            store = (CommitIndex(run_id, len(chosen), base_world, strategy.replicated, snap)
                     if faults.commits.every or directory else None)
            run = Run(run_id, client, chosen, starter=starter, store=store,
                      checkpoints=directory, max_failures=faults.max_failures,
                      min_workers=faults.min_workers, budget=limit)
            registry.add(run)
    except BaseException:
        if directory is not None:
            directory.discard()
        raise
    try:
        run.subscribe()
        if track:
            from ..tracking.runs import track_training

            options = {"workers": len(chosen), "backend": backend, "seed": seed,
                       "timeout": timeout, "epochs": epochs, "compression": str(spec),
                       **{("strategy" if k == "name" else k): v
                          for k, v in dataclasses.asdict(strategy).items()},
                       **dataclasses.asdict(faults),
                       **({"budget": limit.text} if limit is not None else {})}
            run.tracking = track_training(run, options, config, _cluster_name(cluster, client),
                                          kind)
        first = None
        if snap is not None and directory is not None:  # --resume: the ranks read the files
            first = (snap, ring.Source(snap.step, -1, snap.world_size, directory=directory.url))
        futures = starter(chosen, first, 0, info)
    except BaseException as e:
        run._abandon(e)  # releases what was shipped and forgets the run
        if directory is not None:
            directory.discard()
        raise
    if snap is not None:
        run.note_resume(snap)
    client.log_event(events.RUNS_TOPIC, {"run": run.id, "state": "started",
                                          "workers": chosen, "pid": os.getpid()})
    run.start(futures, info)
    # The scheduler and nannies of an mlc.up cluster share the notebook's process and the
    # ranks' cores: their system monitors slow down until the run ends.
    restore = timers.quiet_local_cluster(client)
    run.add_done_callback(lambda _run: restore())
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
    max_failures: int = 0,
    min_workers: int | None = None,
    commit_every: int = 1,
    checkpoint_every: int | None = None,
    checkpoint_keep: int = 2,
    resume: bool = False,
    elastic: str = "global-batch",
    microbatches: int | None = None,
    pipeline_schedule: str = "1f1b",
    ps_workers: int | None = None,
    max_staleness: int | None = None,
    config: Mapping[str, Any] | None = None,
    track: bool = True,
    budget: float | str | None = None,
    **kwargs: Any,
) -> Run:
    """Run ``fn(ctx, *args, **config)`` on every selected worker, data-parallel; return a ``Run``.

    The function's own arguments come positionally (``*args``) or as the mapping ``config``;
    a keyword that names one of ``fn``'s parameters is passed on too. Any other keyword is
    refused with the list of run options, so ``mlc.train(fn, noblok=True)`` fails at once
    instead of inside rank 0. (A run option, such as ``seed``, is always the run's: give the
    function its own ``seed`` through ``config``.)

    ``cluster``: a cluster name, ``ClusterHandle`` or ``Client`` (default: the current
    cluster). ``workers``: how many ranks (default: every free worker). ``backend``: gloo or
    nccl (default: NCCL on GPU workers, else gloo). ``seed`` seeds python, numpy and torch on
    every rank. ``timeout`` (s) bounds the rendezvous and each collective. ``epochs`` is the
    default count of ``ctx.epochs()``. The torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are set while ``fn`` runs.

    Fault tolerance: ``max_failures`` lost workers are survived by resuming every rank from
    the last commit (taken every ``commit_every`` steps and held by the workers), with the
    same number of workers once replacements join, or with ``min_workers`` or more if none
    come within ``mlcloud.train.replace-timeout`` seconds (Dask config, default 30); how the
    batch and learning rate change then is the ``elastic`` rule (``global-batch`` or
    ``linear-lr``). A worker that retires instead (``Client.retire_workers``, or SIGTERM, which
    makes workers retire gracefully) is a planned move: the run hands over to a replacement the
    same way without using any of ``max_failures`` (``run.failures`` counts the others; its
    record in ``run.events`` has ``planned``). ``checkpoint_dir`` (any fsspec URL) also gets a
    checkpoint every ``checkpoint_every`` steps (default 100), keeping the last ``checkpoint_keep``;
    ``resume=True`` goes on from the newest one there (after a kernel restart, say).
    ``compression``: ``none``, ``fp16``, ``bf16`` or ``powersgd[:RANK[:START]]`` for the gradients.

    ``strategy``: ``ddp`` (default), ``fsdp`` (GPUs), ``pipeline`` (one stage per rank over
    ``microbatches`` microbatches, default 4, with the ``pipeline_schedule`` ``1f1b`` or
    ``gpipe``), ``ps-sync`` or ``ps-async`` (a parameter server in ``ps_workers`` Dask actors,
    default 1; ``max_staleness`` bounds how far an async trainer runs ahead).

    ``track`` (default on) records the run in MLflow (see :mod:`jupyter_mlcloud.tracking`):
    every option above and ``config`` as params, rank 0's ``ctx.report`` metrics, the
    workers' system figures, each recovery and checkpoint, and a ``torch.nn.Module`` in the
    result as its model; ``run.mlflow_run_id`` names it.

    ``budget`` is a hard stop: a cost (a number, priced by the Dask config
    ``mlcloud.cost.prices``) or worker time as ``"2h"``, ``"30m"`` or ``"90s"``. A run that
    reaches it commits one same step on every rank, writes that checkpoint if it has a
    ``checkpoint_dir``, stops, and ends as ``cancelled`` with ``run.stop_reason`` saying so.
    ``run.cost`` gives the worker-seconds, GPU-seconds and cost used so far.

    ``run.result()`` returns rank 0's return value (models unwrapped, whole, on CPU).
    """
    if not callable(fn):
        raise ValueError(f"train needs a function taking ctx, got {type(fn).__name__}.")
    return launch(
        FunctionPayload(fn, args, function_kwargs(fn, kwargs, config)),
        cluster=cluster,
        workers=workers,
        backend=backend,
        seed=seed,
        timeout=timeout,
        epochs=epochs,
        strategy=StrategyOptions(name=strategy, microbatches=microbatches,
                                 pipeline_schedule=pipeline_schedule, ps_workers=ps_workers,
                                 max_staleness=max_staleness),
        compression=compression,
        faults=FaultOptions(max_failures=max_failures, min_workers=min_workers,
                            commit_every=commit_every, checkpoint_dir=checkpoint_dir,
                            checkpoint_every=checkpoint_every, checkpoint_keep=checkpoint_keep,
                            resume=resume, elastic=elastic),
        track=track,
        config=config,
        budget=budget,
    )


def run_options() -> list[str]:
    """The keyword options of :func:`train` (everything but the user function's own)."""
    return [name for name, p in inspect.signature(train).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


def function_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any],
                    config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keywords ``fn`` is called with: ``config``, plus any of ``kwargs`` that name one of
    ``fn``'s own parameters. Any other name is refused in one sentence that lists the run
    options and suggests the nearest, so a misspelt option never reaches ``fn`` silently."""
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping of keyword arguments for the function, got"
                         f" {type(config).__name__}.")
    try:
        own = {name for name, p in inspect.signature(fn).parameters.items()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    except (TypeError, ValueError):  # a builtin or C function: no signature to check against
        own = set()
    unknown = [name for name in kwargs if name not in own]
    if unknown:
        options = run_options()
        near = difflib.get_close_matches(unknown[0], options + sorted(own), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(
            f"{unknown[0]!r} is neither an option of train nor a parameter of"
            f" {getattr(fn, '__name__', 'the function')}.{hint} The options are:"
            f" {', '.join(options)}; pass the function's own arguments positionally or as"
            " config={...}."
        )
    both = sorted(set(kwargs) & set(config or {}))
    if both:
        raise ValueError(f"{both[0]!r} is given both as a keyword and in config; give it once.")
    return {**(config or {}), **kwargs}
