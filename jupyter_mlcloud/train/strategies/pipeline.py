"""``--strategy pipeline``: one stage per rank over ``torch.distributed.pipelining``.

Every rank sees the same batches; the wrapped model trains with ``model.step(inputs,
target)``. A commit's whole state is the union of the ranks' stage slices
(:func:`merge_slices`), so a resume may split the model differently.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..options import DEFAULT_MICROBATCHES
from .base import Strategy


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
    data_parallel = False  # so the elastic rules leave the batch as it is on any stage count

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
