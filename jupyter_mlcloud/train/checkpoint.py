"""Commits: the training state a resume restores, kept off the rank that may die.

A *commit* is taken on every rank at a step boundary (before ``ctx.shard`` hands out the next
batch): the position in the data, each rank's own state (RNG states, comm-hook state such as
PowerSGD's local error feedback) and, on rank 0 only (data-parallel state is the same on every
rank), the registered models, optimizers and LR schedulers, copied. The copy is kept in a
small ring in the worker's memory; the launcher pulls new ones once a second into
a :class:`CommitStore` on the client, which assembles the latest step that every rank has
committed. So a dead worker costs the steps since the last pull, never the run.

``--checkpoint-dir`` writes chosen commits to any fsspec path as ``step-NNNNNNNNN.pt`` plus a
``step-NNNNNNNNN.done`` marker written after it: a checkpoint without its marker is never read
(and is removed by the next write), so a half-written checkpoint cannot be resumed from.
"""

from __future__ import annotations

import copy
import ctypes
import io
import random
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..lazy import LazyModule
from .strategies import merge_slices

if TYPE_CHECKING:
    import torch
else:  # the kernel side (store, checkpoint files) must not load torch at import
    torch = LazyModule("torch")

RING_PARTS = 16  # per-rank commits kept on a worker: ranks drift apart by at most one step
RING_FULL = 2  # rank 0's full states kept: the latest and the one before


@dataclass(frozen=True)
class Position:
    """Where a commit was taken: epoch, loop (``ctx.shard`` iteration) and batch within it."""

    epoch: int = 0
    loop: int = 0
    batch: int = 0
    steps: int = 0  # batches drawn in the whole run so far
    report_step: int = 0  # ``ctx.step`` (the report counter)


@dataclass
class Part:
    """One rank's commit at one step."""

    rank: int
    position: Position
    local: dict[str, Any]  # this rank's own state: RNG states, comm-hook state
    state: dict[str, Any] | None = None  # rank 0 only
    durable: bool = False  # also to be written to the checkpoint directory


@dataclass
class Snapshot:
    """A consistent commit: the state, and every rank's own state, at one step."""

    position: Position
    world_size: int
    base_world: int  # the world size the run was launched with (for elastic rules)
    state: dict[str, Any]
    per_rank: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return self.position.steps


# ---------------------------------------------------------------- copying state


# Values a copy may share: immutable, so no later step can change them.
_SHARED: frozenset[type] = frozenset()  # filled on first use (it names torch types)
_NOTHING: dict[Any, Any] = {}


def clone(value: Any, into: Any = None) -> Any:
    """A deep copy in which tensors are detached copies (so later steps cannot change it).

    ``into``: an older copy of the same structure that nothing else holds any more. Its
    tensors of the same shape, strides, dtype and device are overwritten in place instead of
    allocating new ones (on every commit, fresh allocations of this size cost page faults).
    """
    global _SHARED
    if not _SHARED:
        _SHARED = frozenset({int, float, complex, bool, str, bytes, type(None), torch.dtype,
                             torch.device, torch.layout, torch.memory_format})
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    out = _copy(value, into, targets, sources)
    if targets:
        torch._foreach_copy_(targets, sources)  # one call for all: less per-tensor overhead
    return out


def _copy(value: Any, into: Any, targets: list[torch.Tensor],
          sources: list[torch.Tensor]) -> Any:
    if type(value) in _SHARED:
        return value
    if isinstance(value, dict):
        old = into if isinstance(into, dict) else _NOTHING
        return {k: v if type(v) in _SHARED else _copy(v, old.get(k), targets, sources)
                for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if (type(into) is torch.Tensor and value.layout == torch.strided
                and into.dtype == value.dtype and into.shape == value.shape
                and into.device == value.device and into.stride() == value.stride()):
            targets.append(into)
            sources.append(value.detach() if value.requires_grad else value)
            return into
        return value.detach().clone()
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


# ---------------------------------------------------------------- worker side


class _Ring:
    def __init__(self, attempt: int = 0) -> None:
        self.attempt = attempt
        self.parts: deque[Part] = deque(maxlen=RING_PARTS)
        self.full: deque[Part] = deque(maxlen=RING_FULL)
        self.durable: list[Part] = []  # kept until pulled, whatever the ring drops
        self.client_step = -1  # the newest step the launcher holds (told on each pull)
        self.spare: Part | None = None  # a part the ring dropped: the next commit reuses it


_rings: dict[str, _Ring] = {}
_rings_lock = threading.Lock()


def open_ring(run_id: str, attempt: int) -> None:
    """Start this worker's ring for ``run_id``'s ``attempt``, dropping every older ring."""
    with _rings_lock:
        client_step = _rings[run_id].client_step if run_id in _rings else -1
        _rings.clear()
        _rings[run_id] = _Ring(attempt)
        _rings[run_id].client_step = client_step


def put(run_id: str, part: Part) -> None:
    """Keep ``part`` (which nothing else may change) until the launcher pulls it."""
    with _rings_lock:
        ring = _rings.get(run_id) or _rings.setdefault(run_id, _Ring())
        target = ring.full if part.state is not None else ring.parts
        if len(target) == target.maxlen and all(target[0] is not p for p in ring.durable):
            ring.spare = target[0]  # about to be dropped; its buffers are free
        target.append(part)
        if part.durable and part.state is not None:
            ring.durable.append(part)


def commit(run_id: str, rank: int, position: Position, local: dict[str, Any],
           state: dict[str, Any] | None, durable: bool = False) -> None:
    """Copy this rank's state at ``position`` and keep the copy until the launcher pulls it.

    ``local`` (this rank's own state: comm-hook states, say) and ``state`` (rank 0's models,
    optimizers and schedulers; None elsewhere) may be live views: they are copied here, into
    the buffers of a commit the ring dropped where they fit. The RNG states are captured
    here too, as ``local["rng"]``.
    """
    with _rings_lock:
        ring = _rings.get(run_id)
        spare = None
        if ring is not None:
            spare, ring.spare = ring.spare, None
    copied = clone(local, spare.local if spare is not None else None)
    copied["rng"] = rng_state()
    full = None if state is None else clone(state, spare.state if spare is not None else None)
    put(run_id, Part(rank, position, copied, full, durable))


def _detached(part: Part) -> Part:
    """A copy of ``part`` that a later commit cannot overwrite (the ring recycles buffers).

    RNG states are fresh objects per commit and never recycled, so they are shared.
    """
    local = {k: v if k == "rng" else clone(v) for k, v in part.local.items()}
    state = None if part.state is None else clone(part.state)
    return Part(part.rank, part.position, local, state, part.durable)


def client_step(run_id: str) -> int:
    """The newest step the launcher has confirmed holding (``ctx.committed_step``)."""
    with _rings_lock:
        ring = _rings.get(run_id)
        return ring.client_step if ring else -1


def take(run_id: str, since: int, final: bool = False) -> list[Part]:
    """Commits newer than ``since`` (called by the launcher through ``Client.run``)."""
    with _rings_lock:
        ring = _rings.get(run_id)
        if ring is None:
            return []
        ring.client_step = max(ring.client_step, since)
        durable_ids = {id(p) for p in ring.durable}
        out = [p for p in (*ring.parts, *ring.full)
               if p.position.steps > since and id(p) not in durable_ids]
        out += ring.durable
        ring.durable = []
        if final:
            del _rings[run_id]
        # Copied under the lock: the rank thread only writes into a part no longer in the ring.
        return [_detached(p) for p in out]


# ---------------------------------------------------------------- client side


class CommitStore:
    """The launcher's copy of the latest consistent commit, assembled from pulled parts."""

    def __init__(self, world_size: int, base_world: int,
                 initial: Snapshot | None = None) -> None:
        self.world_size, self.base_world = world_size, base_world
        self.latest = initial
        self._local: dict[int, dict[int, dict[str, Any]]] = {}  # step -> rank -> own state
        self._full: dict[int, Part] = {}  # step -> rank 0's part
        self._lock = threading.Lock()

    @property
    def step(self) -> int:
        return self.latest.step if self.latest else -1

    def reset(self, world_size: int) -> None:
        """A new attempt: forget parts of the old world, keep the latest snapshot."""
        with self._lock:
            self.world_size = world_size
            self._local.clear()
            self._full.clear()

    def add(self, parts: list[Part]) -> list[Snapshot]:
        """Merge pulled parts; return the consistent durable snapshots among them, oldest first."""
        durable: list[Snapshot] = []
        with self._lock:
            for part in parts:
                step = part.position.steps
                self._local.setdefault(step, {})[part.rank] = part.local
                if part.state is not None:
                    self._full[step] = part
            for step in sorted(self._full):
                local = self._local.get(step, {})
                if len(local) < self.world_size:
                    continue
                part = self._full[step]
                # A pipeline rank's own stage is laid over rank 0's state: the whole model.
                state = merge_slices(part.state, local)  # type: ignore[arg-type]
                snap = Snapshot(part.position, self.world_size, self.base_world, state,
                                dict(local))
                if part.durable:
                    durable.append(snap)
                if step > self.step:
                    self.latest = snap
            newest = self.step
            for table in (self._local, self._full):
                for step in [s for s in table if s <= newest - RING_PARTS]:
                    del table[step]
            for step in [s for s in self._full if s <= newest]:
                del self._full[step]
        return durable


# ---------------------------------------------------------------- checkpoint directory

_NAME = re.compile(r"step-(\d{9})\.(pt|done)$")


class CheckpointDir:
    """Checkpoints in one fsspec directory: write atomically, read the newest, keep the last N."""

    def __init__(self, url: str, keep: int = 2) -> None:
        import fsspec
        from fsspec.core import url_to_fs

        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol not in fsspec.available_protocols():
            raise ValueError(
                f"checkpoint_dir {url!r} uses the unknown protocol {protocol!r}; use a local"
                " path or one of fsspec's protocols (file, memory, s3, gcs, ...)."
            )
        try:
            self.fs, self.path = url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise ValueError(f"checkpoint_dir {url!r} cannot be opened: {e}.") from None
        self.url, self.keep = url, keep
        self._created = False

    def check_writable(self) -> None:
        """Create the directory if needed and prove a file can be written there."""
        probe = f"{self.path.rstrip('/')}/.mlcloud-probe-{uuid.uuid4().hex[:8]}"
        try:
            if not self.fs.exists(self.path):
                self.fs.makedirs(self.path, exist_ok=True)
                self._created = True
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except OSError as e:
            self.discard()
            raise ValueError(
                f"checkpoint_dir {self.url!r} is not writable ({e.strerror or e}); choose a"
                " directory you can write to."
            ) from None

    def discard(self) -> None:
        """Remove the directory if this object created it and nothing was written there."""
        if self._created and self.fs.exists(self.path) and not self.fs.ls(self.path):
            self.fs.rmdir(self.path)
        self._created = False

    def _entries(self) -> dict[int, set[str]]:
        if not self.fs.exists(self.path):
            return {}
        found: dict[int, set[str]] = {}
        for name in self.fs.ls(self.path, detail=False):
            match = _NAME.search(str(name))
            if match:
                found.setdefault(int(match.group(1)), set()).add(match.group(2))
        return found

    def _file(self, step: int, kind: str) -> str:
        return f"{self.path.rstrip('/')}/step-{step:09d}.{kind}"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        return sorted(s for s, kinds in self._entries().items() if "done" in kinds)

    def write(self, snap: Snapshot) -> None:
        """Write ``snap``; the marker goes last, then older checkpoints beyond ``keep`` go."""
        for step, kinds in self._entries().items():
            if "done" not in kinds:  # a write that died half-way
                self.fs.rm(self._file(step, "pt"))
        buffer = io.BytesIO()
        torch.save({"position": snap.position.__dict__, "world_size": snap.world_size,
                    "base_world": snap.base_world, "state": snap.state, "per_rank": snap.per_rank},
                   buffer)
        with self.fs.open(self._file(snap.step, "pt"), "wb") as f:
            f.write(buffer.getvalue())
        with self.fs.open(self._file(snap.step, "done"), "wb") as f:
            f.write(b"")
        for step in self.steps()[: -self.keep]:
            self.fs.rm(self._file(step, "done"))  # unmark first: never a marked partial file
            self.fs.rm(self._file(step, "pt"))

    def read_latest(self) -> Snapshot | None:
        """The newest complete checkpoint, or None."""
        steps = self.steps()
        if not steps:
            return None
        with self.fs.open(self._file(steps[-1], "pt"), "rb") as f:
            data = torch.load(io.BytesIO(f.read()), weights_only=False)
        return Snapshot(Position(**data["position"]), data["world_size"], data["base_world"],
                        data["state"], data["per_rank"])


@dataclass
class Resume:
    """What one rank of a resumed attempt gets: where to go on from, and the state there."""

    position: Position
    world_size: int  # the world that took the commit
    local: dict[str, Any] | None  # this rank's own state (None for a rank that is new)
    state: dict[str, Any]


@dataclass(frozen=True)
class CommitPlan:
    """When a rank commits: every ``every`` steps, durably every ``durable_every`` (0: never)."""

    every: int = 0
    durable_every: int = 0

    def due(self, steps: int) -> tuple[bool, bool]:
        """(commit now, write it to the checkpoint directory) after ``steps`` steps."""
        durable = bool(self.durable_every) and steps % self.durable_every == 0
        return durable or (bool(self.every) and steps % self.every == 0), durable
