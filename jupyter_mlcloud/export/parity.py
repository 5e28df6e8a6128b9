"""Does the exported model compute what the eager one does? Outputs compared on the example and
on a random batch of another size; what int8 quantization changes, measured on the example."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .failures import ExportError
from .result import Parity, QuantizationChange

#: Largest absolute difference allowed from the eager model, by output dtype.
TOLERANCE = {"float64": 1e-4, "float32": 1e-4, "float16": 1e-2}
#: Rows of the random batch (or the fallback when the example has exactly that many).
RANDOM_ROWS = (64, 5)


def random_like(example: tuple[np.ndarray, ...], rows: int, seed: int = 1
                ) -> tuple[np.ndarray, ...]:
    """Random inputs of ``rows`` rows shaped and typed like ``example``: floats drawn around
    the example's per-column mean and spread, integers between its smallest and largest."""
    rng = np.random.default_rng(seed)
    out = []
    for x in example:
        shape = (rows, *x.shape[1:])
        if x.dtype.kind == "f":
            values = x.astype(np.float64)
            spread = values.std(axis=0)
            overall = float(values.std()) or 1.0
            spread = np.where(spread > 0, spread, overall)
            out.append(rng.normal(values.mean(axis=0), spread, size=shape).astype(x.dtype))
        elif x.dtype.kind == "b":
            out.append(rng.random(shape) < 0.5)
        else:
            out.append(rng.integers(int(x.min()), int(x.max()) + 1, size=shape).astype(x.dtype))
    return tuple(out)


def other_batch(example: tuple[np.ndarray, ...]) -> int:
    """A batch size unlike the example's."""
    return next(n for n in RANDOM_ROWS if n != len(example[0]))


def _difference(expected: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Absolute differences; NaN where only one side is NaN counts as infinite, where both
    are NaN as none."""
    expected = np.asarray(expected, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64).reshape(expected.shape)
    diff = np.abs(expected - got)
    both = np.isnan(expected) & np.isnan(got)
    diff[both] = 0.0
    diff[np.isnan(diff)] = np.inf
    return diff


def compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray], names: Sequence[str],
            input: str, batch: int) -> list[Parity]:
    """One :class:`Parity` per output."""
    if len(got) != len(expected):
        raise ExportError(f"the exported model gives {len(got)} output(s) where the eager model"
                          f" gives {len(expected)}; nothing was written.")
    found = []
    for name, e, g in zip(names, expected, got, strict=True):
        if np.shape(g) != np.shape(e):
            raise ExportError(f"output {name!r} of the exported model has shape {np.shape(g)}"
                              f" on the {input} batch of {batch} where the eager model's has"
                              f" {np.shape(e)}; nothing was written.")
        diff = _difference(e, g)
        tolerance = TOLERANCE.get(str(np.asarray(e).dtype), 0.0)
        found.append(Parity(input, batch, name, float(diff.max(initial=0.0)), tolerance))
    return found


def require(parity: Sequence[Parity], fmt: str) -> None:
    """ExportError, naming the output and its largest difference, unless every output is
    within its tolerance."""
    failed = [p for p in parity if not p.ok]
    if not failed:
        return
    worst = max(failed, key=lambda p: p.max_abs_diff - p.tolerance)
    runtime = "onnxruntime" if fmt == "onnx" else "the .pt2 program"
    raise ExportError(
        f"the exported model does not match the eager one: output {worst.output!r} differs"
        f" by up to {worst.max_abs_diff:.3g} in {runtime} on the {worst.input} batch of"
        f" {worst.batch} row(s), over the allowed {worst.tolerance:.0e}; nothing was written"
        " (check=False writes it unchecked).")


def change(expected: Sequence[np.ndarray], got: Sequence[np.ndarray],
           names: Sequence[str]) -> list[QuantizationChange]:
    """How far a quantized model's outputs moved from the eager model's, per output."""
    changes = []
    for name, e, g in zip(names, expected, got, strict=True):
        diff = _difference(e, g)
        magnitude = float(np.abs(np.asarray(e, dtype=np.float64)).mean()) if np.size(e) else 0.0
        mean = float(diff.mean()) if diff.size else 0.0
        agreement = None
        if np.ndim(e) == 2 and np.shape(e)[1] > 1:
            g2 = np.asarray(g).reshape(np.shape(e))
            agreement = float((np.argmax(e, axis=1) == np.argmax(g2, axis=1)).mean())
        changes.append(QuantizationChange(name, float(diff.max(initial=0.0)), mean,
                                          mean / magnitude if magnitude else 0.0, agreement))
    return changes
