"""A pipeline's definition: its steps and the graph their named inputs and outputs make.

A step is a function, or a notebook (:mod:`.notebook`). Its parameters are bound by name when
it runs: an input gets the upstream output's value (for a file output, its final path or URL),
a param its value, a file output the temporary path to write to (moved into place only if the
step succeeds), and ``cluster`` the cluster the pipeline runs with. Outputs declared without a
location are what the step returns: a dict by output name, or the bare value of a single
output.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .notebook import NotebookStep

if TYPE_CHECKING:
    from .runner import PipelineResult

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
RESERVED = ("cluster",)  # parameter names a step may take that are not inputs, params or outputs


def check_name(kind: str, value: Any) -> str:
    """``value`` if it is a usable name (it becomes part of file names and MLflow tags)."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"{kind} name {value!r} is not allowed; use letters, digits, '_', '.'"
                         " and '-' (not first).")
    return value


@dataclass
class Step:
    """One step: the function, where its inputs come from, its params and its outputs."""

    name: str
    fn: Callable[..., Any]
    inputs: dict[str, str]  # the function's parameter -> the output (or source) it reads
    params: dict[str, Any]
    files: dict[str, str]  # file outputs: name -> location (path or fsspec URL)
    returns: list[str]  # outputs the function returns
    when: Callable[..., Any] | None = None
    when_inputs: dict[str, str] = field(default_factory=dict)

    @property
    def outputs(self) -> list[str]:
        return list(self.files) + self.returns

    def upstream(self) -> set[str]:
        """The outputs (and sources) this step reads, its condition's included."""
        return set(self.inputs.values()) | set(self.when_inputs.values())


def _names(kind: str, value: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        pairs = dict(value)
    elif isinstance(value, Sequence):
        pairs = {v: v for v in value}
    else:
        raise ValueError(f"{kind}={value!r} is not allowed; give a list of names or a dict.")
    for key, ref in pairs.items():
        check_name(kind[:-1], key)
        check_name(kind[:-1], ref)
    return pairs


def _outputs(value: Sequence[str] | Mapping[str, str | None] | None
             ) -> tuple[dict[str, str], list[str]]:
    if value is None:
        return {}, []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        files = {check_name("output", k): v for k, v in value.items() if v is not None}
        for key, location in files.items():
            if not isinstance(location, (str, os.PathLike)) or not str(location):
                raise ValueError(f"output {key!r} has the location {location!r}; give a path or"
                                 " an fsspec URL (or None for a returned output).")
        returns = [check_name("output", k) for k, v in value.items() if v is None]
        return {k: os.fspath(v) for k, v in files.items()}, returns
    if isinstance(value, Sequence):
        return {}, [check_name("output", v) for v in value]
    raise ValueError(f"outputs={value!r} is not allowed; give a list of names, or a dict of"
                     " name -> path or fsspec URL (None: returned by the step).")


def _check_params(step: str, params: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in params.items():
        try:  # params are part of the cache key: they must have a stable text form
            json.dumps(value, sort_keys=True)
        except (TypeError, ValueError):
            raise ValueError(f"param {key!r} of step {step!r} is {type(value).__name__}; params"
                             " must be JSON values (numbers, text, lists, dicts).") from None
    return dict(params)


def _bindable(fn: Callable[..., Any]) -> tuple[set[str], bool, set[str]]:
    """The function's parameter names, whether it takes ``**kwargs``, and those it needs."""
    parameters = inspect.signature(fn).parameters.values()
    names = {p.name for p in parameters
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in parameters if p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters), required


class Pipeline:
    """Steps joined by the artifacts they name; see :func:`pipeline`."""

    def __init__(self, name: str, *, root: str | os.PathLike[str] | None = None) -> None:
        self.name = check_name("pipeline", name)
        #: Relative output locations and sources, the lock and staging names live under here.
        self.root = os.path.abspath(os.fspath(root) if root is not None else os.getcwd())
        self.steps: dict[str, Step] = {}
        self.sources: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {' -> '.join(s.name for s in self.order()) or 'empty'}>"

    def source(self, name: str, location: str | os.PathLike[str]) -> str:
        """Declare an artifact no step makes (raw data): steps read it as an input by
        ``name``, and a change of its content reruns them. Returns ``name``."""
        check_name("source", name)
        if name in self._produced():
            raise ValueError(f"source {name!r} is already an output of step"
                             f" {self._produced()[name]!r}; choose another name.")
        self.sources[name] = os.fspath(location)
        return name

    def step(self, fn: Callable[..., Any] | str | os.PathLike[str] | None = None, *,
             name: str | None = None,
             inputs: Sequence[str] | Mapping[str, str] | None = None,
             params: Mapping[str, Any] | None = None,
             outputs: Sequence[str] | Mapping[str, str | None] | None = None,
             when: Callable[..., Any] | None = None) -> Any:
        """Add a step (or replace the one of the same name); usable as ``@pipe.step``,
        ``@pipe.step(outputs=...)`` or ``pipe.step(fn, inputs=..., ...)``.

        ``inputs``: names of other steps' outputs (or of sources) the step reads, as a list
        (parameter named like the output) or a dict parameter -> output. ``params``: JSON
        values, part of the cache key. ``outputs``: names the step returns (a list), or a dict
        name -> path or fsspec URL for files the step writes (None: returned). ``when``: a
        condition called with upstream outputs (by parameter name) and this step's params; a
        false answer skips the step and its dependants. Returns the function unchanged.

        ``fn`` may be the path of a notebook instead (``pipe.step("prepare.ipynb",
        outputs={"data": "work/data.npz"})``, relative to the pipeline's root): it runs in a
        kernel of its own with its inputs, params and file outputs set after its cell tagged
        ``parameters`` (see :mod:`.notebook`); its step is named after the file unless
        ``name=`` says otherwise. Returns the notebook step.
        """
        def add(function: Callable[..., Any]) -> Callable[..., Any]:
            self._add(function, name=name, inputs=inputs, params=params, outputs=outputs,
                      when=when)
            return function

        if fn is None:
            return add
        if isinstance(fn, (str, os.PathLike)):
            return add(NotebookStep(fn, root=self.root))
        if not callable(fn):
            raise ValueError(f"a step must be a function, got {fn!r}.")
        return add(fn)

    def _add(self, fn: Callable[..., Any], *, name: str | None, inputs: Any, params: Any,
             outputs: Any, when: Callable[..., Any] | None) -> None:
        step_name = check_name("step", name or getattr(fn, "__name__", ""))
        files, returns = _outputs(outputs)
        step = Step(step_name, fn, _names("inputs", inputs),
                    _check_params(step_name, params or {}), files, returns, when)
        if isinstance(fn, NotebookStep):
            fn.check(step, self.name)
        names, var_kw, required = _bindable(fn)
        given = set(step.inputs) | set(step.params) | set(step.files) | set(RESERVED)
        clash = set(step.inputs) & (set(step.params) | set(step.files))
        if clash:
            raise ValueError(f"step {step_name!r} names {sorted(clash)} both as inputs and as"
                             " params or outputs; each name is one of them.")
        unknown = sorted((set(step.inputs) | set(step.params) | set(step.files)) - names)
        if unknown and not var_kw:
            raise ValueError(f"step {step_name!r} declares {unknown}, which its function does"
                             f" not take; it takes {sorted(names)}.")
        missing = sorted(required - given)
        if missing:
            raise ValueError(
                f"step {step_name!r} takes {missing}, which are none of its inputs, params,"
                " file outputs or 'cluster'; declare them (inputs=, params=, outputs=).")
        if when is not None:
            if not callable(when):
                raise ValueError(f"when={when!r} of step {step_name!r} is not callable; give a"
                                 " function of upstream outputs that returns True or False.")
            when_names, _, _ = _bindable(when)
            step.when_inputs = {n: n for n in sorted(when_names - set(step.params))}
        produced = self._produced(excluding=step_name)
        for output in step.outputs:
            owner = produced.get(output) or (output in self.sources and "a source")
            if owner:
                raise ValueError(f"output {output!r} of step {step_name!r} is already made by"
                                 f" {owner!r}; every output has one step that makes it.")
        self.steps[step_name] = step

    def _produced(self, excluding: str | None = None) -> dict[str, str]:
        return {output: s.name for s in self.steps.values() if s.name != excluding
                for output in s.outputs}

    def producers(self) -> dict[str, str]:
        """Output name -> the step that makes it."""
        return self._produced()

    def order(self) -> list[Step]:
        """The steps in an order that runs each after those it reads from (ties: the order
        they were added); ValueError naming an unknown input or a cycle."""
        produced = self._produced()
        deps: dict[str, set[str]] = {}
        for step in self.steps.values():
            unknown = sorted(step.upstream() - set(produced) - set(self.sources))
            if unknown:
                known = sorted(set(produced) | set(self.sources))
                raise ValueError(
                    f"step {step.name!r} reads {unknown}, which no step makes and no source"
                    f" names; known outputs: {known or 'none'} (pipe.source(name, path) adds a"
                    " file no step makes).")
            deps[step.name] = {produced[o] for o in step.upstream() if o in produced}
            if step.name in deps[step.name]:
                raise ValueError(f"step {step.name!r} reads its own output.")
        done: list[Step] = []
        placed: set[str] = set()
        while len(done) < len(self.steps):
            ready = [s for s in self.steps.values() if s.name not in placed
                     and deps[s.name] <= placed]
            if not ready:
                stuck = sorted(set(self.steps) - placed)
                raise ValueError(f"steps {stuck} read each other's outputs in a cycle; a"
                                 " pipeline's steps must form a chain or tree of reads.")
            done.append(ready[0])
            placed.add(ready[0].name)
        return done

    def dependencies(self) -> dict[str, list[str]]:
        """Step -> the steps it reads from (the graph's edges)."""
        produced = self._produced()
        return {s.name: sorted({produced[o] for o in s.upstream() if o in produced})
                for s in self.order()}

    def run(self, *, cluster: Any = None, force: bool | Sequence[str] = False,
            params: Mapping[str, Any] | None = None) -> PipelineResult:
        """Run the pipeline now, in this process: see :func:`.runner.run`."""
        from .runner import run

        return run(self, cluster=cluster, force=force, params=params)


def pipeline(name: str, *, root: str | os.PathLike[str] | None = None) -> Pipeline:
    """A new, empty pipeline called ``name`` (letters, digits, ``_ . -``).

    ``root`` (default: the working directory) is where relative output locations and sources
    are, and where the pipeline's run lock lives. Runs are recorded in MLflow by ``name``:
    two pipelines with one name share their cache.
    """
    return Pipeline(name, root=root)
