"""``mlc.tune``: Optuna's ask/tell loop in the kernel, each trial an ``mlc.train`` run.

One thread (the caller's) owns the study: it asks trials, starts their runs, and handles
what the runs send back through a queue (rank 0's reported points, the end of a run). The
runs' own threads only put on that queue, so the study is never touched from two threads
and a slow storage never holds up a run's event handling.
"""

from __future__ import annotations

import numbers
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..cluster import api as clusters
from ..cost import Budget, Cost, parse_budget
from ..train.launch import free_workers, function_kwargs, run_options, train
from ..train.run import Run, TrainingError
from . import storage as stored
from .options import check_count, check_direction, check_metric, make_pruner, make_sampler
from .payload import WithParams
from .record import StudyRecord, link_trial
from .space import check_space

if TYPE_CHECKING:
    import optuna

#: Options tune sets itself for every trial's run.
OWN_OPTIONS = ("workers", "cluster")
WAIT_S = 0.5  # how often the loop looks up from the queue (Ctrl-C, workers coming back)
WORKERS_WAIT_S = 60.0  # how long a study with no trial running waits for free workers
ERROR_CHARS = 4000  # how much of a failed trial's traceback its user attribute keeps
RECORD_WAIT_S = 120.0  # how long tune waits, at the end, for each trial's MLflow record
# How long a trial's reported point may wait on its worker while a pruner judges the points
# (ctx's default, 0.2 s, is most of what a trial pruned at its first report costs).
PRUNED_REPORT_INTERVAL_S = 0.01


@dataclass
class _Slot:
    """A trial in flight: its run, and what rank 0 reported so far."""

    trial: Any  # optuna.Trial
    run: Run
    last_value: float | None = None
    last_step: int = -1
    pruned_at: int | None = None  # the step at which the pruner stopped it
    errors: list[str] = field(default_factory=list)


def _check_train_options(fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Refuse what ``mlc.train`` would refuse, before the study or any run starts."""
    own = [k for k in OWN_OPTIONS if k in options]
    if own:
        raise ValueError(f"{own[0]!r} is set by tune for each trial; use workers_per_trial="
                         " and cluster= instead.")
    run_only = set(run_options())
    function_kwargs(fn, {k: v for k, v in options.items() if k not in run_only},
                    options.get("config"))


def _returned_value(result: Any) -> float | None:
    """A number the training code returned (it then wins over the last reported value)."""
    if isinstance(result, numbers.Real) and not isinstance(result, bool):
        return float(result)
    return None


class _Loop:
    """The ask/tell loop of one ``tune`` call."""

    def __init__(self, study: Any, fn: Callable[..., Any], space: dict[str, Any], *,
                 n_trials: int, metric: str, concurrency: int, workers_per_trial: int,
                 client: Any, cluster: Any, record: StudyRecord | None,
                 train_options: dict[str, Any], budget: Budget | None = None) -> None:
        self.study, self.fn, self.space = study, fn, space
        self.n_trials, self.metric = n_trials, metric
        self.concurrency, self.workers_per_trial = concurrency, workers_per_trial
        self.client, self.cluster = client, cluster
        self.record, self.train_options = record, train_options
        self.inbox: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        self.slots: dict[int, _Slot] = {}
        self.first_error: TrainingError | None = None
        self.failures = 0  # trials that failed in this call
        self.any_worked = False  # a trial of this call completed or was pruned
        self.ended_here = 0
        self.progress: Any = None
        self.recorders: list[Any] = []  # the trials' MLflow recorders, to wait for at the end
        self.budget = budget
        import optuna

        pruning = not isinstance(study.pruner, optuna.pruners.NopPruner)
        self.report_interval = PRUNED_REPORT_INTERVAL_S if pruning else None

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.n_trials, initial=min(self.n_trials, self._counted()),
                             desc=f"study {self.study.study_name}", unit="trial")
        # As inside study.optimize: a sampler that runs out of values (grid, brute force)
        # calls study.stop(), which then ends the study instead of raising.
        self.study._stop_flag = False
        self.study._thread_local.in_optimize_loop = True
        try:
            while True:
                self._fill()
                if not self.slots:
                    break
                try:
                    kind, number, items = self.inbox.get(timeout=WAIT_S)
                except queue.Empty:
                    continue
                if kind == "metrics":
                    self._feed(self.slots[number], items)
                else:
                    self._end(self.slots.pop(number))
        except BaseException:
            self._abandon()
            raise
        finally:
            self.study._thread_local.in_optimize_loop = False
            self.progress.close()

    def _counted(self) -> int:
        return stored.counted(self.study)

    def _fill(self) -> None:
        """Start trials until ``concurrency`` run or ``n_trials`` are counted or running."""
        while (len(self.slots) < self.concurrency and not self.study._stop_flag
               and self._counted() + len(self.slots) < self.n_trials):
            if not self._budget_covers_one_more():
                return
            if not self._have_workers():
                return
            self._start()

    def _have_workers(self) -> bool:
        """Whether a trial's workers are free; with no trial running, wait a while for them."""
        deadline = time.monotonic() + WORKERS_WAIT_S
        while True:
            free = len(free_workers(self.client)[0])
            if free >= self.workers_per_trial:
                return True
            if self.slots:  # one ending frees its workers: the loop comes back then
                return False
            if time.monotonic() > deadline:
                raise ValueError(
                    f"a trial needs {self.workers_per_trial} free worker(s) and the cluster has"
                    f" had {free} for {WORKERS_WAIT_S:g} s; scale it up (`%mlcloud scale N`)"
                    " and call tune again (with storage= it goes on where it stopped).")
            time.sleep(WAIT_S)

    def _options(self, trial: Any) -> dict[str, Any]:
        """The run options of ``trial``: with ``checkpoint_dir``, a folder of its own in it
        (``trial-N``); a trial asked again after a restart goes on from its stale trial's."""
        options = dict(self.train_options)
        root = options.get("checkpoint_dir")
        if root:
            inherited = trial.user_attrs.get(stored.CHECKPOINTS)
            folder = inherited or f"{str(root).rstrip('/')}/trial-{trial.number}"
            trial.set_user_attr(stored.CHECKPOINTS, folder)
            options["checkpoint_dir"] = folder
            options["resume"] = bool(inherited) or bool(options.get("resume"))
        return options

    def _start(self) -> None:
        trial = self.study.ask(self.space)
        params = dict(trial.params)
        try:
            run = train(WithParams(self.fn, params, self.report_interval),
                        cluster=self.cluster,
                        workers=self.workers_per_trial, **self._options(trial))
        except BaseException:
            stored.requeue(self.study, trial)  # its values are tried when the study goes on
            raise
        number = trial.number
        self.slots[number] = _Slot(trial, run)
        trial.set_user_attr("mlcloud.run_id", run.id)
        trial.set_user_attr("mlcloud.workers", list(run.workers))
        if self.record is not None:
            link_trial(run, self.record, self.study.study_name, number, params)
        # The run's threads only queue; this thread handles both in order.
        run.add_listener(lambda kind, items: self.inbox.put(("metrics", number, items))
                         if kind == "metrics" else None, replay=True)
        run.add_done_callback(lambda _: self.inbox.put(("done", number, None)))

    # ------------------------------------------------------------ cost and budget

    def _budget_covers_one_more(self) -> bool:
        """Whether the budget can pay for one more trial: what the study's ended trials and
        its running ones have used, plus the mean of an ended trial (none ended: yes)."""
        if self.budget is None:
            return True
        ended = [trial_cost(t) for t in self.study.get_trials(deepcopy=False)
                 if t.user_attrs.get(COST_ATTR)]
        spent = sum(ended, Cost())
        spent = sum((slot.run.cost for slot in self.slots.values()), spent)
        used = self.budget.spent(spent) or 0.0
        each = [self.budget.spent(c) or 0.0 for c in ended]
        mean = sum(each) / len(each) if each else 0.0
        return used + mean <= self.budget.amount and used < self.budget.amount

    def _note_cost(self, trial: Any, run: Run) -> None:
        """The trial's cost in its user attrs; the study's (the sum over its trials) in
        ``study.user_attrs["cost"]``."""
        trial.set_user_attr(COST_ATTR, run.cost.as_dict())
        self.study.set_user_attr("cost", study_cost(self.study).as_dict())

    # ------------------------------------------------------------ reports and pruning

    def _feed(self, slot: _Slot, items: list[dict[str, Any]]) -> None:
        """Rank 0's points of ``self.metric`` to ``trial.report``; cancel the run the moment
        the pruner says so."""
        for item in items:
            if slot.pruned_at is not None:
                return
            if item.get("rank") != 0 or self.metric not in item:
                continue
            step = int(item.get("step") or 0)
            if step <= slot.last_step:  # replayed after a recovery: reported already
                continue
            value = float(item[self.metric])
            slot.last_step, slot.last_value = step, value
            slot.trial.report(value, step)
            if slot.trial.should_prune():
                slot.pruned_at = step
                slot.run.cancel(wait=False)  # its workers are free once the ranks stopped

    # ------------------------------------------------------------ the end of a trial

    def _end(self, slot: _Slot) -> None:
        import optuna

        state = optuna.trial.TrialState
        run, trial = slot.run, slot.trial
        trial.set_user_attr("mlcloud.run_status", run.status)
        self._note_cost(trial, run)
        moves = sum(1 for event in run.events if event.get("planned"))
        if moves:
            trial.set_user_attr(stored.MOVES, moves)
        # Waits (10 s at most) only where the store is slower than the whole trial was.
        child = run.mlflow_run_id
        if run.tracking is not None:
            self.recorders.append(run.tracking.recorder)
        if child:
            trial.set_user_attr("mlcloud.mlflow_run_id", child)
        error: TrainingError | None = None
        value: float | None = None
        if slot.pruned_at is not None:
            trial.set_user_attr("mlcloud.pruned_at", slot.pruned_at)
            frozen = self.study.tell(trial, state=state.PRUNED)
        else:
            try:
                returned = _returned_value(run.result())
                value = returned if returned is not None else slot.last_value
            except TrainingError as e:
                error = e
            if value is None and error is None:
                error = TrainingError(
                    f"the trial reported no {self.metric!r} (ctx.report({self.metric}=...)) and"
                    " returned no number; tune needs one of the two.")
            if error is not None and run.preempted:
                # The cluster took its workers away: not the values' fault, nor the code's.
                # Recorded apart and asked again (it does not count towards n_trials).
                trial.set_user_attr("mlcloud.error", str(error)[-ERROR_CHARS:])
                trial.set_user_attr(stored.PREEMPTED, True)
                stored.requeue(self.study, trial)
                frozen = self.study.trials[trial.number]
                error = None
            elif error is not None:
                trial.set_user_attr("mlcloud.error", str(error)[-ERROR_CHARS:])
                frozen = self.study.tell(trial, state=state.FAIL)
            else:
                assert value is not None
                frozen = self.study.tell(trial, value)
        preempted = bool(frozen.user_attrs.get(stored.PREEMPTED))
        if not preempted:
            self.ended_here += 1
            self._note_failure(frozen, error)
        if self.record is not None:
            self.record.tag_trial(run, trial.number,
                                  "PREEMPTED" if preempted else frozen.state.name, frozen.value)
            self.record.trial_ended(self._counts(), self._best())
        self._show(frozen, preempted)

    def _note_failure(self, frozen: Any, error: TrainingError | None) -> None:
        """Stop the study once the first ``concurrency`` trials to end here all failed: the
        code is broken, not the values, and every other trial would fail the same way."""
        import optuna

        if frozen.state != optuna.trial.TrialState.FAIL:
            self.any_worked = True  # then failures are the values' doing
            return
        self.failures += 1
        if self.first_error is None:
            self.first_error = error
        if (not self.any_worked and self.failures >= self.concurrency
                and self.first_error is not None):
            raise self.first_error

    def _counts(self) -> dict[str, int]:
        import optuna

        state = optuna.trial.TrialState
        everyone = self.study.get_trials(deepcopy=False)
        trials = [t for t in everyone if not t.user_attrs.get(stored.REQUEUED)]
        counts = {name.lower(): sum(1 for t in trials if t.state == s)
                  for name, s in (("COMPLETE", state.COMPLETE), ("PRUNED", state.PRUNED),
                                  ("FAIL", state.FAIL))}
        counts["preempted"] = sum(1 for t in everyone if t.user_attrs.get(stored.PREEMPTED))
        return counts

    def _best(self) -> Any:
        try:
            return self.study.best_trial
        except ValueError:  # no trial completed yet
            return None

    def _show(self, frozen: Any, preempted: bool = False) -> None:
        counts = self._counts()
        best = self._best()
        self.progress.set_postfix(
            last=f"#{frozen.number} {'preempted' if preempted else frozen.state.name.lower()}",
            best=f"{best.value:.4g} (#{best.number})" if best is not None else "-",
            pruned=counts["pruned"], failed=counts["fail"], refresh=False,
            **({"preempted": counts["preempted"]} if counts["preempted"] else {}))
        if not preempted:  # asked again: it counts when its retry ends
            self.progress.update(1)

    def _abandon(self) -> None:
        """Ctrl-C or an error: stop every running trial and queue its values again, so a
        study with ``storage=`` goes on with them when tune is called again."""
        for slot in list(self.slots.values()):
            slot.run.cancel(wait=False)
        for number, slot in list(self.slots.items()):
            slot.run.wait(timeout=60)
            try:
                stored.requeue(self.study, slot.trial)
            except Exception:  # noqa: BLE001 - the original error is what matters
                pass
            self.slots.pop(number)


def tune(
    fn: Callable[..., Any],
    *,
    space: Mapping[str, Any] | str,
    n_trials: int = 20,
    metric: str = "loss",
    direction: str = "minimize",
    pruner: Any = None,
    sampler: Any = None,
    workers_per_trial: int = 1,
    concurrency: int | None = None,
    cluster: Any = None,
    storage: Any = None,
    study_name: str | None = None,
    budget: float | str | None = None,
    **train_options: Any,
) -> optuna.Study:
    """Tune ``fn``'s hyperparameters on the cluster; return the ``optuna.Study``.

    Each trial is an ``mlc.train`` run of ``fn(ctx)`` on ``workers_per_trial`` workers, with
    the trial's values in ``ctx.params`` (a dict). Every ``ctx.report(...)`` of rank 0 that
    holds ``metric`` becomes ``trial.report(value, step)``; once the ``pruner`` says so, the
    run is cancelled on its workers at once and the trial told PRUNED, and the workers take
    the next trial. A trial's value is the number ``fn`` returns, if it returns one, else the
    last ``metric`` it reported; a trial with neither, or whose run failed, is FAIL (its
    traceback in ``trial.user_attrs["mlcloud.error"]``). If the first ``concurrency`` trials
    to end all fail, tune raises the first one's error instead of trying the rest.

    ``space``: name -> ``optuna.distributions`` object, or the text form
    ``"lr=log(1e-4,1), width=int(16,256), act=choice(relu,tanh), p=uniform(0,0.5)"``.
    ``direction``: minimize or maximize. ``pruner`` and ``sampler``: Optuna objects, or names
    (``successive-halving``, ``hyperband``, ``median``, ``none``; ``tpe``, ``random``, ...,
    ``NAME:SEED``); None means Optuna's defaults (median pruner, TPE sampler).
    ``concurrency``: trials at a time (default: the free workers // ``workers_per_trial``).
    ``cluster``: as for ``mlc.train``. Every other keyword is an ``mlc.train`` option
    (``strategy``, ``max_failures``, ``epochs``, ``config``, ``track`` ...), the same for every
    trial: a trial on several workers is an ordinary distributed run, and a lost worker is
    survived as a run survives it (``max_failures``). With ``checkpoint_dir``, each trial
    writes its checkpoints to a folder of its own there (``trial-N``); a trial asked again
    after a restart (see ``storage``) goes on from its stale trial's newest checkpoint.

    ``storage`` (``sqlite:///study.db``, any database URL, or a journal file path) with
    ``study_name`` keeps the study on disk: calling tune again, after a kernel restart say,
    goes on with it, and trials an earlier kernel left running are asked again with the same
    values (the stale ones are marked FAIL and ``mlcloud.requeued``). ``n_trials`` counts the
    study's ended trials, those of earlier calls too, but not the requeued ones: a resumed
    study runs what is left of ``n_trials``.

    With tracking on (``track=True``, the default) the study is an MLflow run (its id in
    ``study.user_attrs["mlcloud.mlflow_run_id"]``) and each trial's run is its child
    (tag ``mlflow.parentRunId``; its id in ``trial.user_attrs["mlcloud.mlflow_run_id"]``)
    with the trial's values as params and, where ``fn`` returns a model, that model: when
    tune returns, every trial's record is complete, so ``mlc.register(f"runs:/{id}/model",
    ...)`` works at once.

    Cost: each trial's worker-seconds, GPU-seconds and cost (see :mod:`jupyter_mlcloud.cost`)
    are in ``trial.user_attrs["mlcloud.cost"]``, their sum over the study's trials in
    ``study.user_attrs["cost"]``. ``budget`` (a cost, or worker time as ``"2h"``, ``"30m"``,
    ``"90s"``) bounds the study: no new trial starts once what its trials used, plus the mean
    of an ended trial, would exceed it (trials already running end as they would).
    """
    if not callable(fn):
        raise ValueError(f"tune needs a function taking ctx, got {type(fn).__name__}.")
    distributions = check_space(space)
    check_count("n_trials", n_trials)
    check_count("workers_per_trial", workers_per_trial)
    check_count("concurrency", concurrency, allow_none=True)
    metric, direction = check_metric(metric), check_direction(direction)
    if study_name is not None and (not isinstance(study_name, str) or not study_name):
        raise ValueError(f"study_name must be non-empty text, got {study_name!r}.")
    if storage is not None and study_name is None:
        raise ValueError("storage= needs study_name= too: the name finds the study again after"
                         " a kernel restart.")
    _check_train_options(fn, train_options)
    limit = parse_budget(budget)
    pruner, sampler = make_pruner(pruner), make_sampler(sampler)
    client, _ = clusters.resolve(cluster)
    if concurrency is None:
        concurrency = max(1, len(free_workers(client)[0]) // workers_per_trial)

    study = stored.open_study(storage, study_name, direction, sampler, pruner)
    stored.requeue_stale(study)
    record = None
    if train_options.get("track", True):
        record = StudyRecord(study, {
            "n_trials": n_trials, "metric": metric, "direction": direction,
            "pruner": type(study.pruner).__name__, "sampler": type(study.sampler).__name__,
            "workers_per_trial": workers_per_trial, "concurrency": concurrency,
            "space": {k: repr(v) for k, v in distributions.items()},
            **{k: v for k, v in train_options.items() if k != "config"}})
    loop = _Loop(study, fn, distributions, n_trials=n_trials, metric=metric,
                 concurrency=concurrency, workers_per_trial=workers_per_trial, client=client,
                 cluster=cluster, record=record, train_options=train_options, budget=limit)
    try:
        loop.run()
    except KeyboardInterrupt:
        if record is not None:
            record.end("KILLED")
        raise
    except BaseException:
        if record is not None:
            record.end("FAILED")
        raise
    if record is not None:
        record.end("FINISHED")
    # Each trial's record (metrics, then its model) is written by its own thread: once tune
    # returns, all of them are complete, so a trial's model can be registered at once.
    for recorder in loop.recorders:
        recorder.wait(RECORD_WAIT_S)
    return study


COST_ATTR = "mlcloud.cost"  # a trial's cost, as Cost.as_dict()


def trial_cost(trial: Any) -> Cost:
    """What a trial's run used (zero if it has not ended)."""
    figures = trial.user_attrs.get(COST_ATTR) or {}
    return Cost(float(figures.get("worker_seconds", 0.0)), float(figures.get("gpu_seconds", 0.0)),
                figures.get("cost"))


def study_cost(study: Any) -> Cost:
    """The sum over the study's ended trials."""
    total = Cost()
    for trial in study.get_trials(deepcopy=False):
        total = total + trial_cost(trial)
    return total


def describe(study: Any) -> str:
    """One line on a study: its trials by state and its best trial."""
    import optuna

    state = optuna.trial.TrialState
    trials = [t for t in study.get_trials(deepcopy=False)
              if not t.user_attrs.get(stored.REQUEUED)]
    counts = {s: sum(1 for t in trials if t.state == s)
              for s in (state.COMPLETE, state.PRUNED, state.FAIL)}
    preempted = sum(1 for t in study.get_trials(deepcopy=False)
                    if t.user_attrs.get(stored.PREEMPTED))
    text = (f"Study {study.study_name}: {len(trials)} trial(s), {counts[state.COMPLETE]}"
            f" complete, {counts[state.PRUNED]} pruned, {counts[state.FAIL]} failed"
            + (f" ({preempted} preempted and asked again)" if preempted else ""))
    try:
        best = study.best_trial
    except ValueError:
        return text + "; none completed."
    return f"{text}; best value {best.value:.6g} with {best.params} (trial {best.number})."
