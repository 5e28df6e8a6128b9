"""How a model is distributed and stepped: ``--strategy ddp|fsdp|pipeline|ps-sync|ps-async``.

``StrategyOptions`` is what the launcher checks and ships; ``make_strategy`` builds, on each
rank, the object ``ctx.prepare`` delegates to. Each strategy answers the same few questions:
how to wrap the model, which ranks share a batch, what a commit must hold beyond rank 0's
state, what to put back on resume, which metrics it adds, and what the notebook gets back.

- ``ddp``: ``DistributedDataParallel``; every rank holds the whole model.
- ``fsdp``: FSDP2 ``fully_shard`` (GPUs / NCCL only).
- ``pipeline``: the model split into one stage per rank (``torch.distributed.pipelining``,
  GPipe or 1F1B over ``--microbatches``); every rank sees the same batches; the wrapped model
  trains with ``model.step(inputs, target)``.
- ``ps-sync`` / ``ps-async``: a parameter server held by Dask actors (see
  :mod:`.param_server`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

STRATEGIES = ("ddp", "fsdp", "pipeline", "ps-sync", "ps-async")
SCHEDULES = ("1f1b", "gpipe")
GPU_ONLY = ("fsdp",)
DEFAULT_MICROBATCHES = 4


def _whole(name: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")


@dataclass(frozen=True, kw_only=True)  # by name only: a reordered field cannot mis-wire
class StrategyOptions:
    """A run's ``--strategy`` and the options that belong to it."""

    name: str = "ddp"
    microbatches: int | None = None  # pipeline
    pipeline_schedule: str = "1f1b"  # pipeline
    ps_workers: int | None = None  # ps-*: parameter-server shards
    max_staleness: int | None = None  # ps-async: SSP bound

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> StrategyOptions:
        """The strategy options among ``options`` (e.g. a magic's parsed arguments, same
        names; ``name`` is the strategy)."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole model and optimizer state (so each commits it)."""
        return self.name == "ddp"

    @property
    def is_ps(self) -> bool:
        return self.name in ("ps-sync", "ps-async")

    @property
    def servers(self) -> int:
        """Parameter-server shards this run needs (0 for non-ps strategies)."""
        return (self.ps_workers or 1) if self.is_ps else 0

    def check(self, compression: str = "none") -> None:
        """One sentence for the first bad value or combination."""
        if self.name not in STRATEGIES:
            raise ValueError(
                f"strategy {self.name!r} is not available; allowed: {', '.join(STRATEGIES)}."
            )
        _whole("microbatches", self.microbatches, 1)
        _whole("ps_workers", self.ps_workers, 1)
        _whole("max_staleness", self.max_staleness, 0)
        if self.pipeline_schedule not in SCHEDULES:
            raise ValueError(
                f"pipeline_schedule {self.pipeline_schedule!r} is unknown; allowed:"
                f" {', '.join(SCHEDULES)}."
            )
        if self.name != "pipeline" and (self.microbatches is not None
                                        or self.pipeline_schedule != "1f1b"):
            raise ValueError(
                f"microbatches and pipeline_schedule only apply to strategy 'pipeline', not"
                f" {self.name!r}."
            )
        if not self.is_ps and self.ps_workers is not None:
            raise ValueError(
                f"ps_workers only applies to strategies 'ps-sync' and 'ps-async', not"
                f" {self.name!r}."
            )
        if self.name != "ps-async" and self.max_staleness is not None:
            raise ValueError(
                f"max_staleness only applies to strategy 'ps-async', not {self.name!r}."
            )
        if self.name != "ddp" and compression != "none":
            raise ValueError(
                f"compression {compression!r} works through DDP's gradient hooks; it applies"
                f" to strategy 'ddp' only, not {self.name!r}."
            )

    def check_backend(self, backend: str) -> None:
        """FSDP needs GPUs: say which strategies work on CPU workers."""
        if self.name in GPU_ONLY and backend != "nccl":
            others = ", ".join(s for s in STRATEGIES if s not in GPU_ONLY)
            raise ValueError(
                f"strategy {self.name!r} needs GPU workers (NCCL), and PyTorch does not"
                f" support it with gloo on CPU; on these workers use one of: {others}."
            )


# ---------------------------------------------------------------- worker side


class Strategy:
    """Data-parallel with DDP; the base every other strategy refines."""

    collective_state = False  # True: every rank takes part in gathering a commit's state
    replicated_state = True  # every rank holds the same whole state: each commits it

    def __init__(self, options: StrategyOptions, rank: int, world_size: int, device: Any,
                 servers: Sequence[Any] = (), timeout: float = 300.0) -> None:
        self.options, self.rank, self.world_size, self.device = options, rank, world_size, device
        self.servers, self.timeout = list(servers), timeout
        self.wrapped: list[Any] = []  # to drop before the process group is destroyed

    def data_view(self) -> tuple[int, int]:
        """(rank, world) for sharding the data: ranks that share a view get the same batches."""
        return self.rank, self.world_size

    def wrap(self, model: Any, optimizer: Any, *, split: Sequence[str] | None,
             loss_fn: Any) -> Any:
        """The model as the training code should use it (already on ``self.device``)."""
        from torch.nn.parallel import DistributedDataParallel

        _no_pipeline_args(self.options.name, split, loss_fn)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
        self.wrapped.append(wrapped)
        return wrapped

    def model_states(self, models: list[Any]) -> list[dict[str, Any]]:
        """The registered models' state dicts for a commit (rank 0's copy is the one kept)."""
        return [m.state_dict() for m in models]

    def optimizer_states(self, optimizers: list[Any]) -> list[dict[str, Any]]:
        return [o.state_dict() for o in optimizers]

    def load_states(self, models: list[Any], model_states: list[dict[str, Any]],
                    optimizers: list[Any], optimizer_states: list[dict[str, Any]]) -> None:
        """Put committed model and optimizer states back (a resume)."""
        for model, saved in zip(models, model_states, strict=False):
            model.load_state_dict(saved)
        for optimizer, saved in zip(optimizers, optimizer_states, strict=True):
            optimizer.load_state_dict(saved)

    def commit_slice(self) -> dict[str, Any] | None:
        """What this rank alone holds of the model and optimizer state (None: rank 0 has it)."""
        return None

    def extra_state(self) -> Any:
        """State outside the ranks (a parameter server's) that rank 0 commits."""
        return None

    def restore(self, extra: Any) -> None:
        """After a resume put the registered state back: put back ``extra_state()`` too."""

    def metrics(self) -> dict[str, float]:
        """Strategy metrics added to each ``ctx.report`` point."""
        return {}

    def finish(self) -> None:
        """Every rank, after the training code returned: bring results to rank 0."""

    def export(self, value: Any) -> Any:
        """What the notebook gets for ``value`` (a wrapped model: the plain module)."""
        from torch.nn.parallel import DistributedDataParallel

        return value.module if isinstance(value, DistributedDataParallel) else value

    def release(self) -> None:
        self.wrapped.clear()


def _no_pipeline_args(name: str, split: Sequence[str] | None, loss_fn: Any) -> None:
    if split is not None or loss_fn is not None:
        raise ValueError(
            f"ctx.prepare(split=..., loss_fn=...) is for --strategy pipeline; this run uses"
            f" {name!r}."
        )


class FSDPStrategy(Strategy):
    """FSDP2: each block and the root ``fully_shard``-ed; state gathered whole for commits."""

    replicated_state = False  # gathered to rank 0 only

    collective_state = True

    def wrap(self, model: Any, optimizer: Any, *, split: Sequence[str] | None,
             loss_fn: Any) -> Any:
        from torch.distributed.fsdp import fully_shard

        _no_pipeline_args(self.options.name, split, loss_fn)
        names = {id(p): n for n, p in model.named_parameters()}
        self._original = copy.deepcopy(model).to("cpu") if self.rank == 0 else None
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        if optimizer is not None:  # it was built on the unsharded parameters: point it anew
            now = dict(model.named_parameters())
            for group in optimizer.param_groups:
                group["params"] = [now[names[id(p)]] for p in group["params"]]
            optimizer.state.clear()
        self._model, self._optimizer = model, optimizer
        self.wrapped.append(model)
        return model

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_states(self, models: list[Any]) -> list[dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return [get_model_state_dict(m, options=self._options()) for m in models]

    def optimizer_states(self, optimizers: list[Any]) -> list[dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return [get_optimizer_state_dict(self._model, o, options=self._options())
                for o in optimizers]

    def load_states(self, models: list[Any], model_states: list[dict[str, Any]],
                    optimizers: list[Any], optimizer_states: list[dict[str, Any]]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True)  # every rank got the whole state
        for model, saved in zip(models, model_states, strict=False):
            set_model_state_dict(model, saved, options=whole)
        for optimizer, saved in zip(optimizers, optimizer_states, strict=True):
            set_optimizer_state_dict(self._model, optimizer, saved, options=whole)

    def finish(self) -> None:
        states = self.model_states([self._model])
        if self._original is not None:
            self._original.load_state_dict(states[0])

    def export(self, value: Any) -> Any:
        return self._original if value is self._model else value

    def release(self) -> None:
        super().release()
        self._model = self._optimizer = self._original = None


# ---------------------------------------------------------------- pipeline


def stage_bounds(sizes: list[int], stages: int) -> list[int]:
    """Start index of each stage over children of parameter counts ``sizes``, balanced."""
    if stages > len(sizes):
        raise ValueError(
            f"the model has {len(sizes)} child module(s), too few for {stages} pipeline"
            f" stages; use at most {len(sizes)} workers."
        )
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    starts = [0]
    for k in range(1, stages):
        # Cut nearest the k-th share of the parameters, leaving a child for every later
        # stage; on a tie cut later, so parameter-free layers close a stage.
        target = prefix[-1] * k / stages
        cuts = range(starts[-1] + 1, len(sizes) - (stages - k) + 1)
        starts.append(min(cuts, key=lambda i: (abs(prefix[i] - target), -i)))
    return starts


def split_starts(model: Any, split: Sequence[str] | None, stages: int) -> list[int]:
    """Start index of each stage among ``model``'s children (``split`` names the starts)."""
    import torch

    if not isinstance(model, torch.nn.Sequential):
        raise ValueError(
            "--strategy pipeline splits an nn.Sequential into stages; got"
            f" {type(model).__name__} (wrap its blocks in nn.Sequential)."
        )
    names = [name for name, _ in model.named_children()]
    if split is None:
        return stage_bounds([sum(p.numel() for p in c.parameters()) for c in model], stages)
    if isinstance(split, str):
        split = [split]
    unknown = [s for s in split if s not in names[1:]]
    if unknown:
        raise ValueError(
            f"split point {unknown[0]!r} names no submodule a stage can start at; allowed:"
            f" {', '.join(names[1:])}."
        )
    starts = [0] + sorted(names.index(s) for s in split)
    if len(set(starts)) != len(starts):
        raise ValueError(f"split {list(split)} names a submodule twice.")
    if len(starts) != stages:
        raise ValueError(
            f"split {list(split)} makes {len(starts)} stages but the run has {stages} rank(s);"
            f" pipeline needs one rank per stage: run with --workers {len(starts)} or pass"
            f" {stages - 1} split point(s)."
        )
    return starts


class PipelineModel:
    """This rank's pipeline stage; ``step(inputs, target)`` trains one batch on every rank.

    ``module`` is the whole model (brought up to date on rank 0 when the run ends), so
    ``--out`` returns it in one piece.
    """

    def __init__(self, module: Any, stage_module: Any, schedule: Any, strategy: PipelineStrategy,
                 microbatches: int) -> None:
        self.module, self.stage_module, self.schedule = module, stage_module, schedule
        self._strategy, self.microbatches = strategy, microbatches

    def step(self, inputs: Any, target: Any) -> Any:
        """Forward and backward of one batch over the microbatches; the mean loss (every rank).

        Call ``optimizer.zero_grad()`` before and ``optimizer.step()`` after, as usual.
        """
        import torch
        import torch.distributed as dist

        n = int(inputs.shape[0])
        if n % self.microbatches:
            raise ValueError(
                f"a batch of {n} samples does not split into --microbatches"
                f" {self.microbatches}; use a batch size divisible by it (and drop_last=True"
                " in ctx.shard for a short last batch)."
            )
        s = self._strategy
        first, last = s.rank == 0, s.rank == s.world_size - 1
        losses: list[Any] = []
        started = time.perf_counter()
        s.compute_s = 0.0
        self.schedule.step(*((inputs,) if first else ()), target=target if last else None,
                           losses=losses if last else None, return_outputs=False)
        s.note_step(time.perf_counter() - started)
        loss = (torch.stack([x.detach() for x in losses]).mean() if last
                else torch.zeros((), dtype=s.loss_dtype))
        if s.world_size > 1:
            dist.broadcast(loss, src=s.world_size - 1)
        return loss

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "under --strategy pipeline, train with loss = model.step(inputs, target) (forward"
            " and backward over the microbatches); evaluate the --out model in the notebook."
        )

    def parameters(self) -> Any:
        """This rank's stage's parameters."""
        return self.stage_module.parameters()


class PipelineStrategy(Strategy):
    """One stage per rank; every rank draws the same batches (only the ends use them)."""

    replicated_state = False  # each rank trains its own stage

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stage_keys: list[set[str]] = []
        self._param_ids: list[set[int]] = []
        self._optimizers: list[Any] = []
        self._models: list[Any] = []
        self.compute_s = 0.0  # time in this stage's forward/backward during the current step
        self._bubbles: list[float] = []
        self.loss_dtype: Any = None

    def data_view(self) -> tuple[int, int]:
        return 0, 1

    def wrap(self, model: Any, optimizer: Any, *, split: Sequence[str] | None,
             loss_fn: Any) -> Any:
        import torch
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if loss_fn is None:
            raise ValueError(
                "--strategy pipeline needs the loss: ctx.prepare(model, optimizer,"
                " loss_fn=...), called as loss_fn(output, target) on the last stage."
            )
        starts = split_starts(model, split, self.world_size)
        ends = [*starts[1:], len(model)]
        stage_module = torch.nn.Sequential(*list(model)[starts[self.rank]:ends[self.rank]])
        names = [n for n, _ in model.named_children()][starts[self.rank]:ends[self.rank]]
        self._stage_keys.append({k for k in model.state_dict()
                                 if k.split(".", 1)[0] in names})
        self._param_ids.append({id(p) for p in stage_module.parameters()})
        self._models.append(model)
        if optimizer is not None:
            self._optimizers.append(optimizer)
        self.loss_dtype = next(model.parameters()).dtype
        stage = PipelineStage(stage_module, self.rank, self.world_size, self.device)
        for name in ("forward_one_chunk", "backward_one_chunk"):
            setattr(stage, name, self._timed(getattr(stage, name)))
        microbatches = self.options.microbatches or DEFAULT_MICROBATCHES
        kind = Schedule1F1B if self.options.pipeline_schedule == "1f1b" else ScheduleGPipe
        schedule = kind(stage, n_microbatches=microbatches, loss_fn=loss_fn)
        wrapped = PipelineModel(model, stage_module, schedule, self, microbatches)
        self.wrapped.append(wrapped)
        return wrapped

    def _timed(self, method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.compute_s += time.perf_counter() - started

        return timed

    def note_step(self, seconds: float) -> None:
        if seconds > 0:
            self._bubbles.append(max(0.0, 1.0 - self.compute_s / seconds))

    def metrics(self) -> dict[str, float]:
        if not self._bubbles:
            return {}
        bubble = sum(self._bubbles) / len(self._bubbles)
        self._bubbles.clear()
        return {"pipeline_bubble": bubble}

    def _slice(self) -> dict[str, Any]:
        """This rank's stage of every prepared model, and its optimizers' state for it."""
        models = [{k: v for k, v in m.state_dict().items() if k in keys}
                  for m, keys in zip(self._models, self._stage_keys, strict=True)]
        mine = set().union(*self._param_ids) if self._param_ids else set()
        optimizers = []
        for optimizer in self._optimizers:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            state = optimizer.state_dict()["state"]
            optimizers.append({i: s for i, s in state.items() if id(params[i]) in mine})
        return {"models": models, "optimizers": optimizers}

    def commit_slice(self) -> dict[str, Any] | None:
        if self.rank == 0:
            return None  # rank 0's full state already holds its own stage
        return self._slice()  # live views: the commit copies them

    def finish(self) -> None:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size if self.rank == 0 else []
        dist.gather_object(self._slice() if self.rank else None,
                           gathered if self.rank == 0 else None, dst=0)
        if self.rank == 0:
            for piece in gathered[1:]:
                for model, state in zip(self._models, piece["models"], strict=True):
                    model.load_state_dict(state, strict=False)

    def export(self, value: Any) -> Any:
        return value.module if isinstance(value, PipelineModel) else value

    def release(self) -> None:
        super().release()
        self._models.clear()
        self._optimizers.clear()


def merge_slices(state: dict[str, Any], per_rank: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's committed state with every other rank's own slice of it laid over.

    Under ``pipeline`` each rank trains only its stage; the whole model and optimizer state of
    a commit is the union of the ranks' slices (a resume may split it differently).
    """
    slices = [local["slice"] for _, local in sorted(per_rank.items())
              if local and local.get("slice")]
    if not slices:
        return state
    merged = {**state, "models": [dict(m) for m in state["models"]],
              "optimizers": [{**o, "state": dict(o["state"])} for o in state["optimizers"]]}
    for piece in slices:
        for model, part in zip(merged["models"], piece["models"], strict=False):
            model.update(part)
        for optimizer, part in zip(merged["optimizers"], piece["optimizers"], strict=False):
            optimizer["state"].update(part)
    return merged


def make_strategy(options: StrategyOptions, rank: int, world_size: int, device: Any,
                  servers: Sequence[Any] = (), timeout: float = 300.0) -> Strategy:
    """The strategy object for one rank."""
    if options.is_ps:
        from .param_server import ParamServerStrategy

        return ParamServerStrategy(options, rank, world_size, device, servers, timeout)
    kind = {"fsdp": FSDPStrategy, "pipeline": PipelineStrategy}.get(options.name, Strategy)
    return kind(options, rank, world_size, device, servers, timeout)
