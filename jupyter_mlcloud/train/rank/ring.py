"""The commit ring, on every worker: commits stay in workers' memory, never in the launcher's.

Each rank keeps its own commits here, in a small ring (:func:`commit`). A second copy of each
new commit goes to the rank's *buddy*, another worker (on another host when there is one),
straight over the workers' own comms: never through the scheduler or the kernel. Under DDP
every rank holds the same model and optimizer state, so a buddy that is itself a rank gets
only the small per-rank part (RNG and hook states); otherwise it gets the whole part. Losing
any one worker therefore loses no commit: a worker keeps its own commit at the step of the
newest buddy copy it holds (an *anchor*, :func:`_anchor`), however far the copies lag behind
the ring, and the per-rank part of every own commit outlives its whole state in the ring.

The launcher sees only metadata (:func:`index`: which worker holds which rank's part of which
step) and, after a loss, tells each new rank where its state lies; the rank pulls it from that
worker (:func:`fetch`) before it joins the new process group. Durable checkpoints are written
by the ranks themselves, off the training thread (:class:`_Writer`); the launcher seals a step
with its ``.done`` marker once every rank has written its file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...lazy import LazyModule
from ..checkpoint import CheckpointDir, Part, Position
from . import shards
from .state import Deferred, clone, clone_deferred, rng_state

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")

RING_PARTS = 16  # own commits kept: ranks drift apart by at most one step
RING_FULL = 2  # own commits with the whole state kept: the latest and the one before
COPIES_KEPT = 2  # buddy copies kept per rank
STALE_S = 120.0  # a copy-only ring untouched this long belongs to a launcher that went
SEND_TIMEOUT_S = 60.0
PUT, GET = "mlcloud_commit_put", "mlcloud_commit_get"


@dataclass
class _Ring:
    attempt: int = 0
    own: deque[Part] = field(default_factory=lambda: deque(maxlen=RING_PARTS))
    full: deque[Part] = field(default_factory=lambda: deque(maxlen=RING_FULL))
    copies: dict[int, deque[Part]] = field(default_factory=dict)  # rank -> buddy copies
    # rank -> (its newest copy held here at a step this worker's own rank also holds, that
    # own part): kept out of the deques' rotation while the copies lag behind.
    anchors: dict[int, tuple[Part, Part]] = field(default_factory=dict)
    pinned: list[Part] = field(default_factory=list)  # being sent or written: not recycled
    spare: Part | None = None  # a dropped part whose buffers the next commit reuses
    client_step: int = -1  # the newest step the launcher has confirmed
    written: list[tuple[Position, int, int, bool]] = field(default_factory=list)  # files done
    stats: dict[str, float] = field(default_factory=lambda: {
        "commits": 0, "commit_s": 0.0, "sent_bytes": 0, "written_bytes": 0, "write_s": 0.0,
        "deferred": 0, "torn": 0})
    # The newest commit while its large tensors are still being copied: (part, copies, the
    # training thread). It joins the ring once settled (:func:`settle`).
    deferred: tuple[Part, Deferred, int] | None = None
    copy_at_once: bool = False  # a deferred copy was torn: copy at once from then on
    touched: float = field(default_factory=time.monotonic)
    active: bool = False  # a rank of this run runs here


_rings: dict[str, _Ring] = {}
_lock = threading.Lock()


@dataclass
class Config:
    """Where a rank's commits go besides its own ring (set per attempt by :func:`open_ring`)."""

    buddy: str | None = None  # worker address of the copy's holder
    send_state: bool = True  # False: the buddy holds the same replicated state itself
    checkpoint_url: str | None = None
    sharded: bool = False  # the state is not replicated: rank 0 writes it through DCP
    worker: Any = None


_config = Config()


def open_ring(run_id: str, attempt: int, config: Config) -> None:
    """Start ``attempt`` of ``run_id`` on this worker. Its parts of earlier attempts stay (the
    new ranks restore from them); rings of other runs go, except buddy copies still in use."""
    global _config
    now = time.monotonic()
    with _lock:
        for other in [k for k, r in _rings.items() if k != run_id
                      and (r.active or r.full or now - r.touched > STALE_S)]:
            del _rings[other]  # its rank is gone from this worker (one rank at a time)
        ring = _rings.setdefault(run_id, _Ring())
        ring.attempt, ring.active, ring.touched = attempt, True, now
    _config = config


def close_ring(run_id: str) -> None:
    """Drop everything held for ``run_id`` (the launcher calls it when the run ends)."""
    with _lock:
        _rings.pop(run_id, None)


def leave(run_id: str) -> None:
    """This worker's rank of ``run_id`` ended (on its thread); its parts stay until the
    launcher closes."""
    settle(run_id)
    _writer.drain()
    with _lock:
        if run_id in _rings:
            _rings[run_id].active = False


def client_step(run_id: str) -> int:
    """The newest step the launcher has confirmed (``ctx.committed_step``)."""
    with _lock:
        ring = _rings.get(run_id)
        return ring.client_step if ring else -1


def _anchored(ring: _Ring) -> list[Part]:
    return [p for pair in ring.anchors.values() for p in pair]


def _in_use(ring: _Ring, part: Part) -> bool:
    """Whether ``part``'s buffers are used beyond the ring's deques: being sent or written,
    or anchored (a per-rank part a whole commit left behind shares that commit's)."""
    return any(part is p or part.local is p.local for p in [*ring.pinned, *_anchored(ring)])


def _anchor(ring: _Ring, rank: int) -> None:
    """Anchor the newest copy of ``rank`` held here whose step this worker's own rank also
    holds (under the lock). Should ``rank``'s worker go, that step is one every survivor can
    go on from, even when the sender skipped commits: without it, the own parts at the
    copies' steps could already be gone from the ring."""
    # A rank that commits the whole state anchors whole commits, not their per-rank parts.
    own = {(p.position.steps, p.attempt): p
           for p in [*(ring.full or ring.own), *(mine for _, mine in ring.anchors.values())]
           if p.rank != rank}
    held = [*ring.copies.get(rank, ()), *ring.anchors.get(rank, ())[:1]]
    for copy in sorted(held, key=lambda p: (p.attempt, p.position.steps), reverse=True):
        mine = own.get((copy.position.steps, copy.attempt))
        if mine is not None:
            ring.anchors[rank] = (copy, mine)
            # Anchors of an older attempt's ranks are no longer needed once this one holds.
            for other in [r for r, (c, _) in ring.anchors.items() if c.attempt < copy.attempt]:
                del ring.anchors[other]
            return


def commit(run_id: str, rank: int, position: Position, local: dict[str, Any],
           state: dict[str, Any] | None, durable: bool = False) -> None:
    """Copy this rank's state at ``position`` into the ring; a copy goes to the buddy and, if
    ``durable``, a file to the checkpoint directory, both off this thread.

    ``local`` (this rank's own state) and ``state`` (the models, optimizers and schedulers;
    None on a rank that holds none) may be live views: they are copied here, into the buffers
    of a commit the ring dropped where they fit. RNG states are captured as ``local["rng"]``.
    The large tensors of ``state`` are copied on a background thread while the next step's
    forward and backward run; the commit joins the ring when :func:`settle` finds it whole
    (at the next ``optimizer.step()``, the next commit, or the rank's end).
    """
    settle(run_id)
    started = time.perf_counter()
    with _lock:
        ring = _rings.setdefault(run_id, _Ring())
        spare, ring.spare = ring.spare, None
    copied = clone(local, spare.local if spare is not None else None)
    copied["rng"] = rng_state()
    full, deferred = None, None
    if state is not None:
        into = spare.state if spare is not None else None
        full, deferred = clone_deferred(state, into, defer=not ring.copy_at_once)
    part = Part(rank, position, copied, full, durable, ring.attempt)
    if deferred is not None:
        deferred.start()
        with _lock:
            ring.deferred = (part, deferred, threading.get_ident())
            ring.stats["deferred"] += 1
            ring.stats["commit_s"] += time.perf_counter() - started
        return
    _add(run_id, ring, part, time.perf_counter() - started)


def settle(run_id: str) -> None:
    """On the training thread: wait for the newest commit's background copies, then add it to
    the ring (or, if a tensor changed while it was copied, drop it and copy at once from now
    on). Nothing to do if there is none, or on another thread."""
    started = time.perf_counter()
    with _lock:
        ring = _rings.get(run_id)
        if ring is None or ring.deferred is None \
                or ring.deferred[2] != threading.get_ident():
            return
        (part, deferred, _), ring.deferred = ring.deferred, None
    if deferred.intact():
        _add(run_id, ring, part, time.perf_counter() - started)
        return
    with _lock:
        ring.copy_at_once = True
        ring.stats["torn"] += 1
        ring.stats["commit_s"] += time.perf_counter() - started
        if ring.spare is None:
            ring.spare = part  # its buffers are free again


def _add(run_id: str, ring: _Ring, part: Part, blocked_s: float) -> None:
    """Put a whole commit in the ring and hand it to the buddy sender and the writer."""
    with _lock:
        target = ring.full if part.state is not None else ring.own
        if len(target) == target.maxlen:  # target[0] is about to be dropped
            dropped = target[0]
            if target is ring.full:
                # Its whole state goes; its per-rank part stays as long as the small ones.
                ring.own.append(dataclasses.replace(dropped, state=None))
                dropped = dataclasses.replace(dropped, local={})
            if not _in_use(ring, target[0]):
                ring.spare = dropped  # its buffers are free: the next commit reuses them
        target.append(part)
        for rank in ring.copies:
            _anchor(ring, rank)
        ring.touched = time.monotonic()
        ring.stats["commits"] += 1
        ring.stats["commit_s"] += blocked_s
        if _config.buddy is not None:
            ring.pinned.append(part)
        if part.durable and _config.checkpoint_url is not None:
            ring.pinned.append(part)
    if _config.buddy is not None:
        _sender.offer(run_id, part, _config)
    if part.durable and _config.checkpoint_url is not None:
        _writer.offer(run_id, part, _config.checkpoint_url, _config.sharded)


def _unpin(run_id: str, part: Part) -> None:
    with _lock:
        ring = _rings.get(run_id)
        if ring is not None:
            for n, p in enumerate(ring.pinned):
                if p is part:
                    del ring.pinned[n]
                    break


# ---------------------------------------------------------------- tensors on the wire


@dataclass
class _Bytes:
    """A tensor as the numpy view of its bytes: pickled out of band, so sent without a copy."""

    data: Any
    dtype: Any
    shape: tuple[int, ...]


def to_wire(value: Any) -> Any:
    """``value`` with every tensor replaced by a :class:`_Bytes` view of it."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        return _Bytes(flat.view(torch.uint8).numpy(), value.dtype, tuple(value.shape))
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(to_wire(v) for v in value)
    return value


def from_wire(value: Any) -> Any:
    """Undo :func:`to_wire` (tensors share the received buffers)."""
    if isinstance(value, _Bytes):
        data = value.data if value.data.flags.writeable else value.data.copy()
        return torch.from_numpy(data).view(value.dtype).reshape(value.shape)
    if isinstance(value, dict):
        return {k: from_wire(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(from_wire(v) for v in value)
    return value


def _wire_part(part: Part, with_state: bool) -> Part:
    return Part(part.rank, part.position, to_wire(part.local),
                to_wire(part.state) if with_state else None, part.durable, part.attempt)


def _nbytes(value: Any) -> int:
    if isinstance(value, _Bytes):
        return int(value.data.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if type(value) in (list, tuple):
        return sum(_nbytes(v) for v in value)
    return 0


# ---------------------------------------------------------------- worker-to-worker handlers


def install_handlers(dask_worker: Any) -> None:
    """Let this worker take and give commit copies (``Client.run`` passes the worker)."""
    handlers = dask_worker.handlers
    handlers.setdefault(PUT, _handle_put)
    handlers.setdefault(GET, _handle_get)


def _handle_put(run_id: str, parts: list[Part]) -> dict[str, str]:
    with _lock:
        ring = _rings.setdefault(run_id, _Ring())
        for part in parts:
            ring.copies.setdefault(part.rank, deque(maxlen=COPIES_KEPT)).append(
                Part(part.rank, part.position, from_wire(part.local), from_wire(part.state),
                     part.durable, part.attempt))
            _anchor(ring, part.rank)
        ring.touched = time.monotonic()
    return {"status": "OK"}


def _find(ring: _Ring, rank: int | None, step: int, attempt: int, state: bool) -> Part | None:
    """A held part of ``rank`` (None: of any rank) at ``step``, with the whole state if
    ``state``."""
    copies = ring.copies.values() if rank is None else [ring.copies.get(rank, ())]
    for part in [*ring.full, *ring.own, *(p for c in copies for p in c), *_anchored(ring)]:
        if (part.position.steps, part.attempt) == (step, attempt) \
                and rank in (None, part.rank) and (part.state is not None or not state):
            return part
    return None


def _handle_get(run_id: str, step: int, attempt: int, ranks: list[int],
                state_of: int | None, want_state: bool) -> dict[str, Any]:
    from distributed.protocol import to_serialize

    with _lock:
        ring = _rings.get(run_id)
        if ring is None:
            return {"status": "missing"}
        found = {r: _find(ring, r, step, attempt, False) for r in ranks}
        with_state = _find(ring, state_of, step, attempt, True) if want_state else None
        if any(p is None for p in found.values()) or (want_state and with_state is None):
            return {"status": "missing"}
        # Views of the parts' buffers: nothing recycles them while no rank of the run trains
        # here (a new attempt's ranks fetch before they rendezvous).
        reply = {r: to_wire(p.local) for r, p in found.items()}  # type: ignore[union-attr]
        whole = to_wire(with_state.state) if with_state is not None else None
    return {"status": "OK", "locals": to_serialize(reply), "state": to_serialize(whole)}


# ---------------------------------------------------------------- background sender / writer


class _Sender:
    """Sends commits to the buddy. Commits with the whole state go newest only: one not sent
    before a newer one comes is skipped. Small ones (the per-rank part alone, as under DDP)
    all go, those queued meanwhile in one message, so the buddy receives the steps its own
    ring still holds however late the message leaves (see :func:`_anchor`)."""

    def __init__(self) -> None:
        self._pending: list[tuple[str, Part, Config]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def offer(self, run_id: str, part: Part, config: Config) -> None:
        with self._cond:
            whole = config.send_state and part.state is not None
            dropped = self._pending if whole else self._pending[:-RING_PARTS + 1]
            for old_run, old_part, _ in dropped:
                _unpin(old_run, old_part)
            self._pending = [*self._pending[len(dropped):], (run_id, part, config)]
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="mlcloud-commit-sender")
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        from distributed.protocol import to_serialize
        from distributed.utils import sync

        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                batch, self._pending = self._pending, []
            run_id, _, config = batch[-1]  # a new attempt's config: older parts are not sent
            try:
                wires = [_wire_part(p, config.send_state)
                         for r, p, c in batch if r == run_id and c is config]
                sync(config.worker.loop, getattr(config.worker.rpc(config.buddy), PUT),
                     run_id=run_id, parts=to_serialize(wires), callback_timeout=SEND_TIMEOUT_S)
                with _lock:
                    if run_id in _rings:
                        _rings[run_id].stats["sent_bytes"] += sum(
                            _nbytes(w.local) + _nbytes(w.state) for w in wires)
            except Exception:  # noqa: BLE001 - a lost buddy: the launcher sees the gap
                pass
            finally:
                for r, p, _ in batch:
                    _unpin(r, p)


class _Writer:
    """Writes durable commits to the checkpoint directory, in commit order."""

    def __init__(self) -> None:
        self._queue: deque[tuple[str, Part, str, bool]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def offer(self, run_id: str, part: Part, url: str, sharded: bool) -> None:
        with self._cond:
            self._queue.append((run_id, part, url, sharded))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="mlcloud-checkpoint-writer")
                self._thread.start()
            self._cond.notify_all()

    def drain(self, timeout: float = 600.0) -> None:
        """Wait until every offered commit is written (a rank's teardown)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                run_id, part, url, sharded = self._queue.popleft()
                self._busy = True
            try:
                started = time.perf_counter()
                size = _write(CheckpointDir(url), part, sharded)
                with _lock:
                    ring = _rings.get(run_id)
                    if ring is not None:
                        ring.written.append((part.position, part.rank, part.attempt,
                                             part.state is not None and part.rank == 0))
                        ring.stats["written_bytes"] += size
                        ring.stats["write_s"] += time.perf_counter() - started
            except Exception:  # noqa: BLE001 - never sealed: the launcher reports the gap
                pass
            finally:
                _unpin(run_id, part)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _write(directory: CheckpointDir, part: Part, sharded: bool) -> int:
    """Write one rank's part of a durable commit. Its own shard (a pipeline stage's slice) and,
    under a strategy whose state is not replicated (``sharded``: fsdp, pipeline, ps-*; the
    parameter servers' shards are in it), the whole state rank 0 holds go through DCP.
    Returns the bytes written."""
    size, step = 0, part.position.steps
    if part.local.get("slice"):
        skeleton, tensors = shards.split(part.local["slice"])
        size += shards.save(tensors, directory.shard_url(step, part.rank))
        part = dataclasses.replace(part, local={**part.local, "slice": skeleton})
    if sharded and part.state is not None and part.rank == 0:
        skeleton, tensors = shards.split(part.state, "state")
        size += shards.save(tensors, directory.shard_url(step, None))
        part = dataclasses.replace(part, state=skeleton)
    with _without_checksums():
        return size + directory.write_part(part)


@contextlib.contextmanager
def _without_checksums() -> Iterator[None]:
    """``torch.save`` without the zip entries' CRC-32: computing it halves the write rate,
    and a checkpoint is trusted by its ``.done`` marker, written once every file is complete.
    (The switch is process-wide; a concurrent ``torch.save`` elsewhere also skips it.)"""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before



_sender, _writer = _Sender(), _Writer()


# ---------------------------------------------------------------- what the launcher sees


@dataclass(frozen=True)
class Entry:
    """One part a worker holds: whose, which step, and whether it has the whole state."""

    rank: int
    attempt: int
    position: Position
    has_state: bool


def index(run_id: str, since: int) -> dict[str, Any]:
    """Metadata of the parts held here for ``run_id`` newer than ``since`` (the launcher's
    step, which it thereby confirms), the durable files written, and the commit statistics."""
    with _lock:
        ring = _rings.get(run_id)
        if ring is None:
            return {"entries": [], "written": [], "stats": {}}
        ring.client_step = max(ring.client_step, since)
        parts = [*ring.own, *ring.full, *(p for c in ring.copies.values() for p in c),
                 *_anchored(ring)]
        entries = list(dict.fromkeys(Entry(p.rank, p.attempt, p.position, p.state is not None)
                                     for p in parts if p.position.steps > since))
        written, ring.written = ring.written, []
        return {"entries": entries, "written": written, "stats": dict(ring.stats)}


# ---------------------------------------------------------------- restoring


@dataclass(frozen=True)
class Source:
    """Where a resumed attempt's state lies: in workers' rings or in the checkpoint dir."""

    step: int
    attempt: int  # the attempt that took the commit
    world_size: int  # the world that took it
    holders: dict[int, str] = field(default_factory=dict)  # old rank -> worker with its part
    state_holder: str | None = None  # a worker with the whole state
    state_rank: int | None = 0  # whose part holds it (None: any rank's, it is replicated)
    directory: str | None = None  # read from this checkpoint directory instead


def fetch(run_id: str, source: Source, worker: Any) -> tuple[dict[str, Any],
                                                              dict[int, dict[str, Any]]]:
    """The state and every old rank's own part at ``source``, from this worker's ring where
    it holds them, else from the workers that do (worker to worker)."""
    if source.directory is not None:
        directory = CheckpointDir(source.directory)
        locals_ = {rank: {**local, "slice": shards.load(
                       local.get("slice"), directory.shard_url(source.step, rank))}
                   for rank, local in directory.read_locals(source.step).items()}
        state = shards.load(directory.read_state(source.step),
                            directory.shard_url(source.step, None))
        return state, locals_
    from distributed.utils import sync

    with _lock:
        ring = _rings.get(run_id, _Ring())
        found = {rank: _find(ring, rank, source.step, source.attempt, False)
                for rank in range(source.world_size)}
        mine = _find(ring, source.state_rank, source.step, source.attempt, True)
    # Copies, not the ring's own tensors: an optimizer's load_state_dict keeps the tensors it
    # is given, and the ring later reuses a part's buffers for newer commits.
    locals_ = {rank: clone(part.local) for rank, part in found.items() if part is not None}
    state = clone(mine.state) if mine is not None else None
    wanted: dict[str, list[int]] = {}
    for rank in range(source.world_size):
        if rank not in locals_:
            wanted.setdefault(source.holders[rank], []).append(rank)
    if state is None:
        wanted.setdefault(str(source.state_holder), [])
    for holder, ranks in wanted.items():
        reply = sync(worker.loop, getattr(worker.rpc(holder), GET), run_id=run_id,
                     step=source.step, attempt=source.attempt, ranks=ranks,
                     state_of=source.state_rank,
                     want_state=state is None and holder == source.state_holder,
                     callback_timeout=SEND_TIMEOUT_S)
        if reply.get("status") != "OK":
            raise RuntimeError(f"worker {holder} no longer holds step {source.step} of run"
                               f" {run_id}.")
        locals_.update(from_wire(reply["locals"]))
        if reply["state"] is not None:
            state = from_wire(reply["state"])
    assert state is not None
    return state, locals_


@contextlib.contextmanager
def held(run_id: str) -> Any:
    """The ring of ``run_id`` for inspection (tests, benchmarks), under the lock."""
    with _lock:
        yield _rings.get(run_id)
