"""The text form of a search space, and the checks of tune's options (no cluster needed)."""

from __future__ import annotations

import optuna
import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.tuning.options import make_pruner, make_sampler
from jupyter_mlcloud.tuning.space import FORMS, SpaceError, check_space, parse_space

dist = optuna.distributions


def test_every_form_becomes_its_distribution() -> None:
    space = parse_space("lr=log(1e-4,1), width=int(16,256), act=choice(relu,tanh),"
                        " p=uniform(0,0.5),layers=logint(1, 8), bn=choice(True, 0.5, 'a b')")
    assert space == {
        "lr": dist.FloatDistribution(1e-4, 1.0, log=True),
        "width": dist.IntDistribution(16, 256),
        "act": dist.CategoricalDistribution(["relu", "tanh"]),
        "p": dist.FloatDistribution(0.0, 0.5),
        "layers": dist.IntDistribution(1, 8, log=True),
        "bn": dist.CategoricalDistribution([True, 0.5, "a b"]),
    }


@pytest.mark.parametrize(("text", "named"), [
    ("lr=lg(1e-4,1)", "'lg'"),
    ("lr=log(0,1)", "LOW > 0"),
    ("lr=log(1,1e-4)", "LOW must be below HIGH"),
    ("width=int(16,25.5)", "'25.5'"),
    ("p=uniform(0)", "two bounds, got 1"),
    ("p=uniform(a,1)", "'a'"),
    ("act=choice()", "at least one value"),
    ("lr", "'lr'"),
    ("lr=log(1e-4,1) width=int(1,2)", "expected a comma"),
    ("lr=log(1e-4,1),lr=log(1e-3,1)", "'lr' appears twice"),
    ("", "empty"),
])
def test_bad_text_names_the_bad_part_and_the_allowed_forms(text: str, named: str) -> None:
    with pytest.raises(SpaceError) as caught:
        parse_space(text)
    message = str(caught.value)
    assert named in message
    assert "\n" not in message
    if text:
        assert "allowed forms" in message or "twice" in message or "comma" in message


def test_every_allowed_form_is_listed_in_the_errors() -> None:
    with pytest.raises(SpaceError) as caught:
        parse_space("x=nope(1,2)")
    for form in FORMS:
        assert f"{form}(" in str(caught.value)


def test_a_mapping_must_hold_optuna_distributions() -> None:
    assert check_space({"x": dist.IntDistribution(0, 3)}) == {"x": dist.IntDistribution(0, 3)}
    with pytest.raises(SpaceError, match=r"space\['x'\] is \(0, 3\), not an optuna"):
        check_space({"x": (0, 3)})
    with pytest.raises(SpaceError, match="non-empty mapping"):
        check_space({})


def test_pruners_and_samplers_by_name() -> None:
    assert isinstance(make_pruner("successive-halving"), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
    assert isinstance(make_sampler("random:3"), optuna.samplers.RandomSampler)
    with pytest.raises(ValueError, match="'asha' is neither"):
        make_pruner("asha")
    with pytest.raises(ValueError, match="'tpe:x' is neither"):
        make_sampler("tpe:x")


@pytest.mark.parametrize(("options", "named"), [
    ({"n_trials": 0}, "n_trials must be a whole number >= 1, got 0"),
    ({"workers_per_trial": "2"}, "workers_per_trial must be"),
    ({"direction": "down"}, "direction 'down'"),
    ({"metric": "val loss"}, "'val loss'"),
    ({"workers": 2}, "'workers' is set by tune"),
    ({"noblok": True}, "'noblok' is neither an option of train"),
    ({"storage": "sqlite:///x.db"}, "storage= needs study_name="),
])
def test_bad_options_are_refused_before_anything_starts(options: dict, named: str,
                                                        tmp_path: object) -> None:
    # No cluster exists here: each is refused before one is looked for (or the study made).
    def fn(ctx: object) -> None:
        pass

    with pytest.raises(ValueError) as caught:
        mlc.tune(fn, space="x=int(0,3)", **options)
    assert named in str(caught.value)
