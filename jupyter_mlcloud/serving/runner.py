"""The model of a replica, on its worker: built once from the shipped bytes, moved to the
worker's GPU when it has one, called on batches in ``torch.inference_mode``. torch is
imported on first use, so naming this module loads no torch in a kernel."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..scoring.model import DEVICES, ModelBlob, parameter_dtype
from .protocol import TensorSpec, datatype_of

INPUT_NAME = "input"
OUTPUT_NAME = "output"


def _first_linear_width(model: Any) -> int | None:
    import torch

    if isinstance(model, torch.nn.Module):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                return int(module.in_features)
    return None


class ModelRunner:
    """``blob``'s model on ``device`` (``"auto"``: the GPU when torch sees one), taking rows
    of ``features`` values (default: the first ``Linear`` layer's width; unknown: any).

    Loading runs the model once on a zero row, so a model that cannot take the rows fails
    here, at start, and the output's width and dtype are known for metadata.
    """

    def __init__(self, blob: ModelBlob, *, device: str = "auto",
                 features: int | None = None) -> None:
        import torch

        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}.")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but this worker has no GPU torch can use; use"
                             " device='auto' or 'cpu'.")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = "cuda" if use_cuda else "cpu"
        model = blob.load()
        if isinstance(model, torch.nn.Module):
            model = model.to(self.device).eval()
        self.model = model
        self.version_digest = blob.digest
        torch_dtype = parameter_dtype(model)
        self.input_dtype = np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)
        width = features if features is not None else _first_linear_width(model)
        self.features = width
        self.input = TensorSpec(INPUT_NAME, datatype_of(self.input_dtype), (-1, width or -1))
        self.output = TensorSpec(OUTPUT_NAME, "FP32", (-1, -1))
        if width is not None:
            try:
                probe = self(np.zeros((1, width), dtype=self.input_dtype))
            except Exception as e:
                raise ValueError(f"the model cannot take rows of {width} feature(s):"
                                 f" {str(e).splitlines()[0] if str(e) else type(e).__name__}."
                                 ) from None
            self.output = TensorSpec(OUTPUT_NAME, datatype_of(probe.dtype),
                                     (-1, int(probe.shape[1])))

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """The model's outputs for ``rows`` (n x features), as an n x k numpy array."""
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)
            result = self.model(batch)
            return result.reshape(len(rows), -1).cpu().numpy()
