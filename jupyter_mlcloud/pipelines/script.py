"""Finding a pipeline in a Python file: ``FILE.py`` or ``FILE.py:NAME`` on the command line."""

from __future__ import annotations

import json
import os
import runpy
import sys
from typing import TYPE_CHECKING, Any

from .pipeline import Pipeline

if TYPE_CHECKING:
    from .runner import PipelineResult

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


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """``["train.lr=0.05", "tag=nightly"]`` -> params overrides (values read as JSON, else
    kept as text)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--param {pair!r} is not NAME=VALUE (e.g. train.lr=0.05).")
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def open_cluster(*, scheduler: str | None = None, cluster_config: str | None = None,
                 workers: int | None = None, timeout: float = 30.0) -> Any:
    """The cluster a headless run hands its steps: the one at ``scheduler``, or one built from
    the Dask config in the YAML file ``cluster_config`` (``mlcloud.cluster.factory`` and the
    rest), or a local one of ``workers`` workers; None when none of them is given."""
    from ..cluster import api as clusters

    if scheduler and cluster_config:
        raise ValueError("give --scheduler or --cluster-config, not both.")
    if scheduler:
        return clusters.connect(scheduler, timeout=timeout)
    if cluster_config:
        import dask
        import yaml

        try:
            with open(cluster_config) as f:
                config = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--cluster-config {cluster_config!r} cannot be read as YAML"
                             f" ({e}).") from None
        if not isinstance(config, dict):
            raise ValueError(f"--cluster-config {cluster_config!r} holds"
                             f" {type(config).__name__}; it must be a mapping of Dask config.")
        dask.config.update(dask.config.config, config, priority="new")
        return clusters.up(workers=workers, timeout=timeout)
    if workers:
        return clusters.up(workers=workers, timeout=timeout)
    return None


def run_spec(spec: str, *, cluster: Any = None, force: bool | list[str] = False,
             params: dict[str, Any] | None = None) -> PipelineResult:
    """Load ``spec`` (``FILE.py[:NAME]``) and run it on ``cluster``."""
    return load(spec).run(cluster=cluster, force=force, params=params)
