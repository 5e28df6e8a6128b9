"""Notebook 06's factory configurations against the real signatures of the installed classes.

Each ``mlcloud.cluster.factory`` mapping the notebook shows (as Python or as YAML) names a
module, a class and keyword arguments; a keyword the class does not take would fail only on a
user's cluster. The packages are in the test extra, so ``make test`` checks every case; a
package that is not installed (another environment) skips its case; nothing else does.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "06-scale-out.ipynb"
# The deployments the notebook documents; a missing one means the notebook changed.
EXPECTED = {"slurm", "kubernetes", "gateway", "local", "yaml-1"}


def _configurations() -> dict[str, dict[str, Any]]:
    """Every factory mapping in the notebook: Python dict literals assigned to a name, and the
    ``factory`` mappings of its YAML blocks (``yaml-1``, ``yaml-2``, ... in order)."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    found: dict[str, dict[str, Any]] = {}
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code":
            lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
            for node in ast.walk(ast.parse("\n".join(lines))):
                if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                        and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                    value = ast.literal_eval(node.value)
                    if {"module", "class"} <= set(value):
                        found[node.targets[0].id] = value
        else:
            for block in re.findall(r"```yaml\n(.*?)```", source, flags=re.S):
                factory = yaml.safe_load(block)["mlcloud"]["cluster"]["factory"]
                found[f"yaml-{sum(k.startswith('yaml-') for k in found) + 1}"] = factory
    return found


CONFIGURATIONS = _configurations()


def accepted_keywords(cls: type) -> tuple[set[str], bool]:
    """The keyword names building ``cls`` takes, following ``**kwargs`` up the ``__init__``
    chain (and, for dask-jobqueue, into the class's ``job_cls``, which receives its extra
    keywords); and whether the chain still ends open (takes any keyword)."""
    names: set[str] = set()
    chains = [cls]
    job_cls = getattr(cls, "job_cls", None)
    if isinstance(job_cls, type):
        chains.append(job_cls)
    open_ends = []
    for start in chains:
        open_end = True
        for klass in start.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            params = inspect.signature(init).parameters.values()
            names |= {p.name for p in params if p.name != "self" and p.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                open_end = False
                break
        open_ends.append(open_end)
    return names, all(open_ends)


def test_the_notebook_shows_every_deployment() -> None:
    assert set(CONFIGURATIONS) == EXPECTED


@pytest.mark.parametrize("which", sorted(EXPECTED))
def test_configuration_matches_the_installed_class(which: str) -> None:
    spec = CONFIGURATIONS[which]
    assert set(spec) <= {"module", "class", "args", "kwargs"}, spec
    package = spec["module"].split(".")[0]
    pytest.importorskip(package, reason=f"{package} is not installed")
    module = importlib.import_module(spec["module"])  # present: a failure here is a real one
    assert hasattr(module, spec["class"]), f"{spec['module']} has no {spec['class']}"
    cls = getattr(module, spec["class"])
    names, _ = accepted_keywords(cls)
    unknown = sorted(set(spec.get("kwargs", {})) - names)
    assert unknown == [], f"{spec['module']}.{spec['class']} takes no {unknown}"
    bound = inspect.signature(cls).bind_partial(*spec.get("args", ()))
    assert len(bound.arguments) == len(spec.get("args", ()))


def test_the_signature_check_catches_a_wrong_keyword() -> None:
    """The check itself: LocalCluster's keywords, its own and its base class's (reached
    through ``**kwargs``), are found, and a misspelt one is not among them."""
    from distributed import LocalCluster

    names, _ = accepted_keywords(LocalCluster)
    assert {"n_workers", "threads_per_worker", "dashboard_address", "shutdown_on_close"} <= names
    assert "n_worker" not in names
