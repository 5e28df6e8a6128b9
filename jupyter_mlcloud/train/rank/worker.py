"""What runs on each worker during training: one rank, start to teardown.

The worker process stays warm between runs (torch imported once), so everything a rank sets
up (environment, stdout routing, process group, patched init/destroy) is undone in ``finally``,
in an order that cannot wedge the worker: models first, then the process group.

Cancelling is cooperative: ``cancel_rank`` only sets the rank's flag, and the rank raises
``RunCancelled`` on its own thread at its next safe point (each ``ctx.shard`` batch, each
``ctx.epochs`` epoch, each ``ctx.report``, each ``optimizer.step()``: a pasted torchrun script
stops too), so nothing can interrupt the teardown. A rank blocked
in a gloo collective is released when a peer (cancelled too) destroys its group: in torch 2.13
``ProcessGroup.abort()``, ``shutdown()`` or ``destroy_process_group()`` called from another
thread of the blocked rank's own process do not release it; a peer's closed connections do.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import linecache
import logging
import os
import random
import socket
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...cluster import timers
from ...telemetry import events
from .. import checkpoint
from ..options import StrategyOptions, parse_compression
from ..returned import Returned
from . import binding, cancel, ring
from .cancel import RunCancelled, before_optimizer_step
from .network import address_ip, socket_env

PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
RANK_KEY_PREFIX = "mlcloud-train-"  # every rank's task key: a retiring worker hands these over
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


@dataclass
class RankSpec:
    """Everything one rank needs to know, sent with its task."""

    run_id: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str
    timeout: float
    seed: int
    epochs: int | None = None
    out: list[str] = field(default_factory=list)
    commit_every: int = 0  # 0: no commits
    checkpoint_every: int = 0  # commits written to the checkpoint directory
    compression: str = "none"
    elastic: str = "global-batch"
    base_world: int = 0  # the world the run was launched with (0: this one)
    attempt: int = 0
    resume: Any = None  # checkpoint.Resume without its state: the rank fetches it
    buddy: str | None = None  # the worker that keeps a copy of this rank's commits
    send_state: bool = True  # the copy includes the whole state (the buddy has none of its own)
    checkpoint_url: str | None = None  # ranks write their durable commits there
    strategy: Any = None  # options.StrategyOptions (None: ddp)
    servers: list[tuple[str, str]] = field(default_factory=list)  # (worker, key) of PS actors
    bind_cores: bool = False  # the training thread on a core of its own (see .binding)


class RankFailed(Exception):
    """A rank raised: carries its rank, worker and the rank-tagged traceback text."""

    def __init__(self, rank: int, worker: str, text: str) -> None:
        super().__init__(rank, worker, text)
        self.rank, self.worker, self.text = rank, worker, text

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------- payloads


@dataclass
class FunctionPayload:
    """``train(fn)``: call ``fn(ctx, *args, **kwargs)``."""

    fn: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, ctx: Any, out: list[str]) -> Any:
        return self.fn(ctx, *self.args, **self.kwargs)


@dataclass
class CellPayload:
    """``%%distributed_train``: execute the cell's source with the notebook names it uses."""

    source: str
    filename: str
    namespace: dict[str, Any]

    def run(self, ctx: Any, out: list[str]) -> Any:
        lines = self.source.splitlines(keepends=True)
        linecache.cache[self.filename] = (len(self.source), None, lines, self.filename)
        ns = {**self.namespace, "ctx": ctx, "__name__": "__main__"}
        try:
            exec(compile(self.source, self.filename, "exec"), ns)
            if ctx.rank != 0:
                return None
            missing = [n for n in out if n not in ns]
            if missing:
                raise NameError(
                    f"--out names {missing} were not defined by the cell on rank 0."
                )
            return {name: ns[name] for name in out}
        finally:
            ns.clear()  # the cell's DDP model must not outlive the process group


def free_port() -> int:
    """A TCP port free on this worker's host right now (rank 0 listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- stdout routing


class _ThreadRouter(io.TextIOBase):
    """Stands in for sys.stdout/stderr: writes from a rank's thread go to that rank's sink."""

    def __init__(self, original: Any, name: str) -> None:
        self._original, self._name = original, name

    def write(self, text: str) -> int:
        sink = _sinks.get(threading.get_ident())
        if sink is None:
            return int(self._original.write(text))
        sink(self._name, text)
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


_sinks: dict[int, Any] = {}


def _install_routers() -> None:
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), _ThreadRouter):
            setattr(sys, name, _ThreadRouter(getattr(sys, name), name))


class _LineSink:
    """Splits a rank's output into lines and queues them on the run's log topic."""

    def __init__(self, rank: int, batcher: events.EventBatcher) -> None:
        self.rank, self.batcher = rank, batcher
        self.partial: dict[str, str] = {"stdout": "", "stderr": ""}

    def __call__(self, stream: str, text: str) -> None:
        buffered = self.partial[stream] + text
        *lines, self.partial[stream] = buffered.split("\n")
        for line in lines:
            self.batcher.add({"rank": self.rank, "stream": stream, "line": line})

    def close(self) -> None:
        for stream, rest in self.partial.items():
            if rest:
                self.batcher.add({"rank": self.rank, "stream": stream, "line": rest})


# ---------------------------------------------------------------- the rank


_frozen = threading.Lock()  # held for good once this process froze its long-lived objects


def _freeze_long_lived() -> None:
    """Once per worker process: import what torch loads lazily, collect, then move every
    object alive now (Dask's, torch's modules) out of the collector's sight.

    Each rank's teardown collects its own cycles (DDP reducers); without the freeze, that
    collection walked ~225,000 objects: 0.14 s of every run, most of a one-second trial's
    overhead in a study. ``torch._dynamo`` is what the first optimizer imports (~800 modules);
    imported while a process group exists, it keeps that group alive for good: its store,
    its gloo loop thread waking 100 times a second beside every later rank."""
    if _frozen.acquire(blocking=False):
        import torch._dynamo  # noqa: F401

        gc.collect()
        gc.freeze()
        logging.getLogger("distributed.worker").addFilter(_quiet_stopped_ranks)


def _quiet_stopped_ranks(record: logging.LogRecord) -> bool:
    """Drop Dask's "Compute Failed" error for a rank that stopped because it was told to (a
    cancel, a pruned trial, a planned stop): an outcome the launcher asked for, which would
    otherwise print a traceback into the notebook for every pruned trial."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (str(record.msg).startswith("Compute Failed") and len(args) > 3
                and str(args[0]).startswith(RANK_KEY_PREFIX) and "RunCancelled" in str(args[3]))


@contextlib.contextmanager
def _scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in the environment while the rank runs; the warm worker gets its own back."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _torchrun_env(spec: RankSpec) -> contextlib.AbstractContextManager[None]:
    values = (spec.rank, spec.world_size, spec.local_rank, spec.local_world_size,
              spec.master_addr, spec.master_port)
    return _scoped_env({k: str(v) for k, v in zip(TORCHRUN_VARS, values, strict=True)})


def _socket_env(worker_address: str) -> contextlib.AbstractContextManager[None]:
    """Bind gloo/NCCL to the interface of the worker's own address, not the hostname's (which
    often resolves to 127.0.0.1); the user's own GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME win.
    Set for the whole rank, so groups the user's code makes (``new_group``) bind the same way."""
    import psutil


    try:
        ip = address_ip(worker_address)
    except (OSError, ValueError):  # no IP to bind to (an unresolvable name): backend defaults
        return contextlib.nullcontext()
    return _scoped_env(socket_env(ip, os.environ, psutil.net_if_addrs()))


@contextlib.contextmanager
def _owned_process_group(spec: RankSpec) -> Iterator[None]:
    """Join the group; while user code runs, its own init/destroy calls are no-ops."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    dist.init_process_group(
        backend=spec.backend,
        init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=spec.timeout),
    )
    names = ("init_process_group", "destroy_process_group")
    originals = tuple(vars(dist)[name] for name in names)

    def init_process_group(*args: Any, **kwargs: Any) -> None:
        """Already joined by jupyter_mlcloud: a torchrun script's own call does nothing."""

    def destroy_process_group(*args: Any, **kwargs: Any) -> None:
        """jupyter_mlcloud destroys the group after the run, in a safe order."""

    def patch(functions: tuple[Any, ...]) -> None:
        for module in (dist, c10d):
            vars(module).update(zip(names, functions, strict=True))

    patch((init_process_group, destroy_process_group))
    try:
        yield
    finally:
        patch(originals)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_notebook(value: Any, export: Any) -> Any:
    """What rank 0 sends back: models unwrapped (``export``: the strategy's rule) and on CPU,
    tensors on CPU."""
    import torch

    value = export(value)
    if isinstance(value, (torch.nn.Module, torch.Tensor)):
        return value.to("cpu")
    if isinstance(value, dict):
        return {k: _to_notebook(v, export) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_notebook(v, export) for v in value)
    return value


def _servers(spec: RankSpec) -> list[Any]:
    """Handles to this attempt's parameter-server actors."""
    from distributed.actor import Actor

    from ..strategies.param_server import ParamServerShard

    return [Actor(ParamServerShard, address, key) for address, key in spec.servers]


def _format_failure(rank: int, exc: BaseException) -> str:
    """The traceback from the user's code down, every line tagged with the rank."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not f.filename.startswith(PACKAGE_DIR)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(user or frames)]
    lines += traceback.format_exception_only(type(exc), exc)
    text = "".join(lines).rstrip("\n")
    return "\n".join(f"[rank {rank}] {line}" for line in text.splitlines())


def _resumed(spec: RankSpec, worker: Any) -> Any:
    """``spec.resume`` with its state, pulled from the workers (or the checkpoint directory)
    that hold it; a pipeline's stages laid over the whole."""
    import dataclasses

    from ..strategies.pipeline import merge_slices  # the strategies import torch

    resume = spec.resume
    state, per_rank = ring.fetch(spec.run_id, resume.source, worker)
    return dataclasses.replace(resume, state=merge_slices(state, per_rank),
                               local=per_rank.get(spec.rank), source=None)


def run_rank(payload: Any, spec: RankSpec) -> Any:
    """The task each worker runs: set up, run the user's code as rank ``spec.rank``, tear down.

    With ``spec.resume`` this attempt goes on from that commit, whose state the rank pulls
    from the workers holding it before it joins the process group.
    """
    import torch.distributed as dist
    from distributed import get_worker
    from distributed.worker import thread_state
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from ..strategies import make_strategy  # imports torch: only on the worker

    worker = get_worker()
    _freeze_long_lived()
    active = cancel.begin(spec.run_id, spec.rank, spec.attempt, worker.address)
    ring.open_ring(spec.run_id, spec.attempt, ring.Config(
        buddy=spec.buddy, send_state=spec.send_state, checkpoint_url=spec.checkpoint_url,
        sharded=spec.strategy is not None and not spec.strategy.replicated, worker=worker))
    key = getattr(thread_state, "key", None)

    def still_wanted() -> None:
        active.check()
        # A launcher that went away (a kernel restart) released this task: stop, so the
        # worker is free for the resumed run instead of finishing an orphan.
        task = worker.state.tasks.get(key) if key is not None else None
        if key is not None and (task is None or task.state in ("cancelled", "released")):
            raise RunCancelled(f"run {spec.run_id} was released by its launcher; stopping.")

    reporter = events.EventBatcher(worker.log_event, events.metrics_topic(spec.run_id))
    logs = events.EventBatcher(worker.log_event, events.logs_topic(spec.run_id))
    sink = _LineSink(spec.rank, logs)
    _install_routers()
    _sinks[threading.get_ident()] = sink
    ctx = None
    bound: binding.CoreBinding | None = None
    failure: str | None = None
    step_hook = register_optimizer_step_pre_hook(before_optimizer_step)
    # The newest commit's background copies must end before the weights change.
    settle_hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: ring.settle(spec.run_id))
    restore_timers = timers.quiet(worker, timers.RANK_WORKER)
    try:
        from .context import TrainContext

        _seed_everything(spec.seed)
        device = _device()
        ctx = TrainContext(
            run_id=spec.run_id,
            rank=spec.rank,
            world_size=spec.world_size,
            local_rank=spec.local_rank,
            device=device,
            seed=spec.seed,
            default_epochs=spec.epochs,
            reporter=reporter,
            commits=checkpoint.CommitPlan(spec.commit_every, spec.checkpoint_every),
            resume=_resumed(spec, worker) if spec.resume is not None else None,
            compression=parse_compression(spec.compression),
            elastic_rule=spec.elastic,
            base_world=spec.base_world or spec.world_size,
            attempt=spec.attempt,
            emit=lambda event: worker.log_event(events.control_topic(spec.run_id),
                                               {"items": [event]}),
            guard=still_wanted,
            strategy=make_strategy(spec.strategy or StrategyOptions(), spec.rank,
                                   spec.world_size, device, _servers(spec), spec.timeout),
        )
        with _torchrun_env(spec), _socket_env(worker.address), _owned_process_group(spec):
            # Cancelled during the rendezvous: every rank joined it, so every rank can leave.
            still_wanted()
            if spec.bind_cores:  # after the group started its threads: they stay free
                bound = binding.CoreBinding(spec.local_rank, spec.local_world_size)
            result = payload.run(ctx, spec.out)
            ctx.check_resumed()
            ctx.finish()
            if spec.rank != 0:
                return None
            return Returned(_to_notebook(result, ctx.export), ctx.kept_reference())
    except BaseException as exc:  # noqa: B036 - a torchrun script may sys.exit()
        failure = _format_failure(spec.rank, exc)
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
    finally:
        cancel.finishing(active)
        step_hook.remove()
        settle_hook.remove()
        if bound is not None:
            bound.release()
        restore_timers()
        _sinks.pop(threading.get_ident(), None)
        sink.close()
        if ctx is not None:
            ctx.release()
        # Drop every reference to DDP models (and their reducers) before the group goes:
        # the other order can block this thread forever in the reducer's destructor.
        payload = ctx = None
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        ring.leave(spec.run_id)  # its checkpoint files are written before the task ends
        reporter.close()
        logs.close()
        cancel.end(spec.run_id)
    raise RankFailed(spec.rank, worker.address, failure)
