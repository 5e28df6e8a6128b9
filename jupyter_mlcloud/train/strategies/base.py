"""``--strategy ddp`` and the base every strategy refines.

Each strategy answers the same few questions: how to wrap the model, which ranks share a
batch, what a commit must hold beyond rank 0's state, what to put back on resume, which
metrics it adds, and what the notebook gets back. :class:`Strategy` answers them for
``DistributedDataParallel``, where every rank holds the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..options import StrategyOptions

# ---------------------------------------------------------------- worker side


class Strategy:
    """Data-parallel with DDP; the base every other strategy refines."""

    collective_state = False  # True: every rank takes part in gathering a commit's state
    replicated_state = True  # every rank holds the same whole state: each commits it
    data_parallel = True  # ranks split each batch (False: every rank sees every batch)

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


# ---------------------------------------------------------------- pipeline


