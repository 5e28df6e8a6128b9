"""Reference samples from every kind of input, and the bounded reservoir."""

from __future__ import annotations

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from jupyter_mlcloud.monitoring.reference import Reference, Reservoir

DATA = np.random.default_rng(1).normal(size=(300, 3))


@pytest.mark.parametrize("make, names", [
    (lambda: DATA, ("input_0", "input_1", "input_2")),
    (lambda: torch.from_numpy(DATA), ("input_0", "input_1", "input_2")),
    (lambda: pd.DataFrame(DATA, columns=["a", "b", "c"]), ("a", "b", "c")),
    (lambda: dd.from_pandas(pd.DataFrame(DATA, columns=["a", "b", "c"]), npartitions=3),
     ("a", "b", "c")),
    (lambda: da.from_array(DATA, chunks=(50, 3)), ("input_0", "input_1", "input_2")),
    (lambda: xr.DataArray(DATA, dims=("sample", "feature")), ("input_0", "input_1", "input_2")),
    (lambda: xr.Dataset({"t": ("s", DATA[:, 0]), "p": ("s", DATA[:, 1])}), ("t", "p")),
])
def test_every_kind_of_input_gives_rows_and_names(make, names) -> None:  # type: ignore[no-untyped-def]
    with dask.config.set(scheduler="synchronous"):  # dask inputs: no cluster needed here
        ref = Reference.of(make(), max_rows=100)
    assert ref.names == names and ref.values.shape == (100, len(names))
    # The rows are rows of the data, not made-up values.
    rows = {tuple(np.round(r, 12)) for r in DATA[:, :len(names)]}
    assert all(tuple(np.round(r, 12)) in rows for r in ref.values)


def test_bad_references_are_refused_in_one_sentence() -> None:
    with pytest.raises(ValueError, match="a reference must be an array, a tensor, a DataFrame"):
        Reference.of(object())
    with pytest.raises(ValueError, match="a reference needs at least one row; it is empty."):
        Reference.of(np.empty((0, 3)))


def test_the_reservoir_holds_a_bounded_uniform_sample_of_the_stream() -> None:
    reservoir = Reservoir(max_rows=500, seed=3)
    assert reservoir.reference() is None
    for start in range(0, 20_000, 64):
        reservoir.add(torch.arange(start, min(start + 64, 20_000), dtype=torch.float64)[:, None])
    ref = reservoir.reference()
    assert ref is not None and ref.values.shape == (500, 1) and reservoir.seen == 20_000
    kept = ref.values[:, 0]
    assert len(np.unique(kept)) == 500  # rows of the stream, each once
    # Uniform over the stream: each quarter holds about a quarter of the sample.
    counts = np.histogram(kept, bins=4, range=(0, 20_000))[0]
    assert counts.min() > 90 and counts.max() < 160
    with pytest.raises(ValueError, match="keep_reference got rows of 2 value"):
        reservoir.add(np.zeros((4, 2)))
