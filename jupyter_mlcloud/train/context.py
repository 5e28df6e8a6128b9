"""``ctx``: what user training code sees on each rank."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .. import metrics
from .sharding import Shard


class TrainContext:
    """Handed to the training cell (as ``ctx``) or function (as its argument) on every rank.

    ``rank``, ``world_size``, ``local_rank`` and ``device`` say where the code runs;
    ``prepare`` wraps the model for data-parallel training; ``shard`` gives this rank's
    batches; ``epochs`` counts epochs; ``report`` sends metrics to the live panels.
    """

    def __init__(
        self,
        *,
        run_id: str,
        rank: int,
        world_size: int,
        local_rank: int,
        device: torch.device,
        seed: int,
        default_epochs: int | None,
        reporter: metrics.EventBatcher | None,
    ) -> None:
        self.run_id = run_id
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.seed = seed
        self.epoch = 0
        self.step = 0
        self._default_epochs = default_epochs
        self._reporter = reporter
        self._wrapped: list[Any] = []  # DDP modules to drop before the group is destroyed
        self._cache: dict[int, list[torch.Tensor]] = {}

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank whose results come back to the notebook."""
        return self.rank == 0

    def prepare(self, model: torch.nn.Module, optimizer: Any = None) -> Any:
        """Move ``model`` to ``ctx.device`` and wrap it in ``DistributedDataParallel``.

        Build the optimizer on the model's parameters before or after: DDP keeps the same
        parameter objects, and moving to CPU changes nothing. Returns the wrapped model.
        """
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"ctx.prepare needs a torch.nn.Module, got {type(model).__name__}."
            )
        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
        self._wrapped.append(wrapped)
        return wrapped

    def shard(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        sample_dim: str | None = None,
        variables: Sequence[str] | None = None,
    ) -> Shard:
        """This rank's batches of ``data`` for the current epoch (see :mod:`.sharding`).

        ``data``: a torch ``Dataset``, a tensor or numpy array, a tuple of them (batches come
        as tuples), an xarray ``DataArray``/``Dataset`` (``sample_dim`` names the sample
        dimension, default the first; ``variables`` picks and orders a Dataset's variables),
        or dask arrays. Lazy data is loaded by each rank for its own samples only.
        """
        return Shard(
            data,
            batch_size,
            rank=self.rank,
            world_size=self.world_size,
            epoch=self.epoch,
            shuffle=shuffle,
            seed=self.seed if seed is None else seed,
            drop_last=drop_last,
            sample_dim=sample_dim,
            variables=variables,
            device=self.device,
            cache=self._cache,
        )

    def epochs(self, n: int | None = None) -> Iterator[int]:
        """Yield epoch numbers 0..n-1 (``n`` defaults to ``--epochs``), keeping ``ctx.epoch``."""
        n = self._default_epochs if n is None else n
        if n is None:
            raise ValueError("ctx.epochs() needs a count: pass one, or run with --epochs N.")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ctx.epochs needs a whole number >= 0, got {n!r}.")
        for epoch in range(n):
            self.epoch = epoch
            yield epoch

    def report(self, step: int | None = None, **values: Any) -> None:
        """Send metrics (numbers or one-element tensors) to the live panels and ``run.metrics``.

        ``step`` defaults to a counter that grows by one per call.
        """
        self.step = self.step + 1 if step is None else int(step)
        if self._reporter is not None:
            self._reporter.add(metrics.point(self.rank, self.step, self.epoch, values))

    def release(self) -> None:
        """Drop every reference this context holds to wrapped models and loaded data."""
        self._wrapped.clear()
        self._cache.clear()
