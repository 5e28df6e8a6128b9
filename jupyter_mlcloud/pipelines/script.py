"""Finding a pipeline in a Python file: ``FILE.py`` or ``FILE.py:NAME`` on the command line."""

from __future__ import annotations

import os
import runpy
import sys

from .pipeline import Pipeline

RUN_NAME = "__mlcloud_pipeline__"  # the file's __name__: its ``if __name__ == "__main__"``
#                                    block (a run of its own) does not run


def split_spec(spec: str) -> tuple[str, str | None]:
    """``FILE.py[:NAME]`` -> (file, name or None)."""
    path, sep, name = spec.rpartition(":")
    if sep and path.endswith(".py") and name:
        return path, name
    return spec, None


def load(spec: str) -> Pipeline:
    """The pipeline ``spec`` names: the one pipeline the file defines, or the one called (or
    bound to a variable called) NAME. The file's folder is importable while it runs, as it is
    for ``python FILE.py``."""
    path, name = split_spec(spec)
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ValueError(f"{spec!r} is not a Python file; give FILE.py or FILE.py:NAME.")
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        scope = runpy.run_path(path, run_name=RUN_NAME)
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    found = {var: value for var, value in scope.items() if isinstance(value, Pipeline)}
    if name is not None:
        match = [p for var, p in found.items() if name in (var, p.name)]
        if match:
            return match[0]
    elif len({id(p) for p in found.values()}) == 1:
        return next(iter(found.values()))
    names = sorted({p.name for p in found.values()})
    if not names:
        raise ValueError(f"{path!r} defines no pipeline; it needs a top-level"
                         " `pipe = mlc.pipeline(NAME)` with its steps.")
    if name is None:
        raise ValueError(f"{path!r} defines several pipelines, {names}; choose one with"
                         f" {path}:NAME.")
    raise ValueError(f"{path!r} defines no pipeline {name!r}; it defines {names}.")
