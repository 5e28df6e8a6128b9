"""The ``.pt2`` file: the exported program saved by ``torch.export.save``, and run back the way
a user loads it (``torch.export.load(path).module()``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .failures import ExportError, explain
from .program import Traced, flatten, quiet


def write(traced: Traced, path: str) -> None:
    """Save ``traced``'s program at ``path``; ExportError if it cannot be serialized."""
    import torch

    try:
        with quiet():
            torch.export.save(traced.program, path)
    except Exception as e:
        raise ExportError(explain(e, "pt2", traced.program)) from None


def runner(path: str, threads: int) -> Callable[[tuple[np.ndarray, ...]], list[np.ndarray]]:
    """A function running the program saved at ``path`` on arrays in input order (floats
    already in the program's dtype); its outputs in output order. ``threads`` is for
    symmetry with onnxruntime: torch's own thread count applies."""
    import torch

    with quiet():
        module = torch.export.load(path).module()

    def run(arrays: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*(torch.as_tensor(a) for a in arrays))
        return [t.detach().numpy() for _, t in flatten(out)]

    return run
