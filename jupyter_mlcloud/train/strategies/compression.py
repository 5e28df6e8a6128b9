"""Gradient compression through DDP communication hooks, with the bytes each rank sends.

``fp16`` / ``bf16`` cast each gradient bucket before the all-reduce (our own hook: PyTorch's
bf16 hook refuses gloo, though gloo reduces bf16 fine). ``powersgd[:RANK[:START]]`` is
PyTorch's PowerSGD hook, of rank ``RANK`` (default 1), compressing from step ``START`` on
(default :data:`POWERSGD_START_ITER`; the steps before are plain all-reduces). Every
all-reduce the hooks issue is counted, so ``bytes_sent`` / ``bytes_ratio`` are what went over
the wire, not an estimate. PowerSGD's state (error feedback, P/Q memories, its RNG) is part of
every commit, so a resume stays bit-identical.
"""

# No ``from __future__ import annotations`` here: DDP checks the hooks' annotations as objects.
import threading
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..options import CompressionSpec


class ByteCounter:
    """Bytes handed to all-reduce by the hooks, and the bucket bytes they stood for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # hook callbacks may run on the backend's threads
        self.sent = 0
        self.uncompressed = 0

    def add(self, *, sent: int = 0, uncompressed: int = 0) -> None:
        with self._lock:
            self.sent += sent
            self.uncompressed += uncompressed

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.uncompressed


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class _Done:
    """A finished all-reduce, shaped like the ``Work`` that ``async_op=True`` returns."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._future: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        self._future.set_result([tensor])

    def get_future(self) -> torch.futures.Future[list[torch.Tensor]]:
        return self._future

    def wait(self) -> bool:
        return True


class _CountingDist:
    """Stands in for ``torch.distributed`` inside the hook modules: counts all-reduce bytes.

    With ``synchronous``, each all-reduce completes before it returns, so the hook's ``.then``
    callbacks run at once in the calling (autograd) thread. PowerSGD issues its P and Q
    all-reduces from such callbacks; left asynchronous on gloo they run on gloo's own threads,
    where buckets interleave differently per rank (a collective mismatch) and a work object
    can be released on its own thread (an abort).
    """

    def __init__(self, counter: ByteCounter, synchronous: bool) -> None:
        self._dist, self._counter, self._synchronous = dist, counter, synchronous

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._counter.add(sent=_nbytes(tensor))
        if self._synchronous and kwargs.get("async_op"):
            self._dist.all_reduce(tensor, *args, **{**kwargs, "async_op": False})
            return _Done(tensor)
        return self._dist.all_reduce(tensor, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dist, name)


@dataclass
class _CastState:
    dtype: torch.dtype
    counter: ByteCounter


def _cast_hook(state: _CastState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce the bucket in a narrower float type, then write the mean back."""
    buffer = bucket.buffer()
    compressed = buffer.to(state.dtype).div_(dist.get_world_size())
    state.counter.add(sent=_nbytes(compressed), uncompressed=_nbytes(buffer))
    future = dist.all_reduce(compressed, async_op=True).get_future()

    def decompress(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(decompress)


_PER_BUCKET = ("error_dict", "p_memory_dict", "q_memory_dict")


class Compression:
    """The hook attached to one DDP model: its byte counter and its committed state.

    PowerSGD keeps its error feedback and P/Q memories per *bucket*, flattened in the
    bucket's parameter order, and DDP orders a bucket differently on its first iteration
    than after it rebuilds buckets. So commits store them per *parameter* and a resumed
    attempt re-packs them for whatever layout its buckets have: bit-identical either way.
    """

    def __init__(self, spec: CompressionSpec, ddp: Any) -> None:
        self.spec = spec
        self.counter = ByteCounter()
        self.hook_state: Any = None
        self._patched: list[Any] = []
        self._params = list(ddp.module.parameters())
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._layouts: dict[int, list[int]] = {}  # bucket index -> parameter indices
        self._pending: dict[str, dict[int, torch.Tensor]] | None = None  # restored, unpacked
        if spec.kind in ("fp16", "bf16"):
            dtype = torch.float16 if spec.kind == "fp16" else torch.bfloat16
            ddp.register_comm_hook(_CastState(dtype, self.counter), _cast_hook)
        elif spec.kind == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

            self.hook_state = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=spec.rank,
                start_powerSGD_iter=spec.start,
            )
            counting = _CountingDist(self.counter, synchronous=dist.get_backend() == "gloo")
            for module in (powerSGD_hook, default_hooks):
                self._patched.append((module, module.dist))
                module.dist = counting  # type: ignore[attr-defined]
            ddp.register_comm_hook(self.hook_state, self._powersgd)

    def _powersgd(self, state: Any,
                  bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        index, layout = bucket.index(), [self._index[id(p)] for p in bucket.parameters()]
        old = self._layouts.get(index)
        if old is not None and old != layout:  # DDP rebuilt its buckets: re-pack the state
            self._pending = self._pending or {kind: {} for kind in _PER_BUCKET}
            for kind, pieces in self._split(index, old, remove=True).items():
                self._pending[kind].update(pieces)
        self._layouts[index] = layout
        if self._pending is not None:
            self._unpack(index, layout)
        self.counter.add(uncompressed=_nbytes(bucket.buffer()))
        return powerSGD_hook.powerSGD_hook(state, bucket)

    def _packing(self, kind: str, layout: list[int]) -> tuple[list[int], list[int]]:
        """(parameter indices, element counts) in the order PowerSGD packs one bucket tensor of
        ``kind``: error feedback in bucket order; P/Q memories for the compressed parameters
        only, grouped by shape in order of first appearance (PowerSGD's own rule)."""
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        if kind == "error_dict":
            return layout, [self._params[i].numel() for i in layout]
        groups: dict[tuple[int, int], list[int]] = {}
        for i in layout:
            n = self._params[i].shape[0]
            m = self._params[i].numel() // n
            rank = min(n, m, self.hook_state.matrix_approximation_rank)
            if powerSGD_hook._should_compress(n, m, rank, self.hook_state.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append(i)
        order = [i for members in groups.values() for i in members]
        sizes = []
        for i in order:
            n = self._params[i].shape[0]
            m = self._params[i].numel() // n
            sizes.append(min(n, m, self.hook_state.matrix_approximation_rank)
                         * (n if kind == "p_memory_dict" else m))
        return order, sizes

    def _split(self, bucket: int, layout: list[int], remove: bool = False,
               copy: bool = True) -> dict[str, dict[int, torch.Tensor]]:
        """One bucket's PowerSGD tensors, cut into per-parameter pieces (views if not ``copy``)."""
        out: dict[str, dict[int, torch.Tensor]] = {}
        for kind in _PER_BUCKET:
            table = getattr(self.hook_state, kind)
            if bucket not in table:
                continue
            flat = table.pop(bucket) if remove else table[bucket]
            indices, sizes = self._packing(kind, layout)
            out[kind] = {i: piece.detach().clone() if copy else piece.detach()
                         for i, piece in zip(indices, torch.split(flat, sizes), strict=True)}
        return out

    def _unpack(self, bucket: int, layout: list[int]) -> None:
        assert self._pending is not None
        for kind in _PER_BUCKET:
            saved = self._pending[kind]
            indices, _ = self._packing(kind, layout)
            if indices and all(i in saved for i in indices):
                getattr(self.hook_state, kind)[bucket] = torch.cat(
                    [saved.pop(i).reshape(-1) for i in indices])
        if not any(self._pending.values()):
            self._pending = None

    def state_dict(self, copy: bool = True) -> dict[str, Any] | None:
        """PowerSGD's state per parameter (see the class), or None for other hooks.

        With ``copy`` (the default) nothing in it is shared with the live hook; without, its
        tensors are views of the hook's own and its RNG is the live one, for a caller that
        copies it at once (a commit copies into reused buffers).
        """
        if self.hook_state is None:
            return None
        slots = type(self.hook_state).__slots__
        state = {s: getattr(self.hook_state, s) for s in slots
                 if s != "process_group" and s not in _PER_BUCKET}
        if copy:
            state = deepcopy(state)
        per_param: dict[str, dict[int, torch.Tensor]] = {
            kind: dict(self._pending[kind]) if self._pending else {} for kind in _PER_BUCKET}
        for bucket, layout in self._layouts.items():
            for kind, pieces in self._split(bucket, layout, copy=copy).items():
                per_param[kind].update(pieces)
        state["per_param"] = per_param
        return state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Put committed PowerSGD state back; bucket tensors are re-packed on first use."""
        if self.hook_state is None or state is None:
            return
        state = deepcopy(state)
        self._pending = state.pop("per_param")
        for slot, value in state.items():
            setattr(self.hook_state, slot, value)
        for kind in _PER_BUCKET:
            getattr(self.hook_state, kind).clear()
        if not any(self._pending.values()):
            self._pending = None

    def close(self) -> None:
        """Give the hook modules their ``torch.distributed`` back."""
        for module, original in reversed(self._patched):
            module.dist = original
        self._patched.clear()
