"""Each rank's share of a dataset, batched: what ``ctx.shard`` returns.

In-memory data (tensors, numpy arrays, torch ``Dataset``) follows ``DistributedSampler``: one
permutation of all samples per epoch, the same on every rank, and rank ``r`` takes every
``world``-th sample from position ``r``. Lazy data (xarray, dask arrays) is split into one
contiguous block per rank, which only that rank loads (once), then shuffled inside the block
each epoch. Either way every rank gets the same number of samples (short shares are padded by
wrapping around, as ``DistributedSampler`` does), so collectives never wait on a missing batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def strided_indices(n: int, rank: int, world: int, order: np.ndarray) -> np.ndarray:
    """Rank ``rank``'s positions in ``order`` (length ``n``), padded to ``ceil(n / world)``."""
    per_rank = math.ceil(n / world)
    padded = np.resize(order, per_rank * world)  # wraps around: DistributedSampler's padding
    return padded[rank::world]


def block_range(n: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s contiguous block of ``range(n)``, padded to ``ceil(n / world)``."""
    per_rank = math.ceil(n / world)
    start = rank * per_rank
    return np.arange(start, start + per_rank) % n


def _is_lazy(data: Any) -> bool:
    module = type(data).__module__
    return module.startswith(("xarray.", "dask."))


def _columns(data: Any, sample_dim: str | None, variables: Sequence[str] | None) -> list[Any]:
    """The data as a list of columns that share their first (sample) axis."""
    if isinstance(data, (tuple, list)):
        return list(data)
    if type(data).__name__ == "Dataset" and type(data).__module__.startswith("xarray."):
        names = list(variables) if variables else list(data.data_vars)
        missing = [v for v in names if v not in data.data_vars]
        if missing:
            raise ValueError(
                f"variables {missing} are not in the dataset; it has {list(data.data_vars)}."
            )
        return [data[v] for v in names]
    return [data]


def _sample_axis_first(column: Any, sample_dim: str | None) -> Any:
    if hasattr(column, "dims") and hasattr(column, "transpose"):  # xarray
        dim = sample_dim or column.dims[0]
        if dim not in column.dims:
            raise ValueError(
                f"sample dimension {dim!r} is not among the data's dims {tuple(column.dims)};"
                " pass sample_dim= with one of them."
            )
        return column.transpose(dim, ...)
    return column


def _length(columns: list[Any]) -> int:
    lengths = {int(c.shape[0]) if hasattr(c, "shape") else len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"the data's columns have different sample counts: {sorted(lengths)}.")
    return lengths.pop()


def _load(column: Any, index: np.ndarray) -> torch.Tensor:
    """Rows ``index`` of one column as a tensor; lazy columns are computed here, in this thread."""
    if hasattr(column, "isel"):  # xarray: keep to the rank's rows, then load
        column = column.isel({column.dims[0]: index}).data
        index = None  # type: ignore[assignment]
    elif index is not None:
        column = column[torch.as_tensor(index) if isinstance(column, torch.Tensor) else index]
    if hasattr(column, "compute"):
        # The synchronous scheduler: the rank's thread reads its own rows; the cluster's
        # threads are busy training, so a distributed compute here could never run.
        column = column.compute(scheduler="sync")
    return column if isinstance(column, torch.Tensor) else torch.as_tensor(np.asarray(column))


class Shard:
    """An iterable over one rank's batches of ``data`` for the current epoch."""

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        epoch: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        sample_dim: str | None = None,
        variables: Sequence[str] | None = None,
        device: torch.device | None = None,
        cache: dict[int, list[torch.Tensor]] | None = None,
        tracker: Any = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        self.data = data
        self.batch_size = batch_size
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.device = device
        self._dataset = isinstance(data, torch.utils.data.Dataset)
        self._lazy = not self._dataset and _is_lazy(data)
        if self._dataset:
            self._columns: list[Any] = []
            self.n = len(data)  # type: ignore[arg-type]
        else:
            self._columns = [_sample_axis_first(c, sample_dim)
                             for c in _columns(data, sample_dim, variables)]
            self.n = _length(self._columns)
        if self.n == 0:
            raise ValueError("the data to shard has no samples.")
        self._cache = cache if cache is not None else {}
        # ``ctx``: told when a loop starts, before each batch and at the end (steps, commits,
        # resume); it says how many batches a resumed loop skips.
        self._tracker = tracker

    def indices(self) -> np.ndarray:
        """This rank's sample indices for this epoch, in the order they are served."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self._lazy:
            own = block_range(self.n, self.rank, self.world_size)
            return rng.permutation(own) if self.shuffle else own
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return strided_indices(self.n, self.rank, self.world_size, order)

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world_size)
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def _lazy_block(self) -> tuple[np.ndarray, list[torch.Tensor]]:
        """Load this rank's block once; later epochs reuse it."""
        own = block_range(self.n, self.rank, self.world_size)
        key = id(self.data)
        if key not in self._cache:
            self._cache[key] = [_load(c, own) for c in self._columns]
        return own, self._cache[key]

    def __iter__(self) -> Iterator[Any]:
        skip = self._tracker._loop_start() if self._tracker is not None else 0
        if skip is None:
            return  # a loop a resumed attempt has already done
        count = 0
        for count, batch in enumerate(self._batches(skip), start=skip + 1):
            if self._tracker is not None:
                self._tracker._before_batch(count - 1)
            yield batch
        if self._tracker is not None:
            self._tracker._loop_end(max(count, min(skip, len(self))))

    def _batches(self, skip: int) -> Iterator[Any]:
        """Batches ``skip``, ``skip + 1``, ... of this epoch (skipped ones are never loaded)."""
        index = self.indices()
        if self._lazy:
            own, block = self._lazy_block()
            position = {int(g): i for i, g in enumerate(own)}  # global -> row in block
            local = np.array([position[int(g)] for g in index])
            source: list[Any] = block
            index = local
        else:
            source = self._columns
        for start in range(skip * self.batch_size, len(index), self.batch_size):
            batch_index = index[start : start + self.batch_size]
            if self.drop_last and len(batch_index) < self.batch_size:
                return
            if self._dataset:
                batch = torch.utils.data.default_collate([self.data[int(i)] for i in batch_index])
                yield self._to_device(batch)
                continue
            columns = [
                c[torch.as_tensor(batch_index)] if isinstance(c, torch.Tensor)
                else _load(c, batch_index)
                for c in source
            ]
            moved = [self._to_device(c) for c in columns]
            yield moved[0] if len(moved) == 1 else tuple(moved)

    def _to_device(self, batch: Any) -> Any:
        if self.device is None or self.device.type == "cpu":
            return batch
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch
