"""A parameter server held by Dask actors: ``--strategy ps-sync`` and ``ps-async``.

The parameters are split over ``--ps-workers`` shards, each a :class:`ParamServerShard` actor on
one of the run's workers, holding its parameters and an optimizer of the user's class over
them. Trainers compute gradients on their own batches; ``optimizer.step()`` pushes them and
copies back what the server returns.

- ``ps-sync``: a shard applies one step when every trainer has pushed, with the mean gradient
  (summed in rank order, each divided by the world size, as DDP's all-reduce does), so the
  parameters follow DDP's.
- ``ps-async``: each gradient is applied when it arrives; its *staleness* is the number of
  updates applied since the trainer got its parameters. ``--max-staleness S`` is the
  stale-synchronous bound: a trainer gets its reply only while it is at most ``S`` pushes ahead
  of the slowest trainer, so staleness stays at most ``(world - 1) * (2S + 1)``.

The actors' methods are coroutines: they run on the worker's event loop, so a sync shard can
wait for every trainer without holding a thread, and the training task on the same worker
goes on. Rank 0 commits the shards' state with the rest; a resumed attempt gets new actors
and loads that state into them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..options import StrategyOptions
from ..rank.cancel import cancel_point
from .base import Strategy, _no_pipeline_args

CALL_POLL_S = 0.25  # actor replies are waited for in slices, so a cancel is seen promptly


def assign_shards(sizes: dict[str, int], shards: int) -> dict[str, int]:
    """Parameter name -> shard, largest first onto the lightest shard (deterministic)."""
    if shards > len(sizes):
        raise ValueError(
            f"ps_workers={shards} but the model has {len(sizes)} parameter tensor(s); use at"
            f" most {len(sizes)}."
        )
    load = [0] * shards
    out: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        shard = min(range(shards), key=lambda s: (load[s], s))
        out[name] = shard
        load[shard] += sizes[name]
    return out


class ParamServerShard:
    """One shard of the parameter server (a Dask actor: ``client.submit(..., actor=True)``)."""

    def __init__(self, index: int, world_size: int, mode: str,
                 max_staleness: int | None = None, timeout: float = 300.0) -> None:
        self.index, self.world_size, self.mode = index, world_size, mode
        self.max_staleness, self.timeout = max_staleness, timeout
        self.params: dict[str, torch.Tensor] = {}
        self.optimizer: Any = None
        self.groups: list[int] = []  # the user's param-group index of each optimizer group
        self.version = 0  # updates applied
        self.clocks = [0] * world_size  # pushes per trainer
        self.staleness: list[int] = []
        self.max_drift = 0  # the largest clock lead a released reply ever had (ps-async)
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._changed: asyncio.Condition | None = None
        self._ready: asyncio.Event | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:  # made on the worker's event loop, where methods run
            self._changed = asyncio.Condition()
            self._ready = asyncio.Event()
        return self._changed

    async def init(self, params: dict[str, torch.Tensor], optimizer_class: Any,
                   groups: list[dict[str, Any]], group_of: dict[str, int]) -> None:
        """Hold ``params`` and an ``optimizer_class`` over them with the user's groups."""
        cond = self._cond()
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        by_group: dict[int, list[torch.Tensor]] = {}
        for name, tensor in self.params.items():
            by_group.setdefault(group_of[name], []).append(tensor)
        self.groups = sorted(by_group)
        self.optimizer = optimizer_class(
            [{**groups[g], "params": by_group[g]} for g in self.groups])
        assert self._ready is not None
        self._ready.set()
        async with cond:
            cond.notify_all()

    async def pull(self) -> tuple[dict[str, torch.Tensor], int]:
        """The parameters and their version, once the shard is initialised."""
        self._cond()
        assert self._ready is not None
        await asyncio.wait_for(self._ready.wait(), self.timeout)
        return self._snapshot()

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], int]:
        return {n: p.detach().clone() for n, p in self.params.items()}, self.version

    def _apply(self, grads: dict[str, torch.Tensor], hyper: list[dict[str, Any]]) -> None:
        for group, user_group in zip(self.optimizer.param_groups, self.groups, strict=True):
            group.update(hyper[user_group])  # LR schedulers run on the trainers
        for name, tensor in self.params.items():
            tensor.grad = grads[name]
        self.optimizer.step()
        self.version += 1

    async def push(self, rank: int, version: int, grads: dict[str, torch.Tensor],
                   hyper: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], int, int]:
        """Take ``rank``'s gradients (computed at ``version``); reply with the parameters."""
        cond = self._cond()
        async with cond:
            if self.mode == "sync":
                start = self.version
                self._pending[rank] = grads
                if len(self._pending) == self.world_size:
                    mean = {n: sum(self._pending[r][n] / self.world_size
                                   for r in sorted(self._pending)) for n in self.params}
                    self._pending.clear()
                    self._apply(mean, hyper)  # type: ignore[arg-type]
                    cond.notify_all()
                else:
                    await asyncio.wait_for(cond.wait_for(lambda: self.version > start),
                                           self.timeout)
                params, now = self._snapshot()
                return params, now, 0
            staleness = self.version - version
            self.staleness.append(staleness)
            self._apply(grads, hyper)
            self.clocks[rank] += 1
            cond.notify_all()
            if self.max_staleness is not None:
                bound = self.max_staleness
                await asyncio.wait_for(
                    cond.wait_for(lambda: self.clocks[rank] - min(self.clocks) <= bound),
                    self.timeout)
            self.max_drift = max(self.max_drift, self.clocks[rank] - min(self.clocks))
            params, now = self._snapshot()
            return params, now, staleness

    async def finished(self, rank: int) -> None:
        """``rank`` pushes no more: the SSP bound no longer waits for it."""
        cond = self._cond()
        async with cond:
            self.clocks[rank] = max(self.clocks) + (self.max_staleness or 0) + 1
            cond.notify_all()

    async def state(self) -> dict[str, Any]:
        """Parameters, optimizer state and counters, copied (for commits)."""
        from ..rank.state import clone

        return clone({"params": {n: p.detach() for n, p in self.params.items()},
                      "optimizer": self.optimizer.state_dict(), "version": self.version,
                      "clocks": list(self.clocks)})

    async def load(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state` gave (the shard must be initialised)."""
        cond = self._cond()
        async with cond:
            with torch.no_grad():
                for name, tensor in self.params.items():
                    tensor.copy_(state["params"][name])
            self.optimizer.load_state_dict(state["optimizer"])
            self.version = state["version"]
            if len(state["clocks"]) == self.world_size:
                self.clocks = list(state["clocks"])
            cond.notify_all()

    async def stats(self) -> dict[str, Any]:
        """Staleness of every applied gradient, the largest SSP lead seen, updates applied."""
        return {"staleness": list(self.staleness), "max_drift": self.max_drift,
                "version": self.version}


def _call(future: Any) -> Any:
    """An actor reply, waited for in short slices so that a cancelled rank stops promptly."""
    while True:
        try:
            return future.result(timeout=CALL_POLL_S)
        except TimeoutError:
            cancel_point()


class ParamServerStrategy(Strategy):
    """A trainer: local model for forward/backward; ``optimizer.step()`` goes to the server."""

    replicated_state = False  # rank 0 commits the server shards' state

    def __init__(self, options: StrategyOptions, rank: int, world_size: int, device: Any,
                 servers: Sequence[Any] = (), timeout: float = 300.0) -> None:
        super().__init__(options, rank, world_size, device, servers, timeout)
        self._model: Any = None
        self._optimizer: Any = None
        self._shard_of: dict[str, int] = {}
        self._version = [0] * len(self.servers)
        self._staleness: list[int] = []
        self._pushes, self._since = 0, time.perf_counter()

    def wrap(self, model: Any, optimizer: Any, *, split: Sequence[str] | None,
             loss_fn: Any) -> Any:
        _no_pipeline_args(self.options.name, split, loss_fn)
        if self._model is not None:
            raise ValueError(f"--strategy {self.options.name} trains one model; ctx.prepare"
                             " was called twice.")
        if optimizer is None:
            raise ValueError(
                f"--strategy {self.options.name} runs the optimizer on the parameter server:"
                " pass it, ctx.prepare(model, optimizer)."
            )
        named = dict(model.named_parameters())
        self._shard_of = assign_shards({n: p.numel() for n, p in named.items()},
                                       len(self.servers))
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups)
                    for p in group["params"]}
        if self.rank == 0:
            groups = [{k: v for k, v in g.items() if k != "params"}
                      for g in optimizer.param_groups]
            futures = [server.init(
                {n: p.detach().cpu() for n, p in named.items() if self._shard_of[n] == s},
                type(optimizer), groups,
                {n: group_of[id(p)] for n, p in named.items() if self._shard_of[n] == s})
                for s, server in enumerate(self.servers)]
            for future in futures:
                _call(future)
        self._model, self._optimizer = model, optimizer
        self._receive([server.pull() for server in self.servers])
        optimizer.step = self._step  # the server applies the update
        return model

    def _receive(self, futures: list[Any]) -> list[int]:
        """Copy each shard's reply into the local model; the replies' staleness."""
        named = dict(self._model.named_parameters())
        stale = []
        with torch.no_grad():
            for shard, future in enumerate(futures):
                reply = _call(future)
                params, self._version[shard] = reply[0], reply[1]
                stale.extend(reply[2:])
                for name, value in params.items():
                    named[name].copy_(value)
        return stale

    def _step(self, closure: Any = None) -> None:
        """Push this rank's gradients to every shard; take the parameters they send back."""
        if closure is not None:
            raise ValueError(f"--strategy {self.options.name} does not take an optimizer"
                             " closure.")
        hyper = [{k: v for k, v in g.items() if k != "params"}
                 for g in self._optimizer.param_groups]
        grads: list[dict[str, torch.Tensor]] = [{} for _ in self.servers]
        for name, p in self._model.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[self._shard_of[name]][name] = grad.detach().to("cpu", copy=True)
        futures = [server.push(self.rank, self._version[s], grads[s], hyper)
                   for s, server in enumerate(self.servers)]
        self._staleness.extend(self._receive(futures))
        self._pushes += 1
        self._optimizer._opt_called = True  # LR schedulers check that step() ran

    def extra_state(self) -> Any:
        return [_call(server.state()) for server in self.servers]

    def restore(self, extra: Any) -> None:
        import torch.distributed as dist

        if self.rank == 0 and extra is not None:
            for future in [server.load(s) for server, s in zip(self.servers, extra,
                                                                strict=True)]:
                _call(future)
        dist.barrier()  # no push reaches a shard before its state is back
        self._receive([server.pull() for server in self.servers])

    def metrics(self) -> dict[str, float]:
        now = time.perf_counter()
        out: dict[str, float] = {"ps_pushes_per_s": self._pushes / max(now - self._since, 1e-9)}
        self._pushes, self._since = 0, now
        if self.options.name == "ps-async" and self._staleness:
            ordered = sorted(self._staleness)
            out["staleness_p50"] = float(statistics.median(ordered))
            out["staleness_p95"] = float(ordered[min(len(ordered) - 1,
                                                     int(0.95 * len(ordered)))])
            out["staleness_max"] = float(ordered[-1])
            self._staleness.clear()
        return out

    def finish(self) -> None:
        import torch.distributed as dist

        for future in [server.finished(self.rank) for server in self.servers]:
            _call(future)
        dist.barrier()  # every trainer's last push is in
        if self.rank == 0:
            self._receive([server.pull() for server in self.servers])

    def release(self) -> None:
        super().release()
        if self._optimizer is not None:
            vars(self._optimizer).pop("step", None)  # the class's own step again
        self._model = self._optimizer = None
