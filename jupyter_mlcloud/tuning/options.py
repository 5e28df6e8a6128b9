"""Pruners and samplers by name (the ``%%tune`` options), and the checks of tune's options."""

from __future__ import annotations

from typing import Any

DIRECTIONS = ("minimize", "maximize")
#: ``--pruner`` names -> the Optuna pruner each makes (with Optuna's defaults).
PRUNERS = {
    "successive-halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "median": "MedianPruner",
    "none": "NopPruner",
}
#: ``--sampler`` names -> the Optuna sampler each makes; ``NAME:SEED`` seeds it.
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler",
            "brute-force": "BruteForceSampler", "gp": "GPSampler", "cmaes": "CmaEsSampler"}


def make_pruner(pruner: Any) -> Any:
    """An Optuna pruner: one given as is, or made from its name in :data:`PRUNERS`; None is
    Optuna's default (the median pruner)."""
    import optuna

    if pruner is None or isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if isinstance(pruner, str) and pruner in PRUNERS:
        return getattr(optuna.pruners, PRUNERS[pruner])()
    raise ValueError(f"pruner {pruner!r} is neither an optuna pruner nor one of"
                     f" {', '.join(PRUNERS)}.")


def make_sampler(sampler: Any) -> Any:
    """An Optuna sampler: one given as is, or made from ``NAME`` or ``NAME:SEED`` (names in
    :data:`SAMPLERS`); None is Optuna's default (TPE)."""
    import optuna

    if sampler is None or isinstance(sampler, optuna.samplers.BaseSampler):
        return sampler
    if isinstance(sampler, str):
        name, _, seed = sampler.partition(":")
        if name in SAMPLERS and (not seed or seed.isdigit()):
            cls = getattr(optuna.samplers, SAMPLERS[name])
            return cls(seed=int(seed)) if seed else cls()
    raise ValueError(f"sampler {sampler!r} is neither an optuna sampler nor NAME or NAME:SEED"
                     f" with NAME one of {', '.join(SAMPLERS)}.")


def check_count(name: str, value: Any, allow_none: bool = False) -> None:
    """A whole number >= 1 (or None where allowed), else one sentence naming it."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")


def check_direction(direction: Any) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not allowed; use minimize or maximize.")
    return str(direction)


def check_metric(metric: Any) -> str:
    if not isinstance(metric, str) or not metric.isidentifier():
        raise ValueError(f"metric must be the name of a value the code reports with"
                         f" ctx.report (e.g. 'loss'), got {metric!r}.")
    return metric
