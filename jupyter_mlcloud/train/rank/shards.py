"""A rank's own shard of the state in durable checkpoints, through ``torch.distributed.checkpoint``.

Under a sharded strategy each rank holds a part of the model no other rank has (a pipeline
stage's parameters and their optimizer state). In a durable checkpoint that rank writes its
shard itself, as a DCP checkpoint of its own (``step-N/rank-RRRR.dcp/``, no collectives: the
ranks write in parallel, off their training threads, and the launcher's ``.done`` marker still
says when every rank has written). The rank's ``rank-RRRR.pt`` keeps the shard's structure with
each tensor replaced by a :class:`ShardRef`, whose key is the tensor's name in the DCP
checkpoint; reading builds the tensors from the refs and lets DCP fill them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:  # the kernel imports :mod:`.ring`, and with it this module, to call it on workers
    torch = LazyModule("torch")


@dataclass(frozen=True)
class ShardRef:
    """Where a tensor of a shard went: its key in the rank's DCP checkpoint, shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: str


def _rebuild(item: Any, leaf: Callable[[Any, str], Any], key: str) -> Any:
    """``item``'s dicts, lists and tuples rebuilt, with ``leaf(value, key path)`` at the leaves."""
    if isinstance(item, dict):
        return {k: _rebuild(v, leaf, f"{key}.{k}") for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return type(item)(_rebuild(v, leaf, f"{key}.{n}") for n, v in enumerate(item))
    return leaf(item, key)


def split(value: Any, prefix: str = "shard") -> tuple[Any, dict[str, torch.Tensor]]:
    """``value`` with each tensor replaced by a :class:`ShardRef`, and the tensors by key."""
    tensors: dict[str, torch.Tensor] = {}

    def ref(item: Any, key: str) -> Any:
        if not isinstance(item, torch.Tensor):
            return item
        tensors[key] = item
        return ShardRef(key, tuple(item.shape), str(item.dtype).removeprefix("torch."))

    return _rebuild(value, ref, prefix), tensors


def save(tensors: dict[str, torch.Tensor], url: str) -> int:
    """Write ``tensors`` as a DCP checkpoint at ``url`` (any fsspec URL); returns the bytes."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp_save(tensors, storage_writer=FsspecWriter(url), no_dist=True)
    return sum(t.nbytes for t in tensors.values())


def load(skeleton: Any, url: str) -> Any:
    """``skeleton`` (from :func:`split`) with its tensors read back from ``url``."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    refs: list[ShardRef] = []
    _rebuild(skeleton, lambda item, _: refs.append(item) if isinstance(item, ShardRef) else None,
             "")
    if not refs:
        return skeleton
    tensors = {r.key: torch.empty(r.shape, dtype=getattr(torch, r.dtype)) for r in refs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(tensors, storage_reader=FsspecReader(url), no_dist=True)
    return _rebuild(skeleton, lambda item, _: tensors[item.key]
                    if isinstance(item, ShardRef) else item, "")
