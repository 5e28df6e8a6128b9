"""Running a pipeline: each step in order, cached, published atomically, under a run lock.

Steps run one after another in this process (the kernel, or the ``jupyter-mlcloud pipeline
run`` process): a step is orchestration, and the heavy work inside it goes to the cluster
through ``mlc.train`` / ``mlc.score``, which take the ``cluster`` the pipeline runs with. Its
file outputs are then local to the process that publishes them, so the move into place and the
marker are one process's writes.

A step whose cache key (:mod:`.cache`) matches a finished earlier run whose outputs are still
there and unchanged is not called: its recorded outputs are reused. A step that raises is
``failed``; its dependants are ``not-run``, and every step that finished keeps its outputs and
record, so the next run redoes only what failed. A false ``when=`` condition makes the step
``skipped``, and its dependants too.

While a step runs, runs it starts with ``mlc.train``, ``mlc.tune`` or ``mlc.score`` (in this
process, or in a notebook step's kernel) are children of the step's MLflow run
(:mod:`..tracking.context`), and the step's record lists them (``mlcloud.step_runs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..tracking import context
from . import artifacts, cache
from .notebook import STATE_DIR, NotebookFailed, NotebookStep
from .pipeline import RESERVED, Pipeline, Step
from .record import PipelineRecord

STATES = ("done", "cached", "failed", "skipped", "not-run")
LOCK_DIR = STATE_DIR


class PipelineBusy(RuntimeError):
    """Another run of the same pipeline holds its lock."""


class StepFailed(RuntimeError):
    """A step broke its contract (an output not written or not returned)."""


@dataclass
class StepResult:
    """How one step went: ``state`` is one of done, cached, failed, skipped, not-run."""

    name: str
    state: str
    duration: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # why skipped, not run or failed (the error's last line)
    error: str | None = None  # the traceback of a failed step
    cache_key: str | None = None
    cached_from: str | None = None  # the MLflow run of the step whose outputs were reused
    mlflow_run_id: str | None = None
    runs: list[str] = field(default_factory=list)  # MLflow runs started while the step ran


@dataclass(repr=False)
class PipelineResult:
    """A pipeline run: each step's result in run order, and the MLflow parent run."""

    pipeline: str
    steps: dict[str, StepResult]
    duration: float
    mlflow_run_id: str | None

    @property
    def ok(self) -> bool:
        """No step failed (skipped by a condition is fine)."""
        return all(s.state != "failed" and s.state != "not-run" for s in self.steps.values())

    @property
    def outputs(self) -> dict[str, Any]:
        """Every output of the steps that ran or were cached, by name."""
        return {k: v for s in self.steps.values() for k, v in s.outputs.items()}

    def __getitem__(self, step: str) -> StepResult:
        return self.steps[step]

    def rows(self) -> list[dict[str, Any]]:
        return [{"step": s.name, "state": s.state, "seconds": round(s.duration, 3),
                 "outputs": ", ".join(sorted(s.outputs)), "note": s.reason}
                for s in self.steps.values()]

    def table(self) -> Any:
        """The steps as a pandas DataFrame (step, state, seconds, outputs, note)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def __str__(self) -> str:
        rows = [{k: str(v) for k, v in row.items()} for row in self.rows()]
        heads = ["step", "state", "seconds", "outputs", "note"]
        widths = {h: max([len(h)] + [len(r[h]) for r in rows]) for h in heads}
        lines = ["  ".join(h.ljust(widths[h]) for h in heads).rstrip()]
        lines += ["  ".join(r[h].ljust(widths[h]) for h in heads).rstrip() for r in rows]
        verdict = "ok" if self.ok else "FAILED"
        lines.append(f"pipeline {self.pipeline!r} {verdict} in {self.duration:.2f} s"
                     + (f" (MLflow run {self.mlflow_run_id})" if self.mlflow_run_id else ""))
        return "\n".join(lines)

    __repr__ = __str__  # the step table, in a terminal too

    def _repr_html_(self) -> str:
        return str(self.table().to_html(index=False))

    def raise_for_failure(self) -> None:
        """Raise ``RuntimeError`` naming the failed step, if one failed."""
        failed = [s for s in self.steps.values() if s.state == "failed"]
        if failed:
            raise RuntimeError(f"step {failed[0].name!r} of pipeline {self.pipeline!r} failed:"
                               f" {failed[0].reason}")


@contextlib.contextmanager
def run_lock(pipeline: Pipeline) -> Iterator[str]:
    """Hold the pipeline's lock file for the run; a second run of the same pipeline (same
    name and root), in this process or another, is refused. ``flock`` goes with the process,
    so a killed run leaves no stale lock."""
    import fcntl  # POSIX: here, not at import, so the package still imports elsewhere

    folder = os.path.join(pipeline.root, LOCK_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{pipeline.name}.lock")
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PipelineBusy(f"pipeline {pipeline.name!r} is already running ({holder});"
                               " wait for that run to end, then run it again.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield path
    finally:
        handle.close()  # releases the lock


def _overrides(pipeline: Pipeline, params: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each step's params with ``params`` applied: ``"step.name"`` sets one step's param,
    ``"name"`` every step's param of that name."""
    out = {s.name: dict(s.params) for s in pipeline.steps.values()}
    for key, value in (params or {}).items():
        step, _, name = key.rpartition(".")
        targets = [step] if step else [s for s in out if name in out[s]]
        if not targets or any(t not in out or name not in out[t] for t in targets):
            known = sorted(f"{s}.{p}" for s in out for p in out[s])
            raise ValueError(f"params has {key!r}, which is no step's param; known:"
                             f" {known or 'none'}.")
        for t in targets:
            out[t][name] = value
    return out


def _forced(pipeline: Pipeline, force: bool | Sequence[str]) -> set[str]:
    if force is True:
        return set(pipeline.steps)
    if force is False or force is None:
        return set()
    names = [force] if isinstance(force, str) else list(force)
    unknown = [n for n in names if n not in pipeline.steps]
    if unknown:
        raise ValueError(f"force names {unknown}, which are not steps of pipeline"
                         f" {pipeline.name!r}; its steps: {sorted(pipeline.steps)}.")
    return set(names)


def _bind(fn: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    import inspect

    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return dict(values)
    return {p.name: values[p.name] for p in parameters if p.name in values}


class _Runner:
    def __init__(self, pipeline: Pipeline, cluster: Any, forced: set[str],
                 params: dict[str, dict[str, Any]]) -> None:
        self.pipeline, self.cluster, self.forced, self.params = pipeline, cluster, forced, params
        self.values: dict[str, Any] = {}  # output -> what dependants get
        self.digests: dict[str, str | None] = {}  # output -> content digest
        self.producers = pipeline.producers()
        self.results: dict[str, StepResult] = {}
        self.record: PipelineRecord | None = None

    def sources(self) -> None:
        for name, location in self.pipeline.sources.items():
            where = artifacts.resolve(location, self.pipeline.root)
            self.values[name] = where
            self.digests[name] = cache.digest(where)

    def blocked(self, step: Step) -> StepResult | None:
        """The result of a step that cannot run because of an upstream one."""
        for output in sorted(step.upstream()):
            owner = self.producers.get(output)
            if owner is None:
                continue
            upstream = self.results[owner]
            if upstream.state in ("failed", "not-run"):
                return StepResult(step.name, "not-run", reason=f"{owner} did not finish")
            if upstream.state == "skipped":
                return StepResult(step.name, "skipped", reason=f"{owner} was skipped")
        return None

    def run_step(self, step: Step) -> StepResult:
        started = time.time()
        t0 = time.perf_counter()
        params = self.params[step.name]
        files = {k: artifacts.resolve(v, self.pipeline.root) for k, v in step.files.items()}
        key = None
        temporary: dict[str, str] = {}
        opened: tuple[str | None, list[str]] = (None, [])  # the step's MLflow run, its runs
        try:
            result = self.blocked(step)
            if result is not None:
                return result
            inputs = {param: self.values[ref] for param, ref in step.inputs.items()}
            if step.when is not None:
                bound = {**{n: self.values[r] for n, r in step.when_inputs.items()}, **params}
                if not step.when(**_bind(step.when, bound)):
                    return StepResult(step.name, "skipped", time.perf_counter() - t0,
                                      reason="when= was false")
            code = (step.fn.code_hash() if isinstance(step.fn, NotebookStep)
                    else cache.code_hash(step.fn))
            key = cache.cache_key(code, params,
                                  {ref: self.digests.get(ref) for ref in step.upstream()}, files)
            if step.name not in self.forced:
                reused = self.reuse(step, key, files)
                if reused is not None:
                    reused.duration = time.perf_counter() - t0
                    return reused
            temporary = {k: artifacts.staging(v) for k, v in files.items()}
            assert self.record is not None
            here = context.StepContext(self.pipeline.name, step.name, self.record.run_id,
                                       self.record.open_step(step.name, started))
            try:
                with context.in_step(here):
                    returned = step.fn(**_bind(step.fn, {**inputs, **params, **temporary,
                                                         RESERVED[0]: self.cluster}))
            finally:
                opened = (here.step_run, self.record.started_in(here))
            outputs = self.collect(step, returned)
            for name, tmp in temporary.items():
                if not artifacts.written(tmp):
                    raise StepFailed(f"step {step.name!r} returned without writing its output"
                                     f" {name!r} to the path it was given ({tmp}).")
            for name, tmp in temporary.items():
                outputs[name] = {"value": files[name], "digest": artifacts.publish(
                    tmp, files[name], pipeline=self.pipeline.name, step=step.name)}
            temporary = {}
            self.take(outputs)
            return StepResult(step.name, "done", time.perf_counter() - t0,
                              {k: v["value"] for k, v in outputs.items()}, cache_key=key,
                              mlflow_run_id=opened[0], runs=opened[1])
        except Exception as e:  # noqa: BLE001 - the step's own error, kept in its result
            last = (str(e) if isinstance(e, NotebookFailed)  # a sentence of its own
                    else traceback.format_exception_only(type(e), e)[-1].strip())
            # A notebook's error is its cell's traceback, not the runner's frames.
            error = getattr(e, "details", None) or traceback.format_exc()
            return StepResult(step.name, "failed", time.perf_counter() - t0, reason=last,
                              error=error, cache_key=key, mlflow_run_id=opened[0],
                              runs=opened[1])
        finally:
            for tmp in temporary.values():  # failed or interrupted: nothing half-written stays
                with contextlib.suppress(OSError):
                    artifacts.discard(tmp)

    def reuse(self, step: Step, key: str, files: Mapping[str, str]) -> StepResult | None:
        """The cached result of ``step``, if an earlier run with ``key`` left its outputs
        there, complete and unchanged."""
        assert self.record is not None
        found = self.record.lookup(step.name, key)
        if found is None:
            return None
        outputs = found["outputs"]
        if set(outputs) != set(step.outputs):
            return None
        for name, out in outputs.items():
            if name in files:
                if artifacts.complete_digest(files[name]) != out.get("digest"):
                    return None
            elif cache.value_digest(out.get("value")) != out.get("digest"):
                return None  # the file a returned path names changed
        self.take(outputs)
        return StepResult(step.name, "cached", outputs={k: v["value"] for k, v in outputs.items()},
                          reason=f"from run {found['run_id'][:8]}", cache_key=key,
                          cached_from=found["run_id"])

    def collect(self, step: Step, returned: Any) -> dict[str, dict[str, Any]]:
        """The returned outputs, checked: declared, present and JSON."""
        if not step.returns:
            if returned is not None and not (isinstance(returned, Mapping) and not returned):
                raise StepFailed(f"step {step.name!r} returned {type(returned).__name__}, but"
                                 " declares no returned outputs; add outputs=[...] or return"
                                 " None.")
            return {}
        if len(step.returns) == 1 and not (isinstance(returned, Mapping)
                                           and set(returned) == set(step.returns)):
            returned = {step.returns[0]: returned}
        if not isinstance(returned, Mapping):
            raise StepFailed(f"step {step.name!r} returned {type(returned).__name__}; a step"
                             f" with outputs {step.returns} returns a dict of them.")
        missing = [n for n in step.returns if n not in returned]
        extra = sorted(set(returned) - set(step.returns))
        if missing or extra:
            raise StepFailed(f"step {step.name!r} returned {sorted(returned)}; its declared"
                             f" returned outputs are {step.returns}.")
        out = {}
        for name in step.returns:
            value = returned[name]
            try:
                value = json.loads(json.dumps(value))
            except (TypeError, ValueError):
                raise StepFailed(
                    f"step {step.name!r} returned output {name!r} as {type(value).__name__};"
                    " a returned output is a JSON value (a number, text, a path or a URL such"
                    " as models:/NAME/1): write files to a file output instead.") from None
            out[name] = {"value": value, "digest": cache.value_digest(value)}
        return out

    def take(self, outputs: Mapping[str, Mapping[str, Any]]) -> None:
        for name, out in outputs.items():
            self.values[name] = out["value"]
            self.digests[name] = out["digest"]


def run(pipeline: Pipeline, *, cluster: Any = None, force: bool | Sequence[str] = False,
        params: Mapping[str, Any] | None = None) -> PipelineResult:
    """Run ``pipeline`` now, in this process, and return each step's result.

    ``cluster``: handed to every step that takes a ``cluster`` parameter (for ``mlc.train``,
    ``mlc.score``, ...). ``force``: True reruns every step, a list of step names those steps
    (their dependants rerun only if the forced step's outputs changed). ``params``: overrides
    for this run, ``{"train.lr": 0.05}`` for one step's param or ``{"lr": 0.05}`` for every
    step's param of that name. A second run of the same pipeline while one runs is refused
    (:class:`PipelineBusy`). A failing step does not raise: see ``result.ok`` and
    ``result.raise_for_failure()``.
    """
    order = pipeline.order()  # bad graphs and bad options fail before anything runs
    forced = _forced(pipeline, force)
    step_params = _overrides(pipeline, params)
    runner = _Runner(pipeline, cluster, forced, step_params)
    t0 = time.perf_counter()
    with run_lock(pipeline):
        runner.record = record = PipelineRecord(pipeline.name, {
            f"{s}.{k}": v for s, values in step_params.items() for k, v in values.items()},
            graph=pipeline.dependencies())
        status = "KILLED"
        try:
            runner.sources()
            for step in order:
                started = time.time()
                result = runner.run_step(step)
                result.mlflow_run_id = record.step(
                    step.name, state=result.state, key=result.cache_key,
                    params=step_params[step.name], duration=result.duration,
                    started=started,
                    outputs={k: {"value": v, "digest": runner.digests.get(k)}
                             for k, v in result.outputs.items()},
                    error=result.error, cached_from=result.cached_from,
                    run_id=result.mlflow_run_id, runs=result.runs)
                runner.results[step.name] = result
            status = "FINISHED" if all(r.state not in ("failed", "not-run")
                                       for r in runner.results.values()) else "FAILED"
        finally:
            record.end(status, {n: r.state for n, r in runner.results.items()})
    return PipelineResult(pipeline.name, runner.results, time.perf_counter() - t0,
                          record.run_id)
