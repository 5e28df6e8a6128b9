"""mlc.export end to end: real ONNX files run in onnxruntime, real .pt2 programs, every form of
model mlc.score takes, and the result's figures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import jupyter_mlcloud as mlc

from .models import TwoHeads, mlp

ROWS = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)


def _eager(model: torch.nn.Module, rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(rows, dtype=torch.float32)).numpy()


def _onnx(path: str | Path, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": rows.astype(np.float32)})[0]


def test_onnx_with_a_dynamic_batch_matches_the_model(out: Path) -> None:
    model = mlp()
    result = mlc.export(model, out / "mlp.onnx", example=ROWS)
    assert isinstance(result, mlc.ExportResult)
    assert result.path == str(out / "mlp.onnx") and result.format == "onnx"
    assert result.size == os.path.getsize(out / "mlp.onnx") > 0
    proto = onnx.load(out / "mlp.onnx")
    assert result.opset == next(o.version for o in proto.opset_import if o.domain == "")
    assert result.opset >= 17
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", ""]
    assert result.inputs == ("input",) and result.outputs == ("output",)
    # The check ran on the example and on a random batch of another size, both within 1e-4.
    assert [(p.input, p.batch) for p in result.parity] == [("example", 4), ("random", 64)]
    assert all(p.ok and p.tolerance == 1e-4 for p in result.parity)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    # Latency at batch 1 and 64, onnxruntime beside eager torch.
    assert set(result.latency_ms) == {"onnxruntime", "torch"}
    assert all(set(t) == {1, 64} and min(t.values()) > 0 for t in result.latency_ms.values())
    assert result.speedup(1) is not None
    for rows in (ROWS[:1], np.random.default_rng(3).normal(size=(100, 6))):
        np.testing.assert_allclose(_onnx(out / "mlp.onnx", rows), _eager(model, rows),
                                   atol=1e-5)
    assert os.listdir(out) == ["mlp.onnx"]  # no staging folder, no external data
    assert "parity output on the random (batch 64)" in str(result)
    assert result.to_dict()["latency_ms"]["torch"].keys() == {"1", "64"}


def test_pt2_loads_back_with_torch_export_and_takes_any_batch(out: Path) -> None:
    model = mlp()
    result = mlc.export(model, str(out / "mlp.pt2"), example=ROWS[:1])  # one row too
    assert result.format == "pt2" and result.opset is None
    assert [(p.input, p.batch) for p in result.parity] == [("example", 1), ("random", 64)]
    assert set(result.latency_ms) == {"torch.export", "torch"}
    loaded = torch.export.load(out / "mlp.pt2").module()
    for n in (1, 7):
        x = torch.randn(n, 6)
        torch.testing.assert_close(loaded(x), model(x))


def test_every_model_form_score_takes(out: Path) -> None:
    model = mlp()
    torch.save(model, out / "saved.pt")
    mlc.export(model, out / "program.pt2", example=ROWS, check=False)
    mlc.register(model, "export-forms", alias="champion")
    expected = _eager(model, ROWS)
    for i, form in enumerate([str(out / "saved.pt"), str(out / "program.pt2"),
                              "models:/export-forms@champion",
                              lambda x: model(x)]):  # a plain callable
        path = out / f"form{i}.onnx"
        result = mlc.export(form, path, example=ROWS)
        assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
        np.testing.assert_allclose(_onnx(path, ROWS), expected, atol=1e-5)


def test_example_forms_and_the_default_from_the_first_linear_layer(out: Path) -> None:
    model = mlp()
    np.save(out / "rows.npy", ROWS)
    by_file = mlc.export(model, out / "a.onnx", example=str(out / "rows.npy"))
    assert by_file.parity[0].batch == 4
    by_tensor = mlc.export(model, out / "b.onnx", example=torch.as_tensor(ROWS).double())
    assert by_tensor.max_abs_diff is not None and by_tensor.max_abs_diff <= 1e-4
    inferred = mlc.export(model, out / "c.onnx")  # Linear(6, ...) first: 8 random rows
    assert inferred.parity[0].batch == 8
    random = mlc.export(model, out / "d.onnx", features=6, check=False)
    assert random.parity == () and random.latency_ms == {}


def test_model_mode_is_restored_and_dropout_is_off_in_the_export(out: Path) -> None:
    model = TwoHeads().train()
    x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    ids = np.array([[1, 2], [3, 4], [9, 0]])
    result = mlc.export(model, out / "two.onnx", example=(x, ids))
    assert model.training  # put back as it was
    assert result.inputs == ("input_0", "input_1")
    assert result.outputs == ("logits", "score")
    assert {p.output for p in result.parity} == {"logits", "score"}
    assert all(p.ok for p in result.parity)
    session = ort.InferenceSession(str(out / "two.onnx"))
    logits, score = session.run(None, {"input_0": x, "input_1": ids})
    model.eval()
    with torch.no_grad():
        expected = model(torch.as_tensor(x), torch.as_tensor(ids))
    np.testing.assert_allclose(logits, expected["logits"].numpy(), atol=1e-5)
    np.testing.assert_allclose(score, expected["score"].numpy(), atol=1e-5)


def test_int8_quantization_reports_what_it_changed(out: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    rows = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    result = mlc.export(model, out / "q.onnx", example=rows, quantize="int8")
    assert result.quantize == "int8"
    assert result.fp32_size is not None and result.size < result.fp32_size / 2
    assert all(p.ok for p in result.parity)  # the float model was checked before quantizing
    [change] = result.quantization
    got = _onnx(out / "q.onnx", rows)
    diff = np.abs(got - _eager(model, rows))
    assert change.max_abs_diff == pytest.approx(float(diff.max()), rel=1e-5)
    assert change.mean_abs_diff == pytest.approx(float(diff.mean()), rel=1e-5)
    assert 0 < change.max_abs_diff < 0.1  # not hidden: really int8, and still close
    assert change.top1_agreement is not None and 0.9 <= change.top1_agreement <= 1.0
    assert set(result.latency_ms) == {"onnxruntime", "onnxruntime fp32", "torch"}
    assert "int8 changes output on the example by up to" in str(result)
    proto = onnx.load(out / "q.onnx")
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in proto.graph.node)
    assert sorted(os.listdir(out)) == ["q.onnx"]  # the float model was not left behind


def test_an_existing_file_is_replaced_whole(out: Path) -> None:
    (out / "m.onnx").write_bytes(b"old")
    mlc.export(mlp(), out / "m.onnx", example=ROWS, check=False)
    assert onnx.load(out / "m.onnx").graph.input[0].name == "input"
