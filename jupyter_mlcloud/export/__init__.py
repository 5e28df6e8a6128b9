"""Edge export: a model as an ONNX file (for onnxruntime, without torch) or a ``torch.export``
``.pt2`` program, with a dynamic batch dimension, checked against the eager model.

    import jupyter_mlcloud as mlc
    result = mlc.export(model, "digits.onnx", example=x)     # parity-checked
    result.parity, result.latency_ms, result.size, result.opset

Nothing here loads torch or onnx until ``export`` is called.
"""

from __future__ import annotations

from .api import export
from .failures import ExportError
from .result import ExportResult, Parity, QuantizationChange

__all__ = ["ExportError", "ExportResult", "Parity", "QuantizationChange", "export"]
