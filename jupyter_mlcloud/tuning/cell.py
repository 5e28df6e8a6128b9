"""``%%tune``: the cell's training code, checked and made into a function of ``ctx``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..train.cell import prepare_cell
from .payload import CellFunction


def cell_function(source: str, user_ns: Mapping[str, Any]) -> CellFunction:
    """The cell as ``fn(ctx)`` for :func:`~.study.tune`; ``params`` is a name the cell may read.

    Raises ``SyntaxError`` or ``ValueError`` (a name neither the cell nor the notebook
    defines) before anything is shipped, as ``%%distributed_train`` does.
    """
    # A placeholder, so the check accepts ``params``; each trial ships its own values.
    payload = prepare_cell(source, {**user_ns, "params": {}})
    return CellFunction(payload)
