"""Tuning with ``mlc.tune`` on 2 CPU workers, against its own ideal and Ray Tune.

    python benchmarks/bench_tune.py [--only a,b,c] [--repeats N] [--quick]

a. scheduling overhead: 40 one-second trials (10 reports, 0.1 s apart) on 2 workers, no
   pruning, vs the ideal 20 s. Target <= 5 %. Ray Tune runs the same trials on the same 2
   cores, with its defaults and with ``reuse_actors=True``.
b. successive halving vs no pruning on the digits MLP (the same TPE sampler and seed on both
   sides, trials of up to 27 epochs, the validation loss reported each epoch): the
   worker-seconds each study spends until a trial ends within 1 % of the unpruned study's
   best validation loss (of 40 trials), pruned / unpruned. Target <= 1/3. The pruned study
   may draw up to 3x the trials, as a search with a budget would: a study that stops most
   trials early is there to try more configurations in the same time. Each repeat uses its
   own seed (0, 1, 2, ...): with one seed the comparison rests on where in the sequence the
   best configuration happens to come (seed 0 draws it first, which no pruner can beat).
c. the pruned study of b: its wall time vs its own ideal (the trial-seconds it actually ran /
   2 workers), target <= 1.3x; and vs Ray Tune's ASHA on the same task (same trial count,
   same 2 cores, default and ``reuse_actors=True``, the best of the two), target <= 0.5x at an
   equal best loss (within 1 %). Ray Tune asks the same sampler (Optuna's TPE, seed 0)
   through its ``OptunaSearch``, so that both searches draw from one sequence.

Studies run untracked (``track=False``), as Ray Tune records nothing in MLflow either, on
workers warmed by a first small study (torch imported there, as after any earlier run). Each
item repeats ``--repeats`` times (default 3), the systems taking turns within a repeat;
tables show the median and the range (min-max) of the repeats. Ray needs the ``bench``
extra; without it, its columns say n/a. Timings are of this machine with whatever else runs
on it: read the ratios and the spreads.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

WORKERS = 2
TRIALS = 40
EPOCHS = 27  # successive halving rungs at 1, 3, 9, 27 epochs (reduction factor 3)
SPACE_TEXT = "lr=log(1e-3,1), width=int(16,128)"


# ---------------------------------------------------------------- the tasks


def one_second(ctx: Any) -> None:
    """a: ten reports 0.1 s apart."""
    import time

    for step in range(10):
        time.sleep(0.1)
        ctx.report(loss=float(step))


def digits_data() -> tuple[Any, ...]:
    """The digits set, scaled, split 80/20 with a fixed seed (the same for every system)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])
    cut = int(0.8 * len(x))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def digits_epochs(lr: float, width: int, report: Callable[[float], None]) -> float:
    """Train the digits MLP for ``EPOCHS`` epochs, reporting the validation loss after each;
    the last one is returned."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    xt, yt, xv, yv = digits_data()
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, width), torch.nn.ReLU(),
                                torch.nn.Linear(width, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    val = float("nan")
    for _ in range(EPOCHS):
        for i in range(0, len(xt), 16):
            loss = loss_fn(model(xt[i:i + 16]), yt[i:i + 16])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val = float(loss_fn(model(xv), yv))
        if val != val:  # diverged: report it as very bad rather than NaN
            val = 1e3
        report(val)
    return val


def digits_trial(ctx: Any) -> float:
    return digits_epochs(ctx.params["lr"], ctx.params["width"],
                         lambda v: ctx.report(loss=v))


# ---------------------------------------------------------------- mlc.tune


def run_tune(cluster: Any, fn: Callable[..., Any], space: str, pruner: Any,
             sampler: Any, n_trials: int | None = None) -> tuple[float, Any]:
    import jupyter_mlcloud as mlc

    start = time.perf_counter()
    study = mlc.tune(fn, space=space, n_trials=n_trials or TRIALS, metric="loss", pruner=pruner,
                     sampler=sampler, cluster=cluster, track=False)
    return time.perf_counter() - start, study


def trial_seconds(trial: Any) -> float:
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def seconds_to_reach(study: Any, target: float) -> tuple[float, int] | None:
    """Worker-seconds spent, and trials ended, (in the order they ended) until one ended
    <= target."""
    import optuna

    spent = 0.0
    ended = sorted((t for t in study.trials if t.datetime_complete is not None),
                   key=lambda t: t.datetime_complete)
    for count, trial in enumerate(ended, 1):
        spent += trial_seconds(trial)
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value <= target:
            return spent, count
    return None


# ---------------------------------------------------------------- Ray Tune


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    # The trainables come from this script: Ray's workers import it from its folder.
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, runtime_env={"env_vars": {"PYTHONPATH": here}})
    try:
        yield
    finally:
        ray.shutdown()


def ray_one_second(config: dict[str, Any]) -> None:
    from ray import tune

    for step in range(10):
        time.sleep(0.1)
        tune.report({"loss": float(step)})


def ray_digits(config: dict[str, Any]) -> None:
    from ray import tune

    digits_epochs(config["lr"], int(config["width"]), lambda v: tune.report({"loss": v}))


def run_ray(trainable: Callable[..., Any], space: dict[str, Any], reuse: bool,
            asha: bool, sampler: Any = None) -> tuple[float, float, int]:
    """(wall, best loss, trials stopped early) of one Ray Tune run of ``TRIALS`` trials;
    with an Optuna ``sampler``, ``space`` holds Optuna distributions and Ray Tune asks the
    sampler through its ``OptunaSearch``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = (ASHAScheduler(max_t=EPOCHS, grace_period=1, reduction_factor=3) if asha
                 else FIFOScheduler())
    search = None
    if sampler is not None:  # Optuna's sampler inside Ray Tune: the same one as mlc.tune's
        from ray.tune.search.optuna import OptunaSearch

        search, space = OptunaSearch(space=space, sampler=sampler, metric="loss",
                                     mode="min"), {}
    with tempfile.TemporaryDirectory(prefix="bench-tune-ray-") as folder:
        start = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}), param_space=space,
            tune_config=tune.TuneConfig(metric="loss", mode="min", num_samples=TRIALS,
                                        scheduler=scheduler, reuse_actors=reuse,
                                        search_alg=search),
            run_config=tune.RunConfig(storage_path=folder, verbose=0))
        results = tuner.fit()
        wall = time.perf_counter() - start
        if results.errors:
            raise RuntimeError(f"Ray Tune trials failed: {results.errors[0]}")
        frame = results.get_dataframe()  # read from the trials' folders
    stopped = int((frame["training_iteration"] < EPOCHS).sum()) if asha else 0
    return wall, float(frame["loss"].min()), stopped


def ray_available() -> str | None:
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


# ---------------------------------------------------------------- tables


def figure(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–"
            f"{fmt.format(max(values))})")


def table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    print(f"\n### {title}\n")
    print("| what | measured: median (min–max) | target | met |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "no")


# ---------------------------------------------------------------- items


def item_a(cluster: Any, repeats: int, ray_problem: str | None) -> None:
    import optuna

    ours: list[float] = []
    ray_default: list[float] = []
    ray_reuse: list[float] = []
    ideal = TRIALS * 1.0 / WORKERS
    for _ in range(repeats):
        wall, _study = run_tune(cluster, one_second, "x=uniform(0,1)",
                                optuna.pruners.NopPruner(), optuna.samplers.RandomSampler(0))
        ours.append(wall)
        if ray_problem is None:
            from ray import tune

            space = {"x": tune.uniform(0, 1)}
            with ray_session():
                ray_default.append(run_ray(ray_one_second, space, False, False)[0])
            with ray_session():
                ray_reuse.append(run_ray(ray_one_second, space, True, False)[0])

    def overhead(walls: list[float]) -> list[float]:
        return [100 * (w / ideal - 1) for w in walls]

    over = overhead(ours)
    table(f"a. scheduling overhead: {TRIALS} one-second trials on {WORKERS} workers"
          f" (ideal {ideal:g} s)", [
              ("mlc.tune wall (s)", figure(ours), "", ""),
              ("mlc.tune overhead vs ideal (%)", figure(over, "{:.1f}"), "<= 5 %",
               met(statistics.median(over) <= 5)),
              ("Ray Tune, defaults: wall (s)", figure(ray_default), "", ""),
              ("Ray Tune, defaults: overhead (%)", figure(overhead(ray_default), "{:.0f}"),
               "", ""),
              ("Ray Tune, reuse_actors=True: wall (s)", figure(ray_reuse), "", ""),
              ("Ray Tune, reuse_actors=True: overhead (%)",
               figure(overhead(ray_reuse), "{:.0f}"), "", ""),
          ])


def item_bc(cluster: Any, repeats: int, ray_problem: str | None, do_b: bool,
            do_c: bool) -> None:
    import optuna

    ratio_b: list[float] = []
    trials_b: list[float] = []  # trials the pruned study ended until it reached the target
    reached: list[bool] = []
    walls: list[float] = []
    ideal_ratio: list[float] = []
    pruned_counts: list[float] = []
    best_ours: list[float] = []
    ray_walls: list[float] = []
    ray_best: list[float] = []
    ray_stopped: list[float] = []

    def halving() -> Any:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)

    for seed in range(repeats):
        if do_b:
            _, whole = run_tune(cluster, digits_trial, SPACE_TEXT, optuna.pruners.NopPruner(),
                                optuna.samplers.TPESampler(seed=seed))
            _, longer = run_tune(cluster, digits_trial, SPACE_TEXT, halving(),
                                 optuna.samplers.TPESampler(seed=seed), n_trials=3 * TRIALS)
            target = whole.best_value * 1.01
            full, part = seconds_to_reach(whole, target), seconds_to_reach(longer, target)
            reached.append(part is not None)
            if full is not None and part is not None:
                ratio_b.append(part[0] / full[0])
                trials_b.append(part[1])
        if not do_c:
            continue
        wall, pruned = run_tune(cluster, digits_trial, SPACE_TEXT, halving(),
                                optuna.samplers.TPESampler(seed=0))
        walls.append(wall)
        ran = sum(trial_seconds(t) for t in pruned.trials)
        ideal_ratio.append(wall / (ran / WORKERS))
        pruned_counts.append(sum(t.state == optuna.trial.TrialState.PRUNED
                                 for t in pruned.trials))
        best_ours.append(pruned.best_value)
        if do_c and ray_problem is None:
            space = {"lr": optuna.distributions.FloatDistribution(1e-3, 1, log=True),
                     "width": optuna.distributions.IntDistribution(16, 128)}
            runs = []
            for reuse in (False, True):
                with ray_session():
                    runs.append(run_ray(ray_digits, space, reuse, True,
                                        optuna.samplers.TPESampler(seed=0)))
            best_run = min(runs, key=lambda r: r[0])
            ray_walls.append(best_run[0])
            ray_best.append(best_run[1])
            ray_stopped.append(best_run[2])
    if do_b:
        table(f"b. successive halving vs no pruning (digits MLP, TPE, seeds 0-{repeats - 1})", [
            (f"worker-seconds to within 1 % of the unpruned best (of {TRIALS} trials), pruned /"
             " unpruned", figure(ratio_b), "<= 0.33",
             met(bool(ratio_b) and statistics.median(ratio_b) <= 1 / 3)),
            (f"seeds where the pruned study reached it within {3 * TRIALS} trials",
             f"{sum(reached)} of {len(reached)}", "", ""),
            ("trials the pruned study ended until it reached it", figure(trials_b, "{:.0f}"),
             "", ""),
        ])
    if do_c:
        vs_ray = [w / r for w, r in zip(walls, ray_walls, strict=False)]
        equal = [abs(o - r) / r <= 0.01 for o, r in zip(best_ours, ray_best, strict=False)]
        table("c. the pruned study: wall vs its ideal and vs Ray Tune ASHA", [
            ("mlc.tune + successive halving: wall (s)", figure(walls), "", ""),
            ("its wall / (trial-seconds run / 2)", figure(ideal_ratio), "<= 1.3",
             met(statistics.median(ideal_ratio) <= 1.3)),
            ("its trials pruned", figure(pruned_counts, "{:.0f}"), "", ""),
            ("its best validation loss", figure(best_ours, "{:.4f}"), "", ""),
            ("Ray Tune ASHA (best of default, reuse_actors): wall (s)", figure(ray_walls), "",
             ""),
            ("Ray Tune ASHA: trials stopped early", figure(ray_stopped, "{:.0f}"), "", ""),
            ("Ray Tune ASHA: best validation loss", figure(ray_best, "{:.4f}"), "", ""),
            ("mlc.tune wall / Ray Tune wall", figure(vs_ray), "<= 0.5",
             met(statistics.median(vs_ray) <= 0.5) if vs_ray else None),
            ("best losses equal within 1 %", f"{sum(equal)} of {len(equal)}" if equal else
             "n/a", "", ""),
        ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="a,b,c", help="items to run (a,b,c)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat of each item")
    parser.add_argument("--trials", type=int, default=40,
                        help="trials per study (40; fewer only to try the script out)")
    args = parser.parse_args()
    global TRIALS
    TRIALS = args.trials
    only = set(args.only.split(","))
    repeats = 1 if args.quick else args.repeats
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    import optuna

    import jupyter_mlcloud as mlc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray_problem = ray_available()
    if ray_problem:
        print(f"Ray Tune could not be imported ({ray_problem}); its rows say n/a.")
    print(f"bench_tune: {WORKERS} workers, {os.cpu_count()} cores, {repeats} repeat(s)")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(tmp, "runtime")  # no stray discovery
        cluster = mlc.up(workers=WORKERS, name="bench-tune")
        try:
            # Warm workers, as in a session that has trained before: torch imported there.
            mlc.tune(one_second, space="x=uniform(0,1)", n_trials=WORKERS, cluster=cluster,
                     track=False)
            if "a" in only:
                item_a(cluster, repeats, ray_problem)
            if only & {"b", "c"}:
                item_bc(cluster, repeats, ray_problem, "b" in only, "c" in only)
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
