"""Saved models as bytes: reading a ``torch.save`` or ``torch.export`` file, and building the
callable model from its bytes. Shared by scoring (which ships the bytes to workers) and the
registry (which logs the model)."""

from __future__ import annotations

import io
from typing import Any

#: How bytes become a model: cloudpickle, torch.load, or torch.export.load.
LOADERS = ("pickle", "torch", "export")


def read_file(path: str) -> tuple[bytes, str]:
    """The bytes of the saved model at ``path`` (any fsspec URL) and their loader."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f"cannot read the model file {path!r} ({e}).") from None
    return data, "export" if path.endswith(".pt2") else "torch"


def build(data: bytes, loader: str) -> Any:
    """The callable model from its bytes (modules in eval mode); ValueError in one sentence
    for bytes that hold no model."""
    import torch

    if loader == "pickle":
        import cloudpickle

        model = cloudpickle.loads(data)
    elif loader == "export":
        try:
            model = torch.export.load(io.BytesIO(data)).module()
        except Exception as e:
            raise ValueError(f"the .pt2 file is not a torch.export program ({e}).") from None
    else:
        try:
            model = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
        except Exception as e:
            raise ValueError(f"the model file is not a saved torch model ({e}).") from None
        if isinstance(model, dict):
            raise ValueError(
                "the model file holds a state_dict, not a model; build the model, call"
                " load_state_dict on it, and pass the module instead."
            )
    if not callable(model):
        raise ValueError(f"the model file holds a {type(model).__name__}, not a model.")
    if isinstance(model, torch.nn.Module) and loader != "export":
        model.eval()  # exported programs are traced in eval mode already
    return model
