"""How a model is distributed and stepped: ``--strategy ddp|fsdp|pipeline|ps-sync|ps-async``.

``StrategyOptions`` (:mod:`..options`) is what the launcher checks and ships;
``make_strategy`` builds, on each rank, the object ``ctx.prepare`` delegates to. Each strategy
answers the same few questions: how to wrap the model, which ranks share a batch, what a commit
must hold beyond rank 0's state, what to put back on resume, which metrics it adds, and what the
notebook gets back.

- ``ddp`` (:mod:`.base`): ``DistributedDataParallel``; every rank holds the whole model.
- ``fsdp`` (:mod:`.fsdp`): FSDP2 ``fully_shard`` (GPUs / NCCL only).
- ``pipeline`` (:mod:`.pipeline`): the model split into one stage per rank
  (``torch.distributed.pipelining``, GPipe or 1F1B over ``--microbatches``); every rank sees
  the same batches; the wrapped model trains with ``model.step(inputs, target)``.
- ``ps-sync`` / ``ps-async`` (:mod:`.param_server`): a parameter server held by Dask actors.
- :mod:`.compression`: DDP gradient-compression hooks (``--compression``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..options import StrategyOptions
from .base import Strategy
from .fsdp import FSDPStrategy
from .param_server import ParamServerStrategy
from .pipeline import PipelineStrategy

__all__ = ["Strategy", "make_strategy"]


def make_strategy(options: StrategyOptions, rank: int, world_size: int, device: Any,
                  servers: Sequence[Any] = (), timeout: float = 300.0) -> Strategy:
    """The strategy object for one rank."""
    if options.is_ps:
        return ParamServerStrategy(options, rank, world_size, device, servers, timeout)
    kind = {"fsdp": FSDPStrategy, "pipeline": PipelineStrategy}.get(options.name, Strategy)
    return kind(options, rank, world_size, device, servers, timeout)
