"""Where a study lives: in memory, or in an SQLite/RDB URL or a journal file so that it
resumes after a kernel restart, with the trials that were running asked again."""

from __future__ import annotations

import os
from typing import Any

#: Trial user attributes this package sets.
REQUEUED = "mlcloud.requeued"  # a trial left running by an earlier kernel: asked again
RETRY_OF = "mlcloud.retry_of"  # on the trial that asks it again: the stale trial's number
CHECKPOINTS = "mlcloud.checkpoint_dir"  # a trial's own checkpoint folder, kept by its retry
PREEMPTED = "mlcloud.preempted"  # its workers retired and none replaced them: asked again
MOVES = "mlcloud.preemptions"  # how many times its workers retired and it moved on


def _storage(storage: Any) -> Any:
    """What ``optuna.create_study`` takes: a URL as is, a path as a journal file."""
    import optuna

    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if isinstance(storage, (str, os.PathLike)):
        text = os.fspath(storage)
        if "://" in text:  # sqlite:///study.db, postgresql://...
            return text
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(text))
    raise ValueError(f"storage must be a database URL (sqlite:///study.db), a journal file path"
                     f" or an optuna storage, got {storage!r}.")


def open_study(storage: Any, study_name: str | None, direction: str, sampler: Any,
               pruner: Any) -> Any:
    """A new study, or the stored one named ``study_name`` (its direction must match)."""
    import optuna

    if storage is not None and not study_name:
        raise ValueError("storage= needs study_name= too: the name finds the study again after"
                         " a kernel restart.")
    study = optuna.create_study(storage=_storage(storage), study_name=study_name,
                                direction=direction,  # type: ignore[arg-type]  # checked
                                sampler=sampler, pruner=pruner,
                                load_if_exists=storage is not None)
    if study.direction.name.lower() != direction:
        raise ValueError(f"study {study_name!r} in {storage!r} was created to"
                         f" {study.direction.name.lower()}, not to {direction}; use its"
                         " direction or another study_name.")
    return study


def requeue(study: Any, trial: Any) -> None:
    """Ask ``trial`` (running, but its run is gone) again: its values are queued for the next
    ``ask``, then it is marked failed and :data:`REQUEUED`, so it does not count."""
    import optuna

    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    # Queued first: an interruption between the two steps then repeats nothing.
    if not any(t.user_attrs.get(RETRY_OF) == trial.number for t in waiting):
        inherited = {CHECKPOINTS: trial.user_attrs[CHECKPOINTS]} \
            if CHECKPOINTS in trial.user_attrs else {}
        study.enqueue_trial(dict(trial.params),
                            user_attrs={RETRY_OF: trial.number, **inherited})
    study._storage.set_trial_user_attr(trial._trial_id, REQUEUED, True)
    study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def requeue_stale(study: Any) -> list[int]:
    """Requeue every trial an earlier kernel left running; the numbers requeued.

    A study is tuned by one kernel at a time: a trial still marked running when ``tune``
    starts belongs to a kernel that is gone.
    """
    import optuna

    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        requeue(study, trial)
    return [t.number for t in stale]


def counted(study: Any) -> int:
    """Trials that count towards ``n_trials``: ended, and not requeued."""
    import optuna

    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
             optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=ended)
               if not t.user_attrs.get(REQUEUED))
