"""The suite's own rules: shared helpers live in conftest modules, so no test module imports
another (a failing import there would fail unrelated tests)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(TESTS)}: {name}" for name in names
                          if name.startswith("tests.") and name.split(".")[-1].startswith("test_")]
    assert offenders == [], "move shared helpers into a conftest module:\n" + "\n".join(offenders)
