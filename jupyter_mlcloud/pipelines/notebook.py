"""Notebook steps: ``pipe.step("prepare.ipynb", inputs=..., params=..., outputs=...)``.

The notebook runs top to bottom in a Jupyter kernel of its own (nbclient), papermill-style:
right after the cell tagged ``parameters`` comes a cell tagged ``injected-parameters`` that
sets each input (the upstream output's path or value), each param, and each file output (the
temporary path to write to, published only if the notebook ends without an error). Every name
injected must be one the parameters cell assigns: its values there are the defaults for
running the notebook by hand. A parameters cell that assigns ``cluster`` gets the scheduler
address of the cluster the pipeline runs with.

The executed notebook is an output of the step too, ``STEP.ipynb``, published beside the
pipeline's lock (``.mlcloud-pipelines/PIPELINE/STEP.ipynb``). The step's code hash, for the
cache, is that of the notebook's code cells and kernel name: outputs, counts, markdown and
other metadata left out.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
from typing import TYPE_CHECKING, Any

from ..tracking import context

if TYPE_CHECKING:
    from .pipeline import Step

PARAMETERS = "parameters"  # the tag of the cell injected values follow (papermill's)
INJECTED = "injected-parameters"
STATE_DIR = ".mlcloud-pipelines"  # under the pipeline's root: its lock, executed notebooks
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookFailed(RuntimeError):
    """A cell of a notebook step raised; ``details`` is the cell's traceback as text."""

    def __init__(self, message: str, details: str) -> None:
        super().__init__(message)
        self.details = details


def _read(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        raise ValueError("it has no list of cells")
    return notebook


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def parameters_cell(notebook: dict[str, Any]) -> int | None:
    """The index of the first cell tagged ``parameters``, or None."""
    for i, cell in enumerate(notebook["cells"]):
        if PARAMETERS in (cell.get("metadata", {}).get("tags") or []):
            return i
    return None


def assigned(source: str) -> set[str]:
    """The names a cell's code assigns at top level (``x = 1``, ``x: int = 1``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython syntax (magics): plain ``name =`` lines still count
        return set(re.findall(r"^([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)", source, re.M))
    names: set[str] = set()
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for target in targets:
            elements = target.elts if isinstance(target, ast.Tuple) else [target]
            names.update(t.id for t in elements if isinstance(t, ast.Name))
    return names


def code_hash_of(notebook: dict[str, Any]) -> str:
    """The hash of a notebook's code cells' sources, in order, and of the kernel it names
    (another language or environment may compute something else)."""
    sources = [_source(c) for c in notebook["cells"] if c.get("cell_type") == "code"]
    kernel = kernel_of(notebook)
    return hashlib.sha256(json.dumps([kernel, sources]).encode()).hexdigest()


def kernel_of(notebook: Any) -> str:
    """The kernel a notebook names in its metadata (``python3`` if none)."""
    return str((notebook.get("metadata", {}).get("kernelspec") or {}).get("name") or "python3")


def check_kernel(kernel: str, notebook: str) -> None:
    """ValueError naming the installed kernels, if ``kernel`` is not one of them."""
    from jupyter_client.kernelspec import find_kernel_specs

    installed = sorted(find_kernel_specs())
    if kernel not in installed:
        raise ValueError(f"notebook {notebook!r} asks for kernel {kernel!r}, which is not"
                         f" installed; installed: {installed}.")


def _address(cluster: Any) -> str | None:
    if cluster is None or isinstance(cluster, str):
        return cluster
    for attribute in ("address", "scheduler_address"):
        value = getattr(cluster, attribute, None)
        if isinstance(value, str):
            return value
    scheduler = getattr(getattr(cluster, "scheduler", None), "address", None)
    return scheduler if isinstance(scheduler, str) else None


class NotebookStep:
    """A notebook run as a step's function; the runner calls it with the step's values."""

    def __init__(self, path: str | os.PathLike[str], *, root: str) -> None:
        given = os.fspath(path)
        if not given.endswith(".ipynb"):
            raise ValueError(f"a step must be a function or a notebook path ending in .ipynb,"
                             f" got {given!r}.")
        self.given = given
        self.path = os.path.normpath(os.path.join(root, os.path.expanduser(given)))
        if not os.path.isfile(self.path):
            raise ValueError(f"notebook {given!r} does not exist under the pipeline's root"
                             f" ({root}); give the path of an .ipynb file, absolute or relative"
                             " to the root.")
        try:
            notebook = _read(self.path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{given!r} is not a readable notebook ({e}).") from None
        check_kernel(kernel_of(notebook), given)
        self.__name__ = os.path.splitext(os.path.basename(self.path))[0]
        # The runner binds by signature: one that takes every value it is given.
        self.__signature__ = inspect.Signature(
            [inspect.Parameter("values", inspect.Parameter.VAR_KEYWORD)])
        self.injected: set[str] = set()  # the names the injected cell sets
        self.executed = ""  # the output name of the executed notebook
        self._names = self._parameter_names(notebook)

    def __repr__(self) -> str:
        return f"<notebook {self.given!r}>"

    def _parameter_names(self, notebook: dict[str, Any]) -> set[str] | None:
        index = parameters_cell(notebook)
        return None if index is None else assigned(_source(notebook["cells"][index]))

    def check(self, step: Step, pipeline: str) -> None:
        """Check ``step`` against the notebook's parameters cell, and add the executed
        notebook to its file outputs; ValueError names what does not fit."""
        if step.returns:
            raise ValueError(
                f"notebook step {step.name!r} declares returned outputs {step.returns}; a"
                " notebook's outputs are files it writes: give outputs={name: path}.")
        wanted = set(step.inputs) | set(step.params) | set(step.files)
        if wanted and self._names is None:
            raise ValueError(
                f"notebook {self.given!r} has no cell tagged {PARAMETERS!r}, so its inputs,"
                f" params and outputs {sorted(wanted)} cannot be set; tag the cell that assigns"
                " their defaults 'parameters'.")
        unknown = sorted(wanted - (self._names or set()))
        if unknown:
            raise ValueError(
                f"notebook step {step.name!r} sets {unknown}, which the parameters cell of"
                f" {self.given!r} does not assign; it assigns {sorted(self._names or ())}.")
        self.injected = wanted
        self.executed = f"{step.name}.ipynb"
        if self.executed in step.files:
            raise ValueError(f"output {self.executed!r} of step {step.name!r} is the executed"
                             " notebook's own name; choose another output name.")
        step.files[self.executed] = os.path.join(STATE_DIR, pipeline, self.executed)

    def code_hash(self) -> str:
        """The hash of the notebook's code cells, as they are on disk now."""
        return code_hash_of(_read(self.path))

    def __call__(self, **values: Any) -> None:
        """Run the notebook with ``values`` injected; write it, executed, to the path given
        for its executed-notebook output. Raises :class:`NotebookFailed` if a cell raises."""
        import nbformat
        from jupyter_client.kernelspec import NoSuchKernel
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError

        try:
            notebook = nbformat.read(self.path, as_version=4)
        except (OSError, ValueError) as e:
            raise ValueError(f"notebook {self.given!r} cannot be read now ({e}).") from None
        names = self._parameter_names(notebook)
        if self.injected - (names or set()):
            raise ValueError(
                f"the parameters cell of notebook {self.given!r} no longer assigns"
                f" {sorted(self.injected - (names or set()))}; it assigns {sorted(names or ())}.")
        executed_to = values.pop(self.executed)
        inject = {k: v for k, v in values.items() if k in self.injected}
        address = _address(values.get("cluster"))
        if names and "cluster" in names and address is not None:
            inject["cluster"] = address
        index = parameters_cell(notebook)
        if inject:
            lines = ["# Parameters"] + [f"{k} = {v!r}" for k, v in sorted(inject.items())]
            cell = nbformat.v4.new_code_cell("\n".join(lines))
            cell.metadata["tags"] = [INJECTED]
            notebook.cells.insert(0 if index is None else index + 1, cell)
        kernel = kernel_of(notebook)
        client = NotebookClient(notebook, kernel_name=kernel, timeout=None,
                                resources={"metadata": {"path": os.path.dirname(self.path)}})
        step = context.active()
        env = {**os.environ, **(context.step_env(step) if step is not None else {})}
        try:
            client.execute(env=env)
        except CellExecutionError as e:
            number = self._failed_cell(notebook, index if inject else None)
            raise NotebookFailed(
                f"notebook {self.given!r} failed in cell {number}: {e.ename}: {e.evalue}",
                _ANSI.sub("", e.traceback)) from None
        except NoSuchKernel:  # uninstalled since the step was added
            check_kernel(kernel, self.given)
            raise
        nbformat.write(notebook, executed_to)

    @staticmethod
    def _failed_cell(notebook: Any, injected_after: int | None) -> int:
        """The 1-based number of the cell that raised, as the notebook on disk counts."""
        for i, cell in enumerate(notebook.cells):
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                shift = 1 if injected_after is not None and i > injected_after else 0
                return i + 1 - shift
        return 0
