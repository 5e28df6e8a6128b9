"""State copies on a rank: what a commit copies (models, optimizers, RNG states) and what a
resume puts back.

torch is bound lazily: the kernel imports :mod:`.ring` (whose copies these are) to call it on
the workers, and must not load torch to do so.
"""

from __future__ import annotations

import copy
import ctypes
import random
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ...lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")

_NOTHING: dict[Any, Any] = {}
_SHARED: frozenset[type] = frozenset()  # filled on first use (it names torch types)


DEFER_MIN_BYTES = 1 << 20  # smaller tensors (BatchNorm buffers, step counts) copy at once


def clone(value: Any, into: Any = None) -> Any:
    """A deep copy in which tensors are detached copies (so later steps cannot change it).

    ``into``: an older copy of the same structure that nothing else holds any more. Its
    tensors of the same shape, strides, dtype and device are overwritten in place instead of
    allocating new ones (on every commit, fresh allocations of this size cost page faults).
    """
    out, deferred = clone_deferred(value, into, defer=False)
    assert deferred is None
    return out


def clone_deferred(value: Any, into: Any = None,
                   defer: bool = True) -> tuple[Any, Deferred | None]:
    """:func:`clone`, but the copies of large tensors are left to a background thread.

    The structure comes back at once, with its tensors allocated (or taken from ``into``);
    the small ones are already copied. The large ones are copied by ``Deferred.start``, and
    are only valid once ``Deferred.intact()`` says so.
    """
    global _SHARED
    if not _SHARED:
        _SHARED = frozenset({int, float, complex, bool, str, bytes, type(None), torch.dtype,
                             torch.device, torch.layout, torch.memory_format})
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    out = _copy(value, into, targets, sources)
    now = [n for n, s in enumerate(sources) if not defer or s.nbytes < DEFER_MIN_BYTES]
    if now:  # one call for all: less per-tensor overhead
        torch._foreach_copy_([targets[n] for n in now], [sources[n] for n in now])
    if len(now) == len(sources):
        return out, None
    later = sorted(set(range(len(sources))) - set(now))
    return out, Deferred([targets[n] for n in later], [sources[n] for n in later])


class Deferred:
    """Tensor copies of a commit made on a background thread while training goes on.

    Model parameters and optimizer state change only in ``optimizer.step()``, which waits for
    the copies first. Whatever changes them elsewhere (a hand-written update, say) bumps the
    tensors' version counters; :meth:`intact`, called on the training thread, then reports the
    copy as torn, so a commit is never a mix of two steps.
    """

    _pool: ThreadPoolExecutor | None = None

    def __init__(self, targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        self.targets, self.sources = targets, sources
        self.versions = [s._version for s in sources]
        self.nbytes = sum(s.nbytes for s in sources)
        self._future: Future[None] | None = None

    def start(self) -> None:
        if Deferred._pool is None:
            Deferred._pool = ThreadPoolExecutor(1, thread_name_prefix="mlcloud-commit-copy")
        self._future = Deferred._pool.submit(torch._foreach_copy_, self.targets, self.sources)

    def intact(self) -> bool:
        """Wait for the copies; True if no source changed since the commit was taken."""
        assert self._future is not None
        if self._future.exception() is not None:
            return False
        return all(s._version == v for s, v in zip(self.sources, self.versions, strict=True))


def _copy(value: Any, into: Any, targets: list[torch.Tensor],
          sources: list[torch.Tensor]) -> Any:
    if type(value) in _SHARED:
        return value
    if isinstance(value, dict):
        old = into if isinstance(into, dict) else _NOTHING
        return {k: v if type(v) in _SHARED else _copy(v, old.get(k), targets, sources)
                for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        source = value.detach() if value.requires_grad else value
        if (type(into) is torch.Tensor and value.layout == torch.strided
                and into.dtype == value.dtype and into.shape == value.shape
                and into.device == value.device and into.stride() == value.stride()):
            targets.append(into)
            sources.append(source)
            return into
        if type(value) is torch.Tensor and value.layout == torch.strided \
                and value.is_contiguous():
            fresh = torch.empty_like(source, memory_format=torch.contiguous_format)
            targets.append(fresh)
            sources.append(source)
            return fresh
        return source.clone()
    if isinstance(value, (list, tuple)):
        same = isinstance(into, (list, tuple)) and len(into) == len(value)
        items = [v if type(v) in _SHARED else
                 _copy(v, into[n] if same else None, targets, sources)
                 for n, v in enumerate(value)]
        return type(value)(items)
    return copy.deepcopy(value)


class _NumpyState:
    """``np.random.get_state()``, reused while the global generator has not moved.

    The getter costs about 40 µs (it copies the 624-word key one element at a time), a
    large share of a commit, while most training code never draws from numpy. So the
    generator's raw state (key and position, read through numpy's documented ``ctypes``
    interface) is compared with the one of the last capture; if it is unchanged and no
    cached Gaussian was pending then, no draw has happened since, so the last capture still
    holds. (A pending cached Gaussian can be consumed without moving the raw state, hence
    the second condition.) If the raw layout is not what it should be, every call asks numpy.
    """

    _RAW_BYTES = 624 * 4 + 4  # MT19937: uint32 key[624]; int pos

    def __init__(self) -> None:
        self._address: int | None = None
        self._checked = False
        self._last: tuple[bytes, Any] | None = None  # (raw state, captured state)

    def _raw(self) -> bytes | None:
        if not self._checked:
            self._checked = True
            try:
                generator = np.random.get_state.__self__._bit_generator  # type: ignore[attr-defined]
                address = int(generator.ctypes.state_address)
                legacy: Any = np.random.get_state()  # ('MT19937', key, pos, has_gauss, gauss)
                key, pos = legacy[1], legacy[2]
                expected = key.astype("<u4").tobytes() + int(pos).to_bytes(4, "little", signed=True)
                if ctypes.string_at(address, self._RAW_BYTES) == expected:
                    self._address = address
            except Exception:  # noqa: BLE001 - another numpy: fall back to get_state
                self._address = None
        return None if self._address is None else ctypes.string_at(self._address,
                                                                   self._RAW_BYTES)

    def get(self) -> Any:
        raw, last = self._raw(), self._last
        if raw is not None and last is not None and raw == last[0] and last[1][3] == 0:
            return last[1]
        state = np.random.get_state()
        if raw is not None:
            self._last = (raw, state)  # one assignment: rank threads may share a process
        return state


_numpy_state = _NumpyState()


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states, as fresh or immutable values."""
    state = {"python": random.getstate(), "numpy": _numpy_state.get(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_shapes(saved: dict[str, Any], model: torch.nn.Module, index: int) -> None:
    """Raise one sentence naming the first parameter whose saved shape differs."""
    live = model.state_dict()
    missing = [k for k in live if k not in saved]
    extra = [k for k in saved if k not in live]
    if missing or extra:
        name = (missing or extra)[0]
        where = "is missing from the checkpoint" if missing else "is not in the model"
        raise ValueError(
            f"the checkpoint is from a different model: parameter {name!r} {where}"
            f" (model {index}); resume with the model that wrote it or use a new"
            " checkpoint directory."
        )
    for name, tensor in live.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"the checkpoint is from a different model: parameter {name!r} has shape"
                f" {tuple(saved[name].shape)} there but {tuple(tensor.shape)} in the model;"
                " resume with the model that wrote it or use a new checkpoint directory."
            )
