"""Commits: the training state a resume restores, and the checkpoint directory.

A *commit* is taken on every rank at a step boundary (before ``ctx.shard`` hands out the next
batch): the position in the data, each rank's own state (RNG states, comm-hook state such as
PowerSGD's local error feedback, a pipeline stage's slice) and, where the rank holds it, the
registered models, optimizers and LR schedulers, copied. Commits stay on the workers (see
:mod:`.rank.ring`); this module holds what they are made of and the files they become.

``--checkpoint-dir`` gets chosen commits, written by the ranks themselves in parallel, to any
fsspec path: ``step-NNNNNNNNN/state.pt`` (one writer: the rank holding the whole state),
``step-NNNNNNNNN/rank-NNNN.pt`` (each rank's own part; a rank's shard and, under a strategy
that does not replicate the state, the whole state's tensors go to ``rank-NNNN.dcp/`` and
``state.dcp/`` through ``torch.distributed.checkpoint``: see :mod:`.rank.shards`), then, once
all are there, ``step-NNNNNNNNN/meta.json`` and the ``step-NNNNNNNNN.done`` marker, written by
the launcher.
A checkpoint without its marker is never read (and is removed by the next seal), so a
half-written checkpoint cannot be resumed from.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..lazy import LazyModule

if TYPE_CHECKING:
    import torch
else:  # the kernel side (store, checkpoint files) must not load torch at import
    torch = LazyModule("torch")


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
    state: dict[str, Any] | None = None  # on the ranks that hold the whole state
    durable: bool = False  # also to be written to the checkpoint directory
    attempt: int = 0


@dataclass(frozen=True)
class Meta:
    """What the launcher knows of a consistent commit: where and in which world it was taken."""

    position: Position
    world_size: int
    base_world: int  # the world size the run was launched with (for elastic rules)

    @property
    def step(self) -> int:
        return self.position.steps


# ---------------------------------------------------------------- copying state


# Values a copy may share: immutable, so no later step can change them.


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

    def _dir(self, step: int) -> str:
        return f"{self.path.rstrip('/')}/step-{step:09d}"

    def shard_url(self, step: int, rank: int | None) -> str:
        """Where rank ``rank`` writes its own shard of checkpoint ``step`` (a DCP checkpoint);
        ``None``: the whole state's tensors, under a strategy that does not replicate it."""
        return f"{self._dir(step)}/" + ("state.dcp" if rank is None else f"rank-{rank:04d}.dcp")

    def write_part(self, part: Part) -> int:
        """Write one rank's part of a durable commit (on its worker); returns the bytes."""
        files: dict[str, Any] = {f"rank-{part.rank:04d}.pt": part.local}
        if part.state is not None and part.rank == 0:  # one writer for the whole state
            files["state.pt"] = part.state
        folder = self._dir(part.position.steps)
        self.fs.makedirs(folder, exist_ok=True)
        for name, value in files.items():
            with self.fs.open(f"{folder}/{name}", "wb") as f:
                torch.save(value, f)  # straight into the file: no copy in memory first
        return sum(int(self.fs.size(f"{folder}/{name}")) for name in files)

    def seal(self, meta: Meta) -> None:
        """Mark ``meta``'s step complete (every rank wrote it); drop half-written steps and the
        complete ones beyond ``keep``."""
        with self.fs.open(f"{self._dir(meta.step)}/meta.json", "w") as f:
            json.dump({"position": meta.position.__dict__, "world_size": meta.world_size,
                       "base_world": meta.base_world}, f)
        with self.fs.open(self._file(meta.step, "done"), "wb") as f:
            f.write(b"")
        done = self.steps()
        for step in [s for s in self._written() if s not in done and s < meta.step]:
            self.fs.rm(self._dir(step), recursive=True)  # a write that died half-way
        for step in done[: -self.keep]:
            self.fs.rm(self._file(step, "done"))  # unmark first: never a marked partial one
            self.fs.rm(self._dir(step), recursive=True)

    def clean(self) -> None:
        """Remove every unsealed step: writes that died half-way (before a run starts)."""
        done = set(self.steps())
        for step in self._written():
            if step not in done:
                self.fs.rm(self._dir(step), recursive=True)

    def _written(self) -> list[int]:
        if not self.fs.exists(self.path):
            return []
        found = (re.search(r"step-(\d{9})$", str(n).rstrip("/"))
                 for n in self.fs.ls(self.path, detail=False))
        return sorted(int(m.group(1)) for m in found if m)

    def read_meta(self, step: int) -> Meta:
        """Where checkpoint ``step`` was taken."""
        with self.fs.open(f"{self._dir(step)}/meta.json", "r") as f:
            data = json.load(f)
        return Meta(Position(**data["position"]), data["world_size"], data["base_world"])

    def latest(self) -> Meta | None:
        """The newest complete checkpoint's metadata, or None."""
        steps = self.steps()
        return self.read_meta(steps[-1]) if steps else None

    def _load(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return torch.load(io.BytesIO(f.read()), weights_only=False)

    def read_state(self, step: int) -> dict[str, Any]:
        """The whole state of checkpoint ``step`` (read by each rank of a resumed run)."""
        return dict(self._load(f"{self._dir(step)}/state.pt"))

    def read_locals(self, step: int) -> dict[int, dict[str, Any]]:
        """Every rank's own part of checkpoint ``step``, by rank."""
        meta = self.read_meta(step)
        return {r: self._load(f"{self._dir(step)}/rank-{r:04d}.pt")
                for r in range(meta.world_size)}


@dataclass
class Resume:
    """What one rank of a resumed attempt gets: where to go on from, and the state there."""

    position: Position
    world_size: int  # the world that took the commit
    local: dict[str, Any] | None  # this rank's own state (None for a rank that is new)
    state: dict[str, Any]
    source: Any = None  # ring.Source: where the state is fetched from before the rank starts


@dataclass(frozen=True)
class CommitPlan:
    """When a rank commits: every ``every`` steps, durably every ``durable_every`` (0: never)."""

    every: int = 0
    durable_every: int = 0

    def due(self, steps: int) -> tuple[bool, bool]:
        """(commit now, write it to the checkpoint directory) after ``steps`` steps."""
        durable = bool(self.durable_every) and steps % self.durable_every == 0
        return durable or (bool(self.every) and steps % self.every == 0), durable
