"""``--compression`` values, parsed without torch (the kernel checks them before a run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")
# Plain all-reduce steps before PowerSGD starts compressing (``powersgd:RANK:START`` sets it).
# A short run of exact gradients first is what PowerSGD's authors and PyTorch advise (PyTorch
# defaults to 1000 steps, tuned for long runs); 2 is the least error feedback allows.
POWERSGD_START_ITER = 2


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
