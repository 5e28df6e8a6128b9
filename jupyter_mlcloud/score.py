"""Batch scoring of dask-backed data with a PyTorch model on the cluster's workers.

The model is serialized once, broadcast once to every worker (``Client.scatter``) and loaded
there once per content hash; every block reuses it. It is never captured in each task, so
the scheduler never holds one copy per block.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import clusters

_loaded: dict[str, Any] = {}  # on a worker: content hash -> model, loaded once
_load_counts: dict[str, int] = {}  # on a worker: how often each model was loaded (tests)
_load_lock = threading.Lock()


@dataclass
class ModelBlob:
    """A model as bytes plus its content hash: what crosses to the workers."""

    data: bytes
    digest: str

    @classmethod
    def of(cls, model: Any) -> ModelBlob:
        import torch

        buffer = io.BytesIO()
        torch.save(model, buffer)
        data = buffer.getvalue()
        return cls(data, hashlib.sha256(data).hexdigest())

    def model(self) -> Any:
        """The model, loaded on first use in this process and cached by content hash."""
        import torch

        with _load_lock:
            if self.digest not in _loaded:
                model = torch.load(io.BytesIO(self.data), weights_only=False)
                model.eval()
                _loaded[self.digest] = model
                _load_counts[self.digest] = _load_counts.get(self.digest, 0) + 1
            return _loaded[self.digest]


def load_counts() -> dict[str, int]:
    """On a worker: how many times each model was loaded there."""
    with _load_lock:
        return dict(_load_counts)


def _predict(blob: ModelBlob, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Score ``rows`` (samples x features) in batches of ``batch_size``."""
    import torch

    model = blob.model()
    parameters = list(model.parameters())
    dtype = parameters[0].dtype if parameters else torch.float32
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = torch.as_tensor(np.ascontiguousarray(rows[start : start + batch_size]),
                                    dtype=dtype)
            result = model(batch)
            outputs.append(result.reshape(len(batch), -1).cpu().numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)


def _score_block(block: np.ndarray, blob: ModelBlob, batch_size: int) -> np.ndarray:
    return _predict(blob, block, batch_size)


def _output_width(model: Any, width: int) -> tuple[int, Any]:
    """Run the model on one zero row: its output width and dtype, or a clear error."""
    import torch

    parameters = list(model.parameters())
    dtype = parameters[0].dtype if parameters else torch.float32
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    if first is not None and first.in_features != width:
        raise ValueError(
            f"the data has {width} feature(s) but the model's first layer expects"
            f" {first.in_features}; pass features= to pick the right ones."
        )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, width, dtype=dtype))
    except Exception as e:
        raise ValueError(
            f"the model cannot score rows of {width} feature(s): {str(e).splitlines()[0]}."
        ) from None
    finally:
        model.train(was_training)
    return int(out.reshape(1, -1).shape[1]), out.numpy().dtype


def _as_matrix(data: Any, sample_dim: str | None, features: Sequence[str] | None) -> Any:
    """(dask array samples x features, xarray template or None) for every supported input."""
    import dask.array as da
    import xarray as xr

    if isinstance(data, xr.Dataset):
        if not features:
            raise ValueError(
                f"an xarray Dataset needs features=[variable names]; it has"
                f" {list(data.data_vars)}."
            )
        missing = [f for f in features if f not in data.data_vars]
        if missing:
            raise ValueError(f"features {missing} are not in the Dataset; it has"
                             f" {list(data.data_vars)}.")
        dim = sample_dim or data[features[0]].dims[0]
        stacked = xr.concat([data[f] for f in features], dim="feature").transpose(dim, "feature")
        data = stacked
    if isinstance(data, xr.DataArray):
        dim = sample_dim or data.dims[0]
        if dim not in data.dims:
            raise ValueError(f"sample dimension {dim!r} is not among the data's dims"
                             f" {tuple(data.dims)}; pass sample_dim= with one of them.")
        if data.ndim != 2:
            raise ValueError(f"a DataArray to score needs 2 dims (samples, features), got"
                             f" {tuple(data.dims)}.")
        data = data.transpose(dim, ...)
        if not np.issubdtype(data.dtype, np.number):
            raise ValueError(f"features must be numeric, got dtype {data.dtype}.")
        array = data.data if isinstance(data.data, da.Array) else da.from_array(data.values)
        return array, data
    if isinstance(data, np.ndarray) and data.ndim == 2:
        data = da.from_array(data, chunks=(max(1, len(data) // 8), -1))  # ~8 blocks
    elif isinstance(data, np.ndarray):
        data = da.from_array(data)
    if isinstance(data, da.Array):
        if data.ndim != 2:
            raise ValueError(f"an array to score needs 2 dims (samples, features), got"
                             f" shape {data.shape}.")
        if not np.issubdtype(data.dtype, np.number):
            raise ValueError(f"features must be numeric, got dtype {data.dtype}.")
        return data, None
    raise ValueError(
        f"cannot score a {type(data).__name__}; pass an xarray DataArray or Dataset, a dask or"
        " numpy array."
    )


def score(
    model: Any,
    data: Any,
    *,
    sample_dim: str | None = None,
    features: Sequence[str] | None = None,
    batch_size: int = 1024,
    output: str | None = None,
    cluster: Any = None,
) -> Any:
    """Score ``data`` with ``model`` on the cluster, lazily, as the same kind of container.

    ``data``: an xarray ``DataArray`` (sample_dim, feature dim), an xarray ``Dataset``
    (``features=[variables]``, stacked in that order), a dask array or a numpy array (rows
    are samples). Returns an xarray ``DataArray`` with dims ``(sample_dim, "output")`` and
    the sample coordinates for xarray input, else a dask array. ``model``: a
    ``torch.nn.Module``, sent to each worker once and reused by every block.
    """
    import dask.array as da
    import torch

    if output is not None:
        raise ValueError(
            f"output={output!r} cannot be used yet: writing to zarr/parquet is not available in"
            " this version; call .to_zarr() on the lazy result instead."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    client = clusters.resolve_client(cluster)
    array, template = _as_matrix(data, sample_dim, features)
    width, out_dtype = _output_width(model, int(array.shape[1]))
    array = array.rechunk({1: -1})
    blob = client.scatter(ModelBlob.of(model), broadcast=True, hash=False)
    scores = da.map_blocks(
        _score_block, array, blob, batch_size,
        dtype=out_dtype, chunks=(array.chunks[0], (width,)),
    )
    if template is None:
        return scores
    import xarray as xr

    dim = template.dims[0]
    return xr.DataArray(scores, dims=(dim, "output"), coords={dim: template[dim]},
                        name="score")
