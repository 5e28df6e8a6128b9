"""mlc.tune and %%tune on a real LocalCluster, with real Optuna and a real MLflow store.

Trials are tiny (a few reports of a closed-form loss) so the whole module stays short; the
pruned trial runs until it is cancelled, so only a cancel can end it in time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from optuna.storages.journal import JournalFileBackend

import jupyter_mlcloud as mlc
from jupyter_mlcloud.train import TrainingError
from jupyter_mlcloud.tuning.storage import CHECKPOINTS, REQUEUED, RETRY_OF
from jupyter_mlcloud.tuning.study import PRUNED_REPORT_INTERVAL_S, describe
from tests.conftest import wait_for

CLUSTER = {"name": "tuning", "workers": 2}
State = optuna.trial.TrialState
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def quadratic(ctx: Any) -> None:
    """Three reports of a loss that is least at x = 1 (the last is (x - 1)^2 + 1/3)."""
    for step in range(1, 4):
        ctx.report(loss=(ctx.params["x"] - 1) ** 2 + 1 / step)


def hopeless_or_quick(ctx: Any) -> str:
    """x > 1 reports a loss over the pruner's threshold and goes on for about 1,000 s unless
    it is cancelled; other values finish after three reports."""
    import time

    steps = 100_000 if ctx.params["x"] > 1 else 3
    for _ in range(steps):
        ctx.report(loss=ctx.params["x"])
        time.sleep(0.01)
    return "done"


def sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


def test_best_params_of_a_toy_problem_with_each_trial_a_child_run(
        cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = sqlite(tmp_path / "mlruns.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    study = mlc.tune(quadratic, space="x=int(-2,2)", n_trials=5, cluster=cluster,
                     sampler=optuna.samplers.BruteForceSampler(seed=0),
                     checkpoint_dir=str(tmp_path / "ckpt"))

    assert isinstance(study, optuna.Study)
    assert study.best_params == {"x": 1}
    assert [t.state for t in study.trials] == [State.COMPLETE] * 5
    for trial in study.trials:  # the value is the last reported loss
        assert trial.value == pytest.approx((trial.params["x"] - 1) ** 2 + 1 / 3)
        assert trial.intermediate_values == {
            s: pytest.approx((trial.params["x"] - 1) ** 2 + 1 / s) for s in (1, 2, 3)}
        assert trial.user_attrs["mlcloud.run_status"] == "finished"
        # A folder of its own: trials never find each other's checkpoints.
        assert trial.user_attrs[CHECKPOINTS] == str(tmp_path / "ckpt" / f"trial-{trial.number}")

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent_id = study.user_attrs["mlcloud.mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlcloud.kind"] == "study"
    assert parent.data.metrics["best_value"] == pytest.approx(1 / 3)

    def children() -> list[Any]:
        found = client.search_runs([parent.info.experiment_id],
                                   f"tags.mlflow.parentRunId = '{parent_id}'")
        ended = [r for r in found if r.info.status == "FINISHED" and "x" in r.data.params]
        return ended if len(ended) == 5 else []

    runs = wait_for(children, 60, "five finished child runs with their params")
    assert sorted(int(r.data.params["x"]) for r in runs) == [-2, -1, 0, 1, 2]  # type: ignore
    by_trial = {int(r.data.tags["mlcloud.trial"]): r for r in runs}  # type: ignore
    for trial in study.trials:
        child = by_trial[trial.number]
        assert child.info.run_id == trial.user_attrs["mlcloud.mlflow_run_id"]
        assert child.data.tags["mlcloud.trial_state"] == "COMPLETE"
        assert child.data.metrics["loss"] == pytest.approx(trial.value)

    # The sidebar's listing reads back what tune wrote.
    from jupyter_mlcloud.tuning import record

    [listed] = record.studies()
    assert (listed["mlflow_run_id"], listed["state"]) == (parent_id, "finished")
    assert listed["counts"] == {"complete": 5, "pruned": 0, "failed": 0, "preempted": 0,
                                "running": 0}
    assert listed["best_value"] == pytest.approx(1 / 3)
    trials = record.study(parent_id)["trials"]
    assert [(t["number"], t["params"], t["state"]) for t in trials] == [
        (t.number, {"x": str(t.params["x"])}, "complete") for t in study.trials]
    assert [t["value"] for t in trials] == [pytest.approx(t.value) for t in study.trials]


def test_a_pruned_trial_is_cancelled_and_its_worker_takes_the_next(cluster: Any,
                                                                    tmp_path: Path) -> None:
    storage = sqlite(tmp_path / "study.db")
    # The order of the two values is fixed by queueing them in the stored study first.
    ahead = optuna.create_study(storage=storage, study_name="prune")
    ahead.enqueue_trial({"x": 5.0})
    ahead.enqueue_trial({"x": 0.5})

    study = mlc.tune(hopeless_or_quick, space="x=uniform(0,10)", n_trials=2, concurrency=1,
                     pruner=optuna.pruners.ThresholdPruner(upper=1.0), cluster=cluster,
                     storage=storage, study_name="prune", track=False)

    pruned, complete = study.trials
    assert (pruned.params, pruned.state) == ({"x": 5.0}, State.PRUNED)
    assert pruned.user_attrs["mlcloud.run_status"] == "cancelled"
    assert pruned.user_attrs["mlcloud.pruned_at"] == 1  # stopped at its first report
    assert pruned.intermediate_values == {1: 5.0}
    assert (complete.params, complete.state, complete.value) == ({"x": 0.5}, State.COMPLETE,
                                                                 0.5)
    assert complete.user_attrs["mlcloud.run_status"] == "finished"
    assert complete.user_attrs["mlcloud.workers"] == pruned.user_attrs["mlcloud.workers"]


def report_interval(ctx: Any) -> float:
    ctx.report(loss=1.0)
    return float(ctx.report_interval)


def test_a_pruner_has_each_trial_send_its_points_at_once(cluster: Any) -> None:
    """While a pruner judges the points, a trial's points wait 10 ms at most on its worker
    (not the 0.2 s of a run), so a hopeless trial is stopped sooner."""
    judged = mlc.tune(report_interval, space="x=uniform(0,1)", n_trials=1, cluster=cluster,
                      pruner=optuna.pruners.ThresholdPruner(upper=10.0), track=False)
    assert judged.trials[0].value == PRUNED_REPORT_INTERVAL_S == 0.01
    unjudged = mlc.tune(report_interval, space="x=uniform(0,1)", n_trials=1, cluster=cluster,
                        pruner=optuna.pruners.NopPruner(), track=False)
    assert unjudged.trials[0].value == 0.2


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_resumed_study_asks_again_the_trial_left_running(cluster: Any, tmp_path: Path,
                                                           kind: str) -> None:
    storage = sqlite(tmp_path / "study.db") if kind == "sqlite" else str(tmp_path / "study.log")
    # What a kernel that died mid-study leaves: one trial told, one still running.
    before = optuna.create_study(storage=storage if kind == "sqlite" else
                                 optuna.storages.JournalStorage(JournalFileBackend(storage)),
                                 study_name="resume")
    before.enqueue_trial({"x": 0})
    before.enqueue_trial({"x": 2})
    space = {"x": optuna.distributions.IntDistribution(-2, 2)}
    before.tell(before.ask(space), 1.333)
    left = before.ask(space)
    assert left.params == {"x": 2}
    # Its checkpoints went to its own folder, as tune sets up with checkpoint_dir.
    folder = str(tmp_path / "ckpt" / f"trial-{left.number}")
    left.set_user_attr(CHECKPOINTS, folder)
    del before

    study = mlc.tune(quadratic, space=space, n_trials=2, cluster=cluster, storage=storage,
                     study_name="resume", track=False, checkpoint_dir=str(tmp_path / "ckpt"))

    old, stale, again = study.trials
    assert old.state == State.COMPLETE
    assert (stale.state, stale.user_attrs[REQUEUED]) == (State.FAIL, True)
    assert (again.params, again.state) == ({"x": 2}, State.COMPLETE)
    assert again.user_attrs[RETRY_OF] == stale.number
    assert again.value == pytest.approx(1 + 1 / 3)
    assert again.user_attrs[CHECKPOINTS] == folder  # it goes on from the stale trial's folder
    # n_trials counts the study's ended trials (the requeued one aside): nothing more ran.
    assert len(study.trials) == 3


def test_a_trial_on_two_workers_is_a_distributed_run(cluster: Any) -> None:
    def world(ctx: Any) -> float:
        import torch
        import torch.distributed as dist

        total = torch.tensor([float(ctx.params["x"])])
        dist.all_reduce(total)  # a collective across the trial's two ranks
        return float(total.item())

    study = mlc.tune(world, space="x=choice(1,2)", n_trials=2, workers_per_trial=2,
                     sampler="brute-force:0", direction="maximize", cluster=cluster,
                     track=False)
    # Both workers per trial: one trial at a time, each on the whole cluster.
    assert sorted(t.value for t in study.trials) == [2.0, 4.0]  # the returned number
    assert all(len(t.user_attrs["mlcloud.workers"]) == 2 for t in study.trials)


def test_the_first_trials_all_failing_stop_the_study_with_their_error(cluster: Any) -> None:
    def broken(ctx: Any) -> None:
        raise RuntimeError("no data here")

    with pytest.raises(TrainingError, match="no data here"):
        mlc.tune(broken, space="x=int(0,3)", n_trials=4, concurrency=1, cluster=cluster,
                 track=False)


def test_tune_cell_magic(cluster: Any, shell: InteractiveShell,
                         capsys: pytest.CaptureFixture) -> None:
    shell.user_ns["offset"] = 1  # a notebook name the cell reads: shipped with each trial
    shell.run_cell_magic(
        "tune", f"--space 'x=choice(-1,1)' --n-trials 2 --sampler brute-force:0"
                f" --cluster {cluster.name} --no-track --out found",
        "for step in range(2):\n"
        "    ctx.report(loss=(params['x'] - offset) ** 2 + ctx.params['x'] * 0)\n")
    study = shell.user_ns["found"]
    assert study.best_params == {"x": 1}
    assert [t.state for t in study.trials] == [State.COMPLETE] * 2
    assert "2 trial(s), 2 complete, 0 pruned, 0 failed; best value 0 with {'x': 1}" \
        in capsys.readouterr().out


@pytest.mark.parametrize(("line", "named"), [
    ("--space 'x=normal(0,1)' --cluster tuning", "'normal' is not a kind of distribution"),
    ("--n-trials 2 --cluster tuning", "the following arguments are required: --space"),
    ("--space 'x=int(0,1)' --workers 2", "unrecognized arguments: --workers"),
])
def test_tune_cell_magic_refuses_bad_lines_in_one_sentence(shell: InteractiveShell, line: str,
                                                           named: str) -> None:
    with pytest.raises(UsageError) as caught:
        shell.run_cell_magic("tune", line, "ctx.report(loss=1.0)\n")
    assert named in str(caught.value)


def test_a_trial_whose_workers_retire_is_recorded_as_preempted_and_asked_again(
        cluster: Any, tmp_path: Path) -> None:
    import threading

    import dask

    from jupyter_mlcloud.cluster import info as cluster_info
    from jupyter_mlcloud.tuning.storage import PREEMPTED

    started, release = tmp_path / "started", tmp_path / "release"
    journal = str(tmp_path / "study.log")

    def held(ctx: Any) -> float:
        """Reports until the test releases it (bounded), then returns its value."""
        import os
        import time

        if ctx.rank == 0:
            open(started, "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            ctx.report(loss=ctx.params["x"])
            time.sleep(0.02)
        return float(ctx.params["x"])

    def preempt_then_replace() -> None:
        wait_for(started.exists, 120, "the trial to start")
        client = cluster.client
        client.retire_workers([sorted(cluster_info.workers(client))[1]], close_workers=True)

        def preempted() -> bool:
            study = optuna.load_study(study_name="preempt",
                                      storage=optuna.storages.JournalStorage(
                                          JournalFileBackend(journal)))
            return any(t.user_attrs.get(PREEMPTED) for t in study.trials)

        wait_for(preempted, 120, "the trial to be recorded as preempted")
        release.touch()
        cluster.scale(2)  # a replacement: the trial is asked again on two workers

    helper = threading.Thread(target=preempt_then_replace, daemon=True)
    helper.start()
    with dask.config.set({"mlcloud.train.replace-timeout": 2}):
        study = mlc.tune(held, space="x=choice(3)", n_trials=1, workers_per_trial=2,
                         cluster=cluster, storage=journal, study_name="preempt", track=False)
    helper.join(timeout=120)
    first, retry = study.trials
    assert first.user_attrs[PREEMPTED] and first.user_attrs[REQUEUED]
    assert "retired and only 1 free worker(s) were there 2 s later" in \
        first.user_attrs["mlcloud.error"]
    assert retry.state == State.COMPLETE and retry.value == 3.0
    assert retry.user_attrs[RETRY_OF] == first.number and retry.params == first.params
    assert describe(study).startswith(
        "Study preempt: 1 trial(s), 1 complete, 0 pruned, 0 failed (1 preempted and asked again)")
