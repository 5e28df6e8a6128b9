"""Whether a sample of inputs (or outputs) has drifted from a reference sample, feature by
feature.

For each feature, three figures:

- ``ks_stat`` and ``p_value``: the two-sample Kolmogorov–Smirnov test (its asymptotic
  p-value, as scipy's ``ks_2samp(method="asymp")``); the p-values
  are adjusted across features with Benjamini–Hochberg (``p_adjusted``), so many features do
  not flag by chance;
- ``psi``: the population stability index over the reference's deciles (0.1: some shift,
  0.25: a large one, by the usual reading);
- ``effect``: the Wasserstein distance between the two samples in units of the reference's
  standard deviation, so that a large sample does not flag a trivial shift: a feature is
  ``drifted`` only when ``p_adjusted < alpha`` *and* ``effect >= min_effect``.

Pure numpy, pandas and scipy: the kernel, the scheduler and the workers can all compute it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

ALPHA = 0.05
MIN_EFFECT = 0.1
BINS = 10
COLUMNS = ("psi", "ks_stat", "p_value", "p_adjusted", "effect", "drifted", "n_reference",
           "n_current")


def psi(reference: np.ndarray, current: np.ndarray, bins: int = BINS) -> float:
    """The population stability index of ``current`` against ``reference`` (1-D), over the
    reference's quantile bins (and one bin each below and above its range); empty bins count
    as half an observation."""
    ref, cur = np.sort(reference), np.sort(current)
    return _psi_sorted(ref, cur, np.quantile(ref, np.linspace(0, 1, bins + 1)))


def _psi_sorted(ref: np.ndarray, cur: np.ndarray, quantiles: np.ndarray) -> float:
    """:func:`psi` of sorted samples, given the reference's quantiles."""
    # Bin edges: the reference's deciles, with values below its minimum and above its maximum
    # in bins of their own (so a constant reference still tells a moved value apart).
    inner = np.unique(np.concatenate([quantiles[:-1], [np.nextafter(quantiles[-1], np.inf)]]))
    # Both samples are sorted: a bin's count is the difference of two positions (the values
    # below each edge), not a search per value.
    expected = np.diff(np.searchsorted(ref, inner, side="left"), prepend=0, append=len(ref))
    actual = np.diff(np.searchsorted(cur, inner, side="left"), prepend=0, append=len(cur))
    expected = np.maximum(expected.astype(float), 0.5) / max(len(ref), 1)
    actual = np.maximum(actual.astype(float), 0.5) / max(len(cur), 1)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def effect(reference: np.ndarray, current: np.ndarray) -> float:
    """The Wasserstein distance between the samples over the reference's standard deviation
    (the plain distance for a constant reference)."""
    _, distance = _ks_and_distance(np.sort(reference)[None], np.sort(current)[None])
    scale = float(np.std(reference))
    return float(distance[0]) / scale if scale > 0 else float(distance[0])


def _ks_and_distance(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``ref`` and ``cur`` (features x sorted values), both samples' empirical
    CDFs compared at every value: their largest gap (the KS statistic) and the area between
    them (the Wasserstein distance). What scipy's ``ks_2samp`` and ``wasserstein_distance``
    compute, from one merge of all features at once instead of a sort each and, for the KS
    test, the exact p-value's O(n·m) work (4 ms a feature at 2,000 × 5,000)."""
    n, m = ref.shape[1], cur.shape[1]
    both = np.concatenate([ref, cur], axis=1)
    order = np.argsort(both, axis=1, kind="stable")  # a merge of two sorted runs
    values = np.take_along_axis(both, order, axis=1)
    # How many of each sample are at or before each merged position (counts fit in int32
    # for any window; a cumulative sum over booleans in int64 is ten times slower).
    below_ref = np.cumsum(order < n, axis=1, dtype=np.int32)
    below_cur = np.arange(1, n + m + 1, dtype=np.int32) - below_ref
    gap = np.abs(below_ref / n - below_cur / m)
    # Within a run of equal values only its last position counts every one of them; the
    # others are left out of the maximum, and weigh nothing in the area (a zero step).
    last = np.ones(values.shape, dtype=bool)
    last[:, :-1] = values[:, 1:] != values[:, :-1]
    ks = np.where(last, gap, 0.0).max(axis=1)
    return ks, np.sum(gap[:, :-1] * np.diff(values, axis=1), axis=1)


@functools.lru_cache(maxsize=8192)
def _ks_p_value(stat: float, size: float) -> float:
    """The asymptotic two-sided p-value of KS statistic ``stat`` at effective sample size
    ``size``, as ks_2samp(method="asymp") gives it. Memoized: scipy evaluates a series in
    Python for each value (about half of a window's drift check, before), and a statistic of
    samples of fixed sizes n and m is a multiple of 1/lcm(n, m), so a watched endpoint's
    checks see the same few hundred values again and again."""
    from scipy.stats import kstwo

    return min(max(float(kstwo.sf(stat, size)), 0.0), 1.0)


def _figures(ref: np.ndarray, cur: np.ndarray) -> dict[str, np.ndarray]:
    """``psi``, ``ks_stat``, ``p_value`` and ``effect`` of each column of two finite 2-D
    samples with at least 2 rows each, all columns at once."""
    # Features as rows, each contiguous, for the sorts, merges and sums along them.
    ref = np.sort(np.ascontiguousarray(ref.T), axis=1)
    cur = np.sort(np.ascontiguousarray(cur.T), axis=1)
    stat, distance = _ks_and_distance(ref, cur)
    scale = np.std(ref, axis=1)
    n, m = ref.shape[1], cur.shape[1]
    size = float(np.round(n * m / (n + m)))
    p_value = np.array([_ks_p_value(float(s), size) for s in stat])
    quantiles = np.quantile(ref, np.linspace(0, 1, BINS + 1), axis=1).T
    psis = [_psi_sorted(r, c, q) for r, c, q in zip(ref, cur, quantiles, strict=True)]
    return {"psi": np.array(psis),
            "ks_stat": stat, "p_value": p_value,
            "effect": np.divide(distance, scale, out=distance.copy(), where=scale > 0)}


def _finite_rows(sample: np.ndarray, finite: np.ndarray, group: np.ndarray) -> np.ndarray:
    """The columns ``group`` of ``sample``, without its rows that miss one of them (no copy
    when it is the whole sample, the usual case: the window is large)."""
    if len(group) != sample.shape[1]:
        sample, finite = sample[:, group], finite[:, group]
    keep = finite.all(1)
    return sample if keep.all() else sample[keep]


def compare(reference: np.ndarray, current: np.ndarray, names: Sequence[str], *,
            alpha: float = ALPHA, min_effect: float = MIN_EFFECT) -> Any:
    """A DataFrame indexed by feature (``names``, one per column of both 2-D samples) with
    :data:`COLUMNS`. Features with fewer than 2 current values get NaN figures, never
    ``drifted``."""
    import pandas as pd
    from scipy.stats import false_discovery_control

    reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    current = np.asarray(current, dtype=np.float64).reshape(len(current), -1)
    if reference.shape[1] != len(names) or current.shape[1] != len(names):
        raise ValueError(f"drift needs {len(names)} feature(s) in both samples; got"
                         f" {reference.shape[1]} in the reference and {current.shape[1]} now.")
    width = len(names)
    columns: dict[str, np.ndarray] = {k: np.full(width, np.nan)
                                      for k in ("psi", "ks_stat", "p_value", "effect")}
    finite_ref, finite_cur = np.isfinite(reference), np.isfinite(current)
    columns["n_reference"], columns["n_current"] = finite_ref.sum(0), finite_cur.sum(0)
    # The columns without a missing value are computed together (the usual case, and most
    # of the cost); any other on its own, from its finite values.
    whole = finite_ref.all(0) & finite_cur.all(0)
    groups = [np.flatnonzero(whole)] + [np.array([j]) for j in np.flatnonzero(~whole)]
    for group in groups:
        if not len(group):
            continue
        ref, cur = _finite_rows(reference, finite_ref, group), \
            _finite_rows(current, finite_cur, group)
        if len(cur) < 2 or len(ref) < 2:
            continue
        for key, values in _figures(ref, cur).items():
            columns[key][group] = values
    frame = pd.DataFrame({"feature": list(names), **columns}).set_index("feature")
    tested = frame["p_value"].notna()
    frame["p_adjusted"] = np.nan
    if tested.any():
        frame.loc[tested, "p_adjusted"] = false_discovery_control(
            frame.loc[tested, "p_value"].to_numpy(), method="bh")
    frame["drifted"] = (frame["p_adjusted"] < alpha) & (frame["effect"] >= min_effect)
    return frame[list(COLUMNS)]
