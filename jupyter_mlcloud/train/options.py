"""A run's options, checked in the kernel without torch: ``--strategy`` and the options that
belong to it, how a run survives lost workers, and ``--compression``.

Every option object is built by keyword (``kw_only``), so reordering a field cannot mis-wire
one; ``from_options`` picks an object's fields out of a magic's parsed arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .checkpoint import CommitPlan
from .rank import elastic

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")
# Plain all-reduce steps before PowerSGD starts compressing (``powersgd:RANK:START`` sets it).
# A short run of exact gradients first is what PowerSGD's authors and PyTorch advise (PyTorch
# defaults to 1000 steps, tuned for long runs); 2 is the least error feedback allows.
POWERSGD_START_ITER = 2
STRATEGIES = ("ddp", "fsdp", "pipeline", "ps-sync", "ps-async")
SCHEDULES = ("1f1b", "gpipe")
GPU_ONLY = ("fsdp",)
DEFAULT_MICROBATCHES = 4
BACKENDS = ("gloo", "nccl")
CHECKPOINT_EVERY = 100  # default steps between checkpoints written to --checkpoint-dir


def check_whole(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """One sentence unless ``value`` is a whole number >= ``minimum`` (or None if allowed)."""
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")


@dataclass(frozen=True)
class CompressionSpec:
    """A parsed ``--compression`` value."""

    kind: str = "none"
    rank: int = 1  # PowerSGD's matrix approximation rank
    start: int = POWERSGD_START_ITER  # PowerSGD: plain all-reduce steps before compressing

    def __str__(self) -> str:
        if self.kind != "powersgd":
            return self.kind
        if self.start != POWERSGD_START_ITER:
            return f"powersgd:{self.rank}:{self.start}"
        return f"powersgd:{self.rank}"


def parse_compression(text: Any) -> CompressionSpec:
    """``none``, ``fp16``, ``bf16``, ``powersgd``, ``powersgd:RANK`` or ``powersgd:RANK:START``.

    ``START`` is the number of plain all-reduce steps before PowerSGD compresses (default
    :data:`POWERSGD_START_ITER`).
    """
    if isinstance(text, CompressionSpec):
        return text
    kind, colon, rest = str(text).partition(":")
    rank, _, start = rest.partition(":")
    if kind not in COMPRESSIONS or (colon and kind != "powersgd"):
        raise ValueError(
            f"compression {text!r} is not available; allowed: none, fp16, bf16, powersgd,"
            " powersgd:RANK, powersgd:RANK:START."
        )
    if not colon:
        return CompressionSpec(kind)
    if not (rank.isascii() and rank.isdigit()) or int(rank) < 1:
        raise ValueError(f"compression {text!r} needs a whole PowerSGD rank >= 1, e.g. powersgd:2.")
    if not start:
        if rest.endswith(":"):
            raise ValueError(f"compression {text!r} needs a start step after the second ':',"
                             " e.g. powersgd:2:20.")
        return CompressionSpec(kind, int(rank))
    if not (start.isascii() and start.isdigit()) or int(start) < POWERSGD_START_ITER:
        raise ValueError(
            f"compression {text!r} needs a whole PowerSGD start step >= {POWERSGD_START_ITER}"
            " (plain all-reduce steps before compressing), e.g. powersgd:2:20."
        )
    return CompressionSpec(kind, int(rank), int(start))


@dataclass(frozen=True, kw_only=True)  # by name only: a reordered field cannot mis-wire
class StrategyOptions:
    """A run's ``--strategy`` and the options that belong to it."""

    name: str = "ddp"
    microbatches: int | None = None  # pipeline
    pipeline_schedule: str = "1f1b"  # pipeline
    ps_workers: int | None = None  # ps-*: parameter-server shards
    max_staleness: int | None = None  # ps-async: SSP bound

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> StrategyOptions:
        """The strategy options among ``options`` (e.g. a magic's parsed arguments, same
        names; ``name`` is the strategy)."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    @property
    def replicated(self) -> bool:
        """Every rank holds the whole model and optimizer state (so each commits it)."""
        return self.name == "ddp"

    @property
    def is_ps(self) -> bool:
        return self.name in ("ps-sync", "ps-async")

    @property
    def servers(self) -> int:
        """Parameter-server shards this run needs (0 for non-ps strategies)."""
        return (self.ps_workers or 1) if self.is_ps else 0

    def check(self, compression: str = "none") -> None:
        """One sentence for the first bad value or combination."""
        if self.name not in STRATEGIES:
            raise ValueError(
                f"strategy {self.name!r} is not available; allowed: {', '.join(STRATEGIES)}."
            )
        check_whole("microbatches", self.microbatches, 1, allow_none=True)
        check_whole("ps_workers", self.ps_workers, 1, allow_none=True)
        check_whole("max_staleness", self.max_staleness, 0, allow_none=True)
        if self.pipeline_schedule not in SCHEDULES:
            raise ValueError(
                f"pipeline_schedule {self.pipeline_schedule!r} is unknown; allowed:"
                f" {', '.join(SCHEDULES)}."
            )
        if self.name != "pipeline" and (self.microbatches is not None
                                        or self.pipeline_schedule != "1f1b"):
            raise ValueError(
                f"microbatches and pipeline_schedule only apply to strategy 'pipeline', not"
                f" {self.name!r}."
            )
        if not self.is_ps and self.ps_workers is not None:
            raise ValueError(
                f"ps_workers only applies to strategies 'ps-sync' and 'ps-async', not"
                f" {self.name!r}."
            )
        if self.name != "ps-async" and self.max_staleness is not None:
            raise ValueError(
                f"max_staleness only applies to strategy 'ps-async', not {self.name!r}."
            )
        if self.name != "ddp" and compression != "none":
            raise ValueError(
                f"compression {compression!r} works through DDP's gradient hooks; it applies"
                f" to strategy 'ddp' only, not {self.name!r}."
            )

    def check_backend(self, backend: str) -> None:
        """FSDP needs GPUs: say which strategies work on CPU workers."""
        if self.name in GPU_ONLY and backend != "nccl":
            others = ", ".join(s for s in STRATEGIES if s not in GPU_ONLY)
            raise ValueError(
                f"strategy {self.name!r} needs GPU workers (NCCL), and PyTorch does not"
                f" support it with gloo on CPU; on these workers use one of: {others}."
            )


@dataclass(frozen=True, kw_only=True)  # by name only: a reordered field cannot mis-wire
class FaultOptions:
    """How a run survives lost workers: commits, checkpoints, resume and elastic rules."""

    max_failures: int = 0
    min_workers: int | None = None
    commit_every: int = 1
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    checkpoint_keep: int = 2
    resume: bool = False
    elastic: str = "global-batch"

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> FaultOptions:
        """The fault options among ``options`` (e.g. a magic's parsed arguments, same names)."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    def check(self, workers: int | None) -> None:
        """One sentence for the first bad value."""
        check_whole("max_failures", self.max_failures, 0)
        check_whole("min_workers", self.min_workers, 1, allow_none=True)
        check_whole("commit_every", self.commit_every, 1)
        check_whole("checkpoint_every", self.checkpoint_every, 1, allow_none=True)
        check_whole("checkpoint_keep", self.checkpoint_keep, 1)
        elastic.check_rule(self.elastic)
        if self.min_workers is not None:
            if workers is not None and self.min_workers > workers:
                raise ValueError(
                    f"min_workers={self.min_workers} is more than workers={workers}; use at"
                    f" most {workers}."
                )
            if not self.max_failures:
                raise ValueError(
                    "min_workers only matters when a run may recover: add max_failures >= 1"
                    " (--max-failures N)."
                )
        if self.checkpoint_dir is None and (self.resume or self.checkpoint_every):
            option = "resume" if self.resume else "checkpoint_every"
            raise ValueError(f"{option} needs checkpoint_dir (--checkpoint-dir PATH).")

    @property
    def commits(self) -> CommitPlan:
        """When ranks commit (nothing at all unless a run may recover or checkpoints)."""
        durable = (self.checkpoint_every or CHECKPOINT_EVERY) if self.checkpoint_dir else 0
        return CommitPlan(self.commit_every if self.max_failures else 0, durable)
