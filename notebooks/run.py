"""Run notebooks top to bottom, headless, and print what each cell did.

    python notebooks/run.py notebooks/01-quickstart.ipynb [...]

Exits non-zero on the first notebook with a cell that raises or an expected output that is
missing. Used by `make demo` and the notebook tests.

A code cell declares what it must show with a list of regular expressions in its metadata,
``"expect": ["test accuracy", "^\\[rank 1\\]"]``: each must match the cell's text output
(streams, and the plain-text form of results and displays, widgets included; ``^`` and ``$``
match at each line). Checks of the results themselves are ``assert`` cells in the notebook,
where a reader sees them.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


class MissingOutput(AssertionError):
    """A cell ran but did not show what its ``expect`` metadata asks for."""


def _text(output: nbformat.NotebookNode) -> str:
    if output.output_type == "stream":
        return str(output.text)
    if output.output_type == "error":
        return f"{output.ename}: {output.evalue}\n"
    data = output.get("data", {})
    return str(data.get("text/plain", "")) + "\n"


def _seconds(cell: nbformat.NotebookNode) -> str:
    """How long the cell ran, from the timing nbclient records in its metadata."""
    timing = cell.metadata.get("execution", {})
    try:
        start = datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return "-"
    return f"{(end - start).total_seconds():.1f} s"


def cell_text(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell showed, as text."""
    return "".join(_text(o) for o in cell.get("outputs", []))


def missing_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """One line per ``expect`` pattern that no output of its cell matches."""
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        text = cell_text(cell)
        for pattern in cell.metadata.get("expect", []):
            if not re.search(pattern, text, re.MULTILINE):
                first = cell.source.splitlines()[0] if cell.source else ""
                shown = text.strip()[-300:] or "nothing"
                problems.append(f"cell {index} ({first!r}) should show /{pattern}/ but"
                                f" showed: {shown}")
    return problems


def run(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute ``path`` in its own folder; print each code cell and its text output.

    Raises ``CellExecutionError`` for a cell that raised and :class:`MissingOutput` when a
    cell's expected output is missing.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    print(f"== {path.name}")
    start = time.monotonic()
    try:
        client.execute()
    finally:
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            print(f">>> [{_seconds(cell)}] " + cell.source.replace("\n", "\n... "))
            for output in cell.get("outputs", []):
                print("    " + _text(output).rstrip().replace("\n", "\n    "))
    print(f"== {path.name} ran in {time.monotonic() - start:.1f} s")
    problems = missing_outputs(nb)
    if problems:
        raise MissingOutput(f"{path.name}: " + "\n".join(problems))
    return nb


def main(argv: list[str]) -> int:
    for name in argv:
        try:
            run(Path(name))
        except CellExecutionError as e:
            print(f"!! {name} failed: {str(e).splitlines()[-1] if str(e) else e}")
            return 1
        except MissingOutput as e:
            print(f"!! {name} is missing expected output:\n{e}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
