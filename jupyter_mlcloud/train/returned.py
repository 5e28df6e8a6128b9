"""What rank 0's task gives back to the launcher (no torch here: the kernel unpacks it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Returned:
    """The training function's result, as the notebook gets it, and the reference sample
    ``ctx.keep_reference`` kept on rank 0 (a ``monitoring.reference.Reference``, or None)."""

    value: Any
    reference: Any = None
