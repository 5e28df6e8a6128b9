"""Drift statistics on samples whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp, wasserstein_distance

from jupyter_mlcloud.monitoring.drift import COLUMNS, compare, effect, psi

RNG = np.random.default_rng(7)
REFERENCE = RNG.normal(size=(5000, 3))


def test_a_shifted_feature_drifts_and_the_others_do_not() -> None:
    current = RNG.normal(size=(2000, 3))
    current[:, 1] += 0.5
    frame = compare(REFERENCE, current, ["a", "b", "c"])
    assert list(frame.columns) == list(COLUMNS) and list(frame.index) == ["a", "b", "c"]
    assert frame["drifted"].tolist() == [False, True, False]
    assert frame.loc["b", "effect"] == pytest.approx(0.5, abs=0.08)
    assert frame.loc["b", "psi"] > 0.1 > frame.loc["a", "psi"]
    assert (frame["p_adjusted"] >= frame["p_value"]).all()  # Benjamini-Hochberg never lowers


def test_a_large_sample_does_not_flag_a_trivial_shift() -> None:
    big_reference = RNG.normal(size=(200_000, 1))
    current = RNG.normal(size=(200_000, 1)) + 0.03  # significant, but trivial
    frame = compare(big_reference, current, ["x"])
    assert frame.loc["x", "p_adjusted"] < 0.05
    assert frame.loc["x", "effect"] < 0.1 and not frame.loc["x", "drifted"]


def test_psi_and_effect_of_identical_samples_are_zero() -> None:
    sample = RNG.normal(size=1000)
    assert psi(sample, sample) == pytest.approx(0.0)
    assert effect(sample, sample) == pytest.approx(0.0)
    assert psi(np.zeros(10), np.ones(10)) > 1  # a constant reference still compares


def test_too_few_current_values_give_no_verdict() -> None:
    frame = compare(REFERENCE, REFERENCE[:1], ["a", "b", "c"])
    assert frame["ks_stat"].isna().all() and not frame["drifted"].any()
    assert isinstance(frame, pd.DataFrame)


def test_samples_of_other_widths_are_refused_in_one_sentence() -> None:
    with pytest.raises(ValueError, match=r"drift needs 3 feature\(s\) in both samples; got 3"
                                         r" in the reference and 2 now\."):
        compare(REFERENCE, REFERENCE[:, :2], ["a", "b", "c"])


def test_the_figures_are_scipys_two_sample_ks_test_and_wasserstein_distance() -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(700, 3))
    current = np.column_stack([rng.normal(size=900), rng.normal(0.3, 1.0, size=900),
                               rng.integers(0, 4, size=900)])  # ties, which the merge must keep
    frame = compare(reference, current, ["a", "b", "c"])
    for j, name in enumerate("abc"):
        test = ks_2samp(reference[:, j], current[:, j], method="asymp")
        assert frame.loc[name, "ks_stat"] == pytest.approx(test.statistic, abs=1e-12)
        assert frame.loc[name, "p_value"] == pytest.approx(test.pvalue, rel=1e-9, abs=1e-300)
        distance = wasserstein_distance(reference[:, j], current[:, j])
        assert frame.loc[name, "effect"] == pytest.approx(distance / reference[:, j].std())


def test_features_with_missing_values_get_the_figures_of_their_finite_values_alone() -> None:
    rng = np.random.default_rng(11)
    reference = rng.normal(size=(600, 4))
    current = rng.normal(0.2, 1.0, size=(800, 4))
    reference[::5, 1] = np.nan  # computed apart from the whole columns, each on its own
    current[::3, 2] = np.inf
    frame = compare(reference, current, ["a", "b", "c", "d"])
    for j, name in enumerate("abcd"):
        ref, cur = reference[:, j], current[:, j]
        alone = compare(ref[np.isfinite(ref)][:, None], cur[np.isfinite(cur)][:, None], [name])
        for column in ("psi", "ks_stat", "p_value", "effect", "n_reference", "n_current"):
            assert frame.loc[name, column] == pytest.approx(alone.loc[name, column], rel=1e-12)
    assert frame.loc["b", "n_reference"] == 480 and frame.loc["c", "n_current"] == 533
