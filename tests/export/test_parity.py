"""The parity figures themselves: differences, tolerances, random batches, quantization."""

from __future__ import annotations

import numpy as np
import pytest

from jupyter_mlcloud.export import ExportError, parity


def test_differences_per_output_with_nan_handled() -> None:
    expected = [np.array([[1.0, np.nan], [2.0, 3.0]], dtype=np.float32), np.array([1, 2])]
    got = [np.array([[1.00002, np.nan], [2.0, 3.0]], dtype=np.float32), np.array([1, 2])]
    found = parity.compare(expected, got, ["logits", "ids"], "example", 2)
    assert [p.output for p in found] == ["logits", "ids"]
    assert found[0].max_abs_diff == pytest.approx(2e-5, rel=0.1) and found[0].ok
    assert found[1].tolerance == 0.0 and found[1].ok  # integers: exact
    got[0][0, 1] = 5.0  # a number where the model gives NaN
    [worst, _] = parity.compare(expected, got, ["logits", "ids"], "random", 64)
    assert worst.max_abs_diff == np.inf and not worst.ok


def test_require_names_the_worst_output() -> None:
    expected = [np.zeros((3, 2), np.float32), np.zeros((3, 1), np.float32)]
    got = [np.full((3, 2), 3e-4, np.float32), np.full((3, 1), 2e-3, np.float32)]
    found = parity.compare(expected, got, ["a", "b"], "random", 3)
    with pytest.raises(ExportError, match=r"output 'b' differs by up to 0\.002 in onnxruntime"
                                          r" on the random batch of 3 row\(s\), over the"
                                          r" allowed 1e-04"):
        parity.require(found, "onnx")
    parity.require(found[:0], "pt2")  # nothing failed: no error


def test_shape_and_count_mismatches_are_failures() -> None:
    with pytest.raises(ExportError, match="gives 1 output"):
        parity.compare([np.zeros(2), np.zeros(2)], [np.zeros(2)], ["a", "b"], "example", 2)
    with pytest.raises(ExportError, match=r"output 'a' of the exported model has shape \(2,"
                                          r" 1\)"):
        parity.compare([np.zeros((2, 2))], [np.zeros((2, 1))], ["a"], "example", 2)


def test_random_batches_look_like_the_example() -> None:
    example = (np.random.default_rng(0).normal(5.0, 0.1, size=(4, 3)).astype(np.float32),
               np.array([[2, 7], [3, 4], [2, 2], [7, 5]]), np.array([True, False, True, True]))
    floats, ints, flags = parity.random_like(example, 64)
    assert floats.shape == (64, 3) and floats.dtype == np.float32
    assert 4.0 < floats.mean() < 6.0
    assert ints.shape == (64, 2) and ints.min() >= 2 and ints.max() <= 7
    assert flags.shape == (64,) and flags.dtype == bool
    assert parity.other_batch(example) == 64
    assert parity.other_batch((np.zeros((64, 2)),)) != 64
    one = parity.random_like((np.ones((1, 3), np.float32),), 5)[0]  # no spread: still random
    assert one.std() > 0


def test_quantization_change_with_top1_agreement() -> None:
    expected = [np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.4]])]
    got = [np.array([[0.9, 0.0], [0.0, 1.1], [0.4, 0.5]])]
    [change] = parity.change(expected, got, ["logits"])
    assert change.max_abs_diff == pytest.approx(0.1)
    assert change.mean_abs_diff == pytest.approx(0.4 / 6)
    assert change.relative == pytest.approx(0.4 / 2.9)
    assert change.top1_agreement == pytest.approx(2 / 3)
    [single] = parity.change([np.ones((3, 1))], [np.ones((3, 1))], ["score"])
    assert single.top1_agreement is None and single.max_abs_diff == 0
