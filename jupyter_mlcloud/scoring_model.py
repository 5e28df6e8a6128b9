"""The model side of scoring: what crosses to the workers once, and how blocks use it.

A model (a ``torch.nn.Module``, a saved file, or any callable) becomes a :class:`ModelBlob`:
bytes plus their SHA-256. The blob is broadcast to every worker once; there it is loaded once
per hash and cached, and every block of every scoring call reuses it.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

DEVICES = ("auto", "cpu", "cuda")

_loaded: dict[str, Any] = {}  # on a worker: content hash -> ready model
_load_counts: dict[str, int] = {}  # on a worker: loads per hash (each model once)
_load_lock = threading.Lock()


@dataclass
class ModelBlob:
    """A model as bytes, how to load them (``pickle``, ``torch`` or ``export``), their hash."""

    data: bytes
    loader: str
    digest: str

    @classmethod
    def of(cls, model: Any) -> ModelBlob:
        """From a module or callable (cloudpickled: notebook classes travel by value), or a path
        to a ``torch.save`` file or a ``torch.export`` ``.pt2`` file."""
        if isinstance(model, (str, os.PathLike)):
            return cls._from_file(os.fspath(model))
        if not callable(model):
            raise ValueError(
                f"model must be a torch.nn.Module, a callable or a path to a saved model, got"
                f" {type(model).__name__}."
            )
        import cloudpickle

        return cls._make(cloudpickle.dumps(model), "pickle")

    @classmethod
    def _from_file(cls, path: str) -> ModelBlob:
        import fsspec

        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"cannot read the model file {path!r} ({e}).") from None
        blob = cls._make(data, "export" if path.endswith(".pt2") else "torch")
        blob.load()  # fail here, on the client, not on every worker
        return blob

    @classmethod
    def _make(cls, data: bytes, loader: str) -> ModelBlob:
        return cls(data, loader, hashlib.sha256(loader.encode() + data).hexdigest())

    def load(self) -> Any:
        """The callable model, built from the bytes (no caching)."""
        import torch

        if self.loader == "pickle":
            import cloudpickle

            model = cloudpickle.loads(self.data)
        elif self.loader == "export":
            try:
                model = torch.export.load(io.BytesIO(self.data)).module()
            except Exception as e:
                raise ValueError(f"the .pt2 file is not a torch.export program ({e}).") from None
        else:
            try:
                model = torch.load(io.BytesIO(self.data), weights_only=False, map_location="cpu")
            except Exception as e:
                raise ValueError(f"the model file is not a saved torch model ({e}).") from None
            if isinstance(model, dict):
                raise ValueError(
                    "the model file holds a state_dict, not a model; build the model, call"
                    " load_state_dict on it, and pass the module instead."
                )
        if not callable(model):
            raise ValueError(f"the model file holds a {type(model).__name__}, not a model.")
        if isinstance(model, torch.nn.Module) and self.loader != "export":
            model.eval()  # exported programs are traced in eval mode already
        return model

    def cached(self) -> Any:
        """The model, loaded on first use in this process and cached by content hash."""
        with _load_lock:
            if self.digest not in _loaded:
                _loaded[self.digest] = self.load()
                _load_counts[self.digest] = _load_counts.get(self.digest, 0) + 1
            return _loaded[self.digest]


def load_counts() -> dict[str, int]:
    """On a worker: how many times each model (by hash) was loaded there."""
    with _load_lock:
        return dict(_load_counts)


def parameter_dtype(model: Any) -> Any:
    """The dtype inputs are cast to by default: the first parameter's, else float32."""
    import torch

    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.dtype
    return torch.float32


def resolve_dtype(dtype: Any) -> Any:
    """``None`` or a torch dtype name (``"float32"``, ``"bfloat16"``...) -> torch dtype."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(
            f"dtype {dtype!r} is not a floating torch dtype; use float32, float64, float16 or"
            " bfloat16."
        )
    return found


def predict(model: Any, rows: np.ndarray, batch_size: int, device: str = "auto",
            dtype: Any = None) -> np.ndarray:
    """Score ``rows`` (samples x features) in batches, in inference mode, on ``device``.

    ``device="auto"`` uses this worker's GPU when it has one. On a GPU, ``dtype=bfloat16`` or
    ``float16`` runs under autocast; elsewhere inputs are cast to ``dtype`` (default: the
    model's parameter dtype).
    """
    import torch

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    target = torch.device("cuda" if use_cuda else "cpu")
    if isinstance(model, torch.nn.Module):
        model = model.to(target)
    low_precision = dtype in (torch.bfloat16, torch.float16)
    input_dtype = parameter_dtype(model) if (dtype is None or low_precision) else dtype
    autocast = torch.autocast("cuda", dtype=dtype) if (use_cuda and low_precision) else None
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = torch.as_tensor(np.ascontiguousarray(rows[start : start + batch_size]))
            batch = batch.to(target, dtype=input_dtype)
            if autocast is not None:
                with autocast:
                    result = model(batch)
            else:
                result = model(batch)
            outputs.append(result.reshape(len(batch), -1).float().cpu().numpy()
                           if low_precision else result.reshape(len(batch), -1).cpu().numpy())
    if not outputs:
        return np.zeros((0, 1), dtype=np.float32)
    return np.concatenate(outputs)


def score_block(block: np.ndarray, blob: ModelBlob, batch_size: int, device: str,
                dtype: Any) -> np.ndarray:
    """One block of rows, on a worker, with the cached model."""
    return predict(blob.cached(), np.asarray(block), batch_size, device, dtype)


def output_shape(model: Any, width: int, dtype: Any) -> tuple[int, np.dtype]:
    """Run the model on one zero row here: its output width and dtype, or a clear error."""
    import torch

    first = None
    if isinstance(model, torch.nn.Module):
        first = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    if first is not None and first.in_features != width:
        raise ValueError(
            f"the data has {width} feature(s) but the model's first layer expects"
            f" {first.in_features}; pass features= to pick the right ones."
        )
    try:
        out = predict(model, np.zeros((1, width)), 1, "cpu", dtype)
    except Exception as e:
        raise ValueError(
            f"the model cannot score rows of {width} feature(s): {str(e).splitlines()[0]}."
        ) from None
    return int(out.shape[1]), out.dtype
