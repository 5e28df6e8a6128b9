"""Models that cannot be exported, exports that do not match, and bad arguments: one sentence
naming what failed, and nothing left on disk."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import jupyter_mlcloud as mlc

from . import models

ROWS = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)


def _line_of(cls: type, text: str) -> int:
    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_data_dependent_control_flow_names_the_line(out: Path, suffix: str) -> None:
    with pytest.raises(mlc.ExportError) as caught:
        mlc.export(models.Branchy(), out / f"branchy{suffix}", example=ROWS)
    message = str(caught.value)
    line = _line_of(models.Branchy, "if x.sum() > 0:")
    assert f"models.py line {line}, `if x.sum() > 0:  # the line the error must name`" in message
    assert "data-dependent control flow" in message
    assert "\n" not in message and message.count(". ") == 0
    assert os.listdir(out) == []


def test_an_operator_without_onnx_translation_is_named(out: Path) -> None:
    with pytest.raises(mlc.ExportError, match=r"the operator aten\._linalg_svd\.default") as e:
        mlc.export(models.Svd(), out / "svd.onnx", example=ROWS)
    line = _line_of(models.Svd, "torch.linalg.svd")
    assert f"(called at models.py line {line}, `return torch.linalg.svd(" in str(e.value)
    assert "export to .pt2" in str(e.value)
    assert os.listdir(out) == []
    mlc.export(models.Svd(), out / "svd.pt2", example=ROWS)  # torch.export has it
    assert os.listdir(out) == ["svd.pt2"]


def test_a_batch_size_written_into_the_model_is_refused(out: Path) -> None:
    with pytest.raises(mlc.ExportError, match="its code fixes the batch size to 4; use -1"):
        mlc.export(models.FixedBatch(), out / "fixed.onnx", example=ROWS)
    assert os.listdir(out) == []


def test_a_mismatch_names_the_output_and_the_largest_difference(out: Path) -> None:
    model = models.huge_weights()
    with pytest.raises(mlc.ExportError) as caught:
        mlc.export(model, out / "huge.onnx", example=ROWS)
    message = str(caught.value)
    assert message.startswith("the exported model does not match the eager one: output"
                               " 'output' differs by up to ")
    assert "in onnxruntime on the " in message and "over the allowed 1e-04" in message
    assert "nothing was written" in message
    assert os.listdir(out) == []  # neither the file nor the staging folder
    # Unchecked, it is written (and the figures are not made up).
    result = mlc.export(model, out / "huge.onnx", example=ROWS, check=False)
    assert result.parity == () and os.listdir(out) == ["huge.onnx"]


@pytest.mark.parametrize(("path", "kwargs", "match"), [
    ("model.pb", {}, r"has the suffix '\.pb'; use \.onnx .* or \.pt2"),
    ("model", {}, r"has no suffix; use \.onnx"),
    ("missing/model.onnx", {}, r"the folder .*missing' does not exist"),
    ("model.pt2", {"quantize": "int8"}, r"quantize='int8' makes an ONNX model"),
    ("model.onnx", {"quantize": "int4"}, r"quantize='int4' is not supported; use"
                                         r" quantize='int8'"),
    ("model.onnx", {"check": "yes"}, r"check must be True or False"),
    ("model.onnx", {"example": ROWS, "features": 6}, r"pass example= or features=, not both"),
    ("model.onnx", {"features": 0}, r"features must be a positive whole number, got 0"),
    ("model.onnx", {"example": ROWS[:, :5]}, r"cannot run on the example of shape \(4, 5\)"),
    ("model.onnx", {"example": "rows.csv"}, r"is a path but not a \.npy file"),
    ("model.onnx", {"example": np.array(["a", "b"])}, r"example must be numeric"),
    ("model.onnx", {"example": np.zeros((0, 6))}, r"at least one row"),
])
def test_bad_arguments_get_one_sentence(out: Path, path: str, kwargs: dict,
                                        match: str) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        mlc.export(models.mlp(), out / path, **kwargs)
    assert "\n" not in str(caught.value)
    assert os.listdir(out) == []


def test_models_that_are_no_models(out: Path) -> None:
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, a callable or a"):
        mlc.export(42, out / "m.onnx", example=ROWS)
    with pytest.raises(ValueError, match="cannot read the model file"):
        mlc.export(str(out / "absent.pt"), out / "m.onnx", example=ROWS)
    conv = torch.nn.Conv2d(3, 3, 3)
    with pytest.raises(ValueError, match="export needs an example input: pass example="):
        mlc.export(conv, out / "m.onnx")
    assert os.listdir(out) == []
