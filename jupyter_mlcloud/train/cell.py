"""Turning a notebook cell into something every rank can run."""

from __future__ import annotations

import ast
import builtins
from collections.abc import Mapping, Sequence
from typing import Any

from .rank.worker import CellPayload

CELL_FILENAME = "<distributed_train cell>"
PROVIDED = {"ctx", "__name__", "__file__"}  # names every rank gets without shipping


def _names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(names the cell reads, names it binds anywhere)."""
    loaded: set[str] = set()
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return loaded, bound


def prepare_cell(source: str, user_ns: Mapping[str, Any], out: Sequence[str] = ()) -> CellPayload:
    """Check the cell and gather the notebook names it reads.

    Raises ``SyntaxError`` for a cell that does not compile and ``ValueError`` for a name the
    cell reads that neither it nor the notebook defines, or an ``--out`` name the cell never
    assigns — all before anything is shipped to a worker.
    """
    tree = ast.parse(source, filename=CELL_FILENAME)  # SyntaxError, with the line
    compile(tree, CELL_FILENAME, "exec")
    loaded, bound = _names(tree)
    builtin_names = set(dir(builtins))
    missing = sorted(
        n for n in loaded - bound - PROVIDED - builtin_names if n not in user_ns
    )
    if missing:
        raise ValueError(
            f"the cell uses {', '.join(repr(m) for m in missing)}, which the notebook does not"
            " define; run the cell that defines it first, or define it inside the cell."
        )
    unknown_out = [n for n in out if n not in bound and n not in user_ns]
    if unknown_out:
        raise ValueError(
            f"--out names {unknown_out} are never assigned by the cell; name variables the cell"
            " sets, e.g. --out model."
        )
    # Modules pickle by reference: each worker imports its own copy.
    shipped = {n: user_ns[n] for n in sorted(loaded - PROVIDED) if n in user_ns}
    return CellPayload(source=source, filename=CELL_FILENAME, namespace=shipped)
