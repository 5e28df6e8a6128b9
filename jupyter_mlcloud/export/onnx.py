"""The ONNX file: written from the exported program by torch's dynamo exporter (onnx and
onnxscript), run in onnxruntime, and quantized to int8 weights by onnxruntime."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .failures import ExportError, explain
from .program import Traced, quiet

#: Over this many bytes of weights, tensors go to a ``.data`` file beside the model
#: (a protobuf file holds at most 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

BATCH = "batch"


def _weight_bytes(program: Any) -> int:
    return sum(t.numel() * t.element_size() for t in program.state_dict.values())


def write(traced: Traced, path: str) -> None:
    """Convert ``traced`` to ONNX at ``path`` (and ``path.data`` for big models), with the
    batch dimension of every input and output named ``batch``; ExportError if it cannot."""
    import torch

    external = _weight_bytes(traced.program) > EXTERNAL_DATA_BYTES
    try:
        with quiet():
            onnx_program = torch.onnx.export(
                traced.program, dynamo=True, verbose=False, external_data=external,
                input_names=list(traced.input_names), output_names=list(traced.output_names))
            assert onnx_program is not None
            onnx_program.save(path, external_data=external)
    except Exception as e:
        raise ExportError(explain(e, "onnx", traced.program)) from None
    _name_batch(path)


def _name_batch(path: str) -> None:
    """Call the exporter's symbol for dimension 0 (``s31`` or so) ``batch`` everywhere."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    first = model.graph.input[0].type.tensor_type.shape.dim[0]
    symbol = first.dim_param
    if not symbol or symbol == BATCH:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH
    onnx.save(model, path)


def opset(path: str) -> int | None:
    """The default-domain opset the model at ``path`` was written for."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")),
                None)


def runner(path: str, threads: int) -> Callable[[tuple[np.ndarray, ...]], list[np.ndarray]]:
    """A function running the model at ``path`` in onnxruntime on the CPU, with ``threads``
    threads for an operator, on arrays in input order; its outputs in output order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # No busy-waiting between calls: it would take the cores eager torch is timed on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(arrays: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        return list(session.run(None, dict(zip(names, arrays, strict=True))))

    return run


def quantize_int8(source: str, target: str) -> None:
    """Dynamic int8 quantization (int8 weights, activations quantized per call) of the model
    at ``source`` into ``target``."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    external = os.path.exists(source + ".data")
    prepared = target + ".pre.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs its advice on the root logger
    try:
        quant_pre_process(source, prepared, skip_symbolic_shape=True,
                          save_as_external_data=external)
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8,
                         use_external_data_format=external)
    finally:
        root.setLevel(level)
        for leftover in (prepared, prepared + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)
