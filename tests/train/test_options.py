"""Run options that cannot collide with the user function's own arguments, nor be mis-wired."""

from __future__ import annotations

from typing import Any

import pytest

import jupyter_mlcloud as mlc
from jupyter_mlcloud.train.launch import function_kwargs, run_options
from jupyter_mlcloud.train.options import FaultOptions, StrategyOptions


def fit(ctx: Any, lr: float = 0.1, seed: int = 0) -> None:
    """A user function with its own ``lr`` and a ``seed`` that shadows a run option."""


def test_an_unknown_keyword_is_refused_with_the_options_and_the_nearest() -> None:
    with pytest.raises(ValueError, match=r"^'noblock' is neither an option of train nor a"
                                         r" parameter of fit\. The options are: cluster,"):
        mlc.train(fit, noblock=True)
    with pytest.raises(ValueError, match=r"Did you mean 'max_failures'\?"):
        mlc.train(fit, max_failure=1)


def test_the_functions_own_keywords_and_config_reach_it() -> None:
    assert function_kwargs(fit, {"lr": 0.5}, None) == {"lr": 0.5}
    assert function_kwargs(fit, {}, {"seed": 3, "lr": 1.0}) == {"seed": 3, "lr": 1.0}
    # config is passed as it is: a function taking **kwargs gets any name through it.
    assert function_kwargs(lambda ctx, **kw: None, {}, {"anything": 1}) == {"anything": 1}
    with pytest.raises(ValueError, match="'anything' is neither"):
        function_kwargs(lambda ctx, **kw: None, {"anything": 1}, None)


def test_config_must_be_a_mapping_and_a_name_is_given_once() -> None:
    with pytest.raises(ValueError, match="config must be a mapping .* got list"):
        function_kwargs(fit, {}, ["lr"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'lr' is given both as a keyword and in config"):
        function_kwargs(fit, {"lr": 1.0}, {"lr": 2.0})


def test_run_options_are_trains_keyword_only_parameters() -> None:
    options = run_options()
    assert {"cluster", "workers", "seed", "max_failures", "strategy", "config"} <= set(options)
    assert "fn" not in options and "kwargs" not in options


def test_option_objects_are_built_by_name_only() -> None:
    with pytest.raises(TypeError):
        FaultOptions(1, None)  # type: ignore[misc]
    with pytest.raises(TypeError):
        StrategyOptions("pipeline", 4)  # type: ignore[misc]
    parsed = {"name": "pipeline", "microbatches": 8, "max_failures": 2, "unrelated": 1}
    assert StrategyOptions.from_options(parsed) == StrategyOptions(name="pipeline",
                                                                   microbatches=8)
    assert FaultOptions.from_options(parsed) == FaultOptions(max_failures=2)
