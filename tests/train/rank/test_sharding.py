"""Unit tests of :mod:`jupyter_mlcloud.train.rank.sharding`: each rank's sample indices, padding,
shuffling and batching, checked against ``DistributedSampler`` and hand-worked cases.

No process group: ranks are simulated by building one :class:`Shard` per rank.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils.data import DistributedSampler, TensorDataset

from jupyter_mlcloud.train.rank.sharding import Shard, block_range, strided_indices

SIZES = [1, 2, 3, 5, 10, 16, 17, 31]
WORLDS = [1, 2, 3, 4, 7]


def shards(data: Any, world: int, batch_size: int = 4, **options: Any) -> list[Shard]:
    options.setdefault("epoch", 0)
    return [Shard(data, batch_size, rank=r, world_size=world, **options) for r in range(world)]


def order_from(indices_per_rank: list[np.ndarray]) -> list[int]:
    """The epoch's order of all (padded) positions, rebuilt from the ranks' strided shares."""
    world = len(indices_per_rank)
    per_rank = len(indices_per_rank[0])
    return [int(indices_per_rank[p % world][p // world]) for p in range(per_rank * world)]


# ---------------------------------------------------------------- strided (in-memory) shares


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("world", WORLDS)
def test_strided_shares_match_distributed_sampler(n: int, world: int) -> None:
    for rank in range(world):
        sampler: DistributedSampler[Any] = DistributedSampler(
            TensorDataset(torch.zeros(n)), num_replicas=world, rank=rank, shuffle=False)
        assert strided_indices(n, rank, world, np.arange(n)).tolist() == list(sampler)


def test_strided_shares_worked_by_hand() -> None:
    order = np.arange(10)
    assert [strided_indices(10, r, 4, order).tolist() for r in range(4)] == [
        [0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]]  # 2 padding samples, wrapped from the start
    assert [strided_indices(2, r, 5, np.arange(2)).tolist() for r in range(5)] == [
        [0], [1], [0], [1], [0]]  # more ranks than samples: wraps more than once


def test_strided_shares_follow_the_given_order() -> None:
    order = np.array([7, 3, 9, 0, 5, 1, 8, 2, 6, 4])
    assert [strided_indices(10, r, 3, order).tolist() for r in range(3)] == [
        [7, 0, 8, 4], [3, 5, 2, 7], [9, 1, 6, 3]]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("world", WORLDS)
def test_shares_are_equal_and_cover_every_sample_padding_only_as_needed(n: int,
                                                                        world: int) -> None:
    per_rank = math.ceil(n / world)
    got = [s.indices() for s in shards(torch.zeros(n, 2), world, seed=5)]
    assert all(len(share) == per_rank for share in got)
    counts = Counter(int(i) for share in got for i in share)
    assert set(counts) == set(range(n))
    assert sum(counts.values()) == per_rank * world
    extra = per_rank * world - n  # the padding: that many samples served twice (or more)
    assert sum(c - 1 for c in counts.values()) == extra
    if extra == 0:
        assert all(c == 1 for c in counts.values())


def test_padding_repeats_the_first_samples_of_the_epochs_order() -> None:
    got = [s.indices() for s in shards(torch.zeros(10), 4, seed=3)]
    order = order_from(got)
    assert sorted(order[:10]) == list(range(10))
    assert order[10:] == order[:2]


def test_unshuffled_shares_are_in_data_order() -> None:
    got = [s.indices().tolist() for s in shards(torch.zeros(9), 3, shuffle=False)]
    assert got == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_shuffling_is_one_permutation_per_epoch_shared_by_all_ranks() -> None:
    data = torch.zeros(24)
    first = [s.indices() for s in shards(data, 4, seed=11, epoch=0)]
    order = order_from(first)
    assert sorted(order) == list(range(24)) and order != list(range(24))
    # The same seed and epoch: the same shares, from a fresh Shard (another process).
    again = [s.indices() for s in shards(data, 4, seed=11, epoch=0)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    # The permutation does not depend on the world: 2 or 3 ranks split the same order.
    for world in (1, 2, 3, 6):
        assert order_from([s.indices() for s in shards(data, world, seed=11)]) == order
    # Another epoch or another seed: another order.
    assert order_from([s.indices() for s in shards(data, 4, seed=11, epoch=1)]) != order
    assert order_from([s.indices() for s in shards(data, 4, seed=12, epoch=0)]) != order


def test_epochs_reshuffle_but_each_epoch_covers_the_data() -> None:
    orders = [order_from([s.indices() for s in shards(torch.zeros(20), 2, seed=0, epoch=e)])
              for e in range(5)]
    assert all(sorted(o) == list(range(20)) for o in orders)
    assert len({tuple(o) for o in orders}) == 5


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize(("n", "world", "batch", "drop_last", "sizes"), [
    (10, 4, 2, False, [2, 1]),  # 3 samples each
    (10, 4, 2, True, [2]),
    (10, 4, 3, False, [3]),
    (10, 4, 3, True, [3]),
    (10, 4, 4, False, [3]),  # a batch larger than the share: one short batch
    (10, 4, 4, True, []),  # ...or none at all
    (64, 2, 16, False, [16, 16]),
    (65, 2, 16, False, [16, 16, 1]),
    (65, 2, 16, True, [16, 16]),
    (7, 1, 3, False, [3, 3, 1]),
])
def test_batch_counts_and_sizes(n: int, world: int, batch: int, drop_last: bool,
                                sizes: list[int]) -> None:
    for shard in shards(torch.arange(n), world, batch_size=batch, drop_last=drop_last):
        got = [len(b) for b in shard]
        assert got == sizes
        assert len(shard) == len(sizes)


def test_batches_hold_the_rows_of_the_indices_in_order() -> None:
    x = torch.arange(30, dtype=torch.float64).reshape(15, 2)
    y = torch.arange(15) * 10
    for shard in shards((x, y), 2, batch_size=3, seed=4, epoch=2):
        index = shard.indices()
        batches = list(shard)
        assert all(isinstance(b, tuple) and len(b) == 2 for b in batches)
        xs = torch.cat([b[0] for b in batches])
        ys = torch.cat([b[1] for b in batches])
        assert torch.equal(xs, x[torch.as_tensor(index)])
        assert torch.equal(ys, y[torch.as_tensor(index)])
        assert torch.equal(ys, (xs[:, 0] / 2 * 10).long())  # rows stay paired


def test_one_column_gives_plain_tensors_and_numpy_becomes_torch() -> None:
    data = np.arange(12, dtype=np.float32).reshape(6, 2)
    (shard,) = shards(data, 1, batch_size=4, shuffle=False)
    batches = list(shard)
    assert all(isinstance(b, torch.Tensor) for b in batches)
    assert torch.equal(torch.cat(batches), torch.as_tensor(data))
    assert batches[0].dtype == torch.float32


def test_a_list_of_columns_is_batched_as_tuples() -> None:
    (shard,) = shards([np.arange(4), np.arange(4) * 2], 1, batch_size=2, shuffle=False)
    first = next(iter(shard))
    assert isinstance(first, tuple)
    assert first[0].tolist() == [0, 1] and first[1].tolist() == [0, 2]


def test_a_torch_dataset_is_collated() -> None:
    dataset = TensorDataset(torch.arange(10.0), torch.arange(10) * 3)
    all_x: list[float] = []
    for shard in shards(dataset, 3, batch_size=2, seed=1):
        for xb, yb in shard:
            assert torch.equal(yb, xb.long() * 3)
            all_x += xb.tolist()
    assert sorted(set(all_x)) == [float(i) for i in range(10)]
    assert len(all_x) == 12  # 4 per rank: 2 samples of padding


def test_a_dataset_of_dicts_is_collated_per_key() -> None:
    class Pairs(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.tensor([i, i]), "y": torch.tensor(i * i)}

    (shard,) = shards(Pairs(), 1, batch_size=5, shuffle=False)
    (batch,) = list(shard)
    assert batch["x"].shape == (5, 2) and batch["y"].tolist() == [0, 1, 4, 9, 16]


def test_union_of_all_ranks_batches_is_the_data() -> None:
    data = torch.arange(100)
    seen = torch.cat([b for shard in shards(data, 4, batch_size=7, seed=9) for b in shard])
    assert sorted(seen.tolist()) == list(range(100))


# ---------------------------------------------------------------- lazy data: contiguous blocks


def test_blocks_worked_by_hand() -> None:
    assert [block_range(10, r, 4).tolist() for r in range(4)] == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]
    assert [block_range(6, r, 3).tolist() for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [block_range(2, r, 3).tolist() for r in range(3)] == [[0], [1], [0]]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("world", WORLDS)
def test_blocks_are_equal_contiguous_and_cover_the_data(n: int, world: int) -> None:
    per_rank = math.ceil(n / world)
    blocks = [block_range(n, r, world) for r in range(world)]
    assert all(len(b) == per_rank for b in blocks)
    assert set(np.concatenate(blocks).tolist()) == set(range(n))
    flat = np.concatenate(blocks)
    # Laid end to end the blocks count up from 0, wrapping at n.
    assert flat.tolist() == [i % n for i in range(per_rank * world)]


def test_a_dask_array_is_split_into_blocks_shuffled_within() -> None:
    values = np.arange(40, dtype=np.float64).reshape(20, 2)
    data = da.from_array(values, chunks=(7, 2))
    for rank, shard in enumerate(shards(data, 3, batch_size=3, seed=2, epoch=1)):
        own = block_range(20, rank, 3)
        index = shard.indices()
        assert sorted(index.tolist()) == sorted(own.tolist())
        assert index.tolist() != own.tolist()  # shuffled inside the block
        rows = torch.cat(list(shard))
        assert torch.equal(rows, torch.as_tensor(values[index]))


def test_lazy_blocks_reshuffle_each_epoch_and_load_once() -> None:
    data = da.from_array(np.arange(12.0), chunks=4)
    cache: dict[int, list[torch.Tensor]] = {}
    orders = []
    for epoch in range(3):
        shard = Shard(data, 2, rank=1, world_size=2, epoch=epoch, seed=0, cache=cache)
        orders.append(torch.cat(list(shard)).tolist())
        assert len(cache) == 1  # the block is loaded in the first epoch only
    assert all(sorted(o) == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0] for o in orders)
    assert len({tuple(o) for o in orders}) > 1


def test_unshuffled_lazy_blocks_are_in_order() -> None:
    data = da.from_array(np.arange(10.0), chunks=5)
    got = [torch.cat(list(s)).tolist() for s in shards(data, 4, batch_size=2, shuffle=False)]
    assert got == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0], [9.0, 0.0, 1.0]]


def test_an_xarray_dataset_is_split_along_its_sample_dim() -> None:
    ds = xr.Dataset({"a": (("time", "x"), np.arange(16.0).reshape(8, 2)),
                     "b": (("x", "time"), np.arange(16.0).reshape(2, 8) + 100)})
    (shard,) = shards(ds.chunk({"time": 3}), 1, batch_size=8, shuffle=False,
                      sample_dim="time", variables=["b", "a"])
    ((b, a),) = list(shard)
    assert a.shape == (8, 2) and b.shape == (8, 2)  # the sample dim first
    assert torch.equal(b[:, 0], torch.arange(8.0) + 100)
    assert torch.equal(a[:, 1], torch.arange(1.0, 16.0, 2))


def test_xarray_names_a_missing_variable_or_sample_dim() -> None:
    ds = xr.Dataset({"a": (("time",), np.arange(4.0))})
    with pytest.raises(ValueError, match=re.escape("variables ['c'] are not in the dataset;"
                                                   " it has ['a']")):
        Shard(ds, 2, rank=0, world_size=1, epoch=0, variables=["a", "c"])
    with pytest.raises(ValueError, match="sample dimension 'sample' is not among the data's dims"
                                         r" \('time',\)"):
        Shard(ds, 2, rank=0, world_size=1, epoch=0, sample_dim="sample")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.0, "4", None])
def test_batch_size_must_be_a_positive_integer(batch_size: Any) -> None:
    with pytest.raises(ValueError) as caught:
        Shard(torch.zeros(4), batch_size, rank=0, world_size=1, epoch=0)
    assert str(caught.value) == f"batch_size must be an integer >= 1, got {batch_size!r}."


def test_no_samples_and_uneven_columns_are_refused() -> None:
    with pytest.raises(ValueError, match="the data to shard has no samples"):
        Shard(torch.zeros(0, 3), 2, rank=0, world_size=2, epoch=0)
    with pytest.raises(ValueError, match=re.escape("different sample counts: [4, 5]")):
        Shard((torch.zeros(5), np.zeros(4)), 2, rank=0, world_size=1, epoch=0)


# ---------------------------------------------------------------- resuming inside a loop


class Tracker:
    """What ``ctx`` is told by a Shard: the loop's start (answering how many batches to skip),
    each batch and the end."""

    def __init__(self, skip: int | None) -> None:
        self.skip = skip
        self.calls: list[tuple[str, int | None]] = []

    def _loop_start(self) -> int | None:
        self.calls.append(("start", None))
        return self.skip

    def _before_batch(self, index: int) -> None:
        self.calls.append(("batch", index))

    def _loop_end(self, count: int) -> None:
        self.calls.append(("end", count))


def test_a_tracked_loop_is_told_each_batch_and_its_end() -> None:
    tracker = Tracker(skip=0)
    shard = Shard(torch.arange(10), 4, rank=0, world_size=1, epoch=0, shuffle=False,
                  tracker=tracker)
    assert [b.tolist() for b in shard] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert tracker.calls == [("start", None), ("batch", 0), ("batch", 1), ("batch", 2),
                             ("end", 3)]


def test_a_resumed_loop_skips_its_done_batches_without_changing_the_rest() -> None:
    data = torch.arange(20)
    full = list(Shard(data, 3, rank=1, world_size=2, epoch=4, seed=8))
    tracker = Tracker(skip=2)
    resumed = list(Shard(data, 3, rank=1, world_size=2, epoch=4, seed=8, tracker=tracker))
    assert [b.tolist() for b in resumed] == [b.tolist() for b in full[2:]]
    assert tracker.calls == [("start", None), ("batch", 2), ("batch", 3), ("end", 4)]


def test_a_loop_already_done_yields_nothing() -> None:
    tracker = Tracker(skip=None)
    assert list(Shard(torch.arange(8), 2, rank=0, world_size=1, epoch=0,
                      tracker=tracker)) == []
    assert tracker.calls == [("start", None)]
    past_the_end = Tracker(skip=9)
    assert list(Shard(torch.arange(8), 2, rank=0, world_size=1, epoch=0,
                      tracker=past_the_end)) == []
    assert past_the_end.calls == [("start", None), ("end", 4)]  # at most the loop's length
