"""A rank's shard written through torch.distributed.checkpoint and read back by its refs."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from jupyter_mlcloud.train.rank import shards


def test_a_shard_round_trips_through_dcp(tmp_path: Path) -> None:
    torch.manual_seed(0)
    slice_ = {"models": [{"2.weight": torch.randn(16, 16), "2.bias": torch.randn(16)}],
              "optimizers": [{2: {"momentum_buffer": torch.randn(16, 16).double()},
                              3: {"momentum_buffer": None}}]}
    skeleton, tensors = shards.split(slice_)
    assert set(tensors) == {"shard.models.0.2.weight", "shard.models.0.2.bias",
                            "shard.optimizers.0.2.momentum_buffer"}
    assert isinstance(skeleton["models"][0]["2.weight"], shards.ShardRef)
    assert skeleton["optimizers"][0][3] == {"momentum_buffer": None}
    url = str(tmp_path / "rank-0001.dcp")
    assert shards.save(tensors, url) == sum(t.nbytes for t in tensors.values())
    assert ".metadata" in os.listdir(url)
    back = shards.load(skeleton, url)
    assert back["optimizers"][0][2]["momentum_buffer"].dtype == torch.float64
    for key in ("2.weight", "2.bias"):
        assert torch.equal(back["models"][0][key], slice_["models"][0][key])
    assert torch.equal(back["optimizers"][0][2]["momentum_buffer"],
                       slice_["optimizers"][0][2]["momentum_buffer"])


def test_a_skeleton_without_refs_is_returned_as_it_is(tmp_path: Path) -> None:
    assert shards.load(None, str(tmp_path / "nowhere")) is None
    assert shards.load({"a": 1}, str(tmp_path / "nowhere")) == {"a": 1}
