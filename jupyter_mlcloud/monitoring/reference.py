"""A reference sample: what a model's inputs looked like when it was trained or validated,
as at most ``max_rows`` rows drawn uniformly, with the features' names.

:meth:`Reference.of` takes a numpy array, a tensor, a pandas DataFrame, an xarray DataArray
(sample dimension first) or Dataset (its variables become features), or a dask array or
DataFrame (only the drawn rows are computed). :class:`Reservoir` keeps such a sample of a
stream of batches (``ctx.keep_reference``) without holding more than ``max_rows`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_ROWS = 10_000


def _names(n: int, prefix: str = "input") -> list[str]:
    return [f"{prefix}_{j}" for j in range(n)]


def _rows(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 1:
        return array.reshape(-1, 1)
    return array.reshape(array.shape[0], int(np.prod(array.shape[1:])))


@dataclass(frozen=True)
class Reference:
    """``values``: rows x features (float64); ``names``: one per feature."""

    values: np.ndarray
    names: tuple[str, ...]

    @classmethod
    def of(cls, data: Any, max_rows: int = MAX_ROWS, seed: int = 0) -> Reference:
        """At most ``max_rows`` rows of ``data``, drawn uniformly without replacement."""
        if isinstance(data, Reference):
            return data
        rng = np.random.default_rng(seed)
        names: list[str] | None = None
        module = type(data).__module__.split(".")[0]
        if module == "xarray":
            if hasattr(data, "data_vars"):  # a Dataset: its variables are the features
                names = [str(v) for v in data.data_vars]
                data = data.to_dataframe()[names] if names else data
            else:
                data = data.data
                module = type(data).__module__.split(".")[0]
        if hasattr(data, "columns") and hasattr(data, "dtypes"):  # pandas or dask DataFrame
            names = names or [str(c) for c in data.columns]
            if module == "dask":
                total = int(data.shape[0].compute()) if hasattr(data.shape[0], "compute") \
                    else len(data)
                if total > max_rows:
                    data = data.sample(frac=min(1.0, 1.2 * max_rows / total), random_state=seed)
                data = data.compute()
            values = _rows(data.to_numpy(dtype=np.float64))
        elif module == "dask":  # a dask array: compute only the drawn rows
            total = int(data.shape[0])
            chosen = np.sort(rng.choice(total, min(total, max_rows), replace=False))
            values = _rows(data[chosen].compute())
        elif hasattr(data, "detach"):  # a tensor, without importing torch here
            values = _rows(data.detach().cpu().numpy())
        else:
            try:
                values = _rows(np.asarray(data))
            except (TypeError, ValueError):
                raise ValueError(f"a reference must be an array, a tensor, a DataFrame, an"
                                 f" xarray object or a dask collection of numbers, got"
                                 f" {type(data).__name__}.") from None
        if len(values) == 0:
            raise ValueError("a reference needs at least one row; it is empty.")
        if len(values) > max_rows:
            values = values[np.sort(rng.choice(len(values), max_rows, replace=False))]
        names = names if names and len(names) == values.shape[1] else _names(values.shape[1])
        return cls(values, tuple(names))

    def __len__(self) -> int:
        return len(self.values)


class Reservoir:
    """A uniform sample of at most ``max_rows`` rows of every batch :meth:`add` was given
    (Vitter's algorithm R, vectorised per batch)."""

    def __init__(self, max_rows: int = MAX_ROWS, seed: int = 0) -> None:
        self.max_rows = max_rows
        self.seen = 0
        self._rows: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

    def add(self, batch: Any) -> None:
        """Offer the rows of ``batch`` (array or tensor)."""
        rows = _rows(batch.detach().cpu().numpy() if hasattr(batch, "detach") else batch)
        if self._rows is None:
            self._rows = np.empty((0, rows.shape[1]))
        if rows.shape[1] != self._rows.shape[1]:
            raise ValueError(f"keep_reference got rows of {rows.shape[1]} value(s) after rows"
                             f" of {self._rows.shape[1]}; keep one kind of batch.")
        room = self.max_rows - len(self._rows)
        if room > 0:
            self._rows = np.concatenate([self._rows, rows[:room]])
            self.seen += min(room, len(rows))
            rows = rows[room:]
        if len(rows):
            # Row i of this batch (overall index seen+i) replaces a random slot with
            # probability max_rows / (seen+i+1).
            index = self.seen + np.arange(len(rows))
            slots = (self._rng.random(len(rows)) * (index + 1)).astype(np.int64)
            keep = slots < self.max_rows
            self._rows[slots[keep]] = rows[keep]
            self.seen += len(rows)

    def reference(self) -> Reference | None:
        """What was kept, as a :class:`Reference` (None before any row)."""
        if self._rows is None or not len(self._rows):
            return None
        return Reference(self._rows.copy(), tuple(_names(self._rows.shape[1])))
