"""Run notebooks top to bottom, headless, and print what each cell did.

    python notebooks/run.py notebooks/01-quickstart.ipynb [...]

Exits non-zero on the first cell that raises. Used by `make demo` and the notebook tests.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def _text(output: nbformat.NotebookNode) -> str:
    if output.output_type == "stream":
        return str(output.text)
    if output.output_type == "error":
        return f"{output.ename}: {output.evalue}\n"
    data = output.get("data", {})
    return str(data.get("text/plain", "")) + "\n"


def run(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute ``path`` in its own folder; print each code cell and its text output."""
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
            print(">>> " + cell.source.replace("\n", "\n... "))
            for output in cell.get("outputs", []):
                print("    " + _text(output).rstrip().replace("\n", "\n    "))
    print(f"== {path.name} ran in {time.monotonic() - start:.1f} s")
    return nb


def main(argv: list[str]) -> int:
    for name in argv:
        try:
            run(Path(name))
        except CellExecutionError as e:
            print(f"!! {name} failed: {str(e).splitlines()[-1] if str(e) else e}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
