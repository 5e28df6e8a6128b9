"""The model side of scoring: what crosses to the workers once, and how blocks use it.

A model (a ``torch.nn.Module``, a saved file, or any callable) becomes a :class:`ModelBlob`:
bytes plus their SHA-256. The blob is broadcast to every worker once (:func:`ship`); there it
is loaded once per hash and cached, and every block of every scoring call reuses it. Tasks
carry only a :class:`ModelRef` to it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .. import savedmodel

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
        """From a module or callable (cloudpickled: notebook classes travel by value), a path
        to a ``torch.save`` file or a ``torch.export`` ``.pt2`` file, or an MLflow model URI
        (``models:/name/3``, ``models:/name@alias``, ``runs:/id/model``); a blob is itself."""
        from ..tracking import registry

        if isinstance(model, ModelBlob):
            return model
        if registry.is_model_uri(model):
            model = registry.load(model)
        elif isinstance(model, (str, os.PathLike)):
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
        blob = cls._make(*savedmodel.read_file(path))
        blob.load()  # fail here, on the client, not on every worker
        return blob

    @classmethod
    def _make(cls, data: bytes, loader: str) -> ModelBlob:
        return cls(data, loader, hashlib.sha256(loader.encode() + data).hexdigest())

    def load(self) -> Any:
        """The callable model, built from the bytes (no caching)."""
        return savedmodel.build(self.data, self.loader)


class ModelRef:
    """What each scoring task carries instead of the model: its hash and the key of the copy
    broadcast to the workers.

    Deliberately not a task-graph dependency: a dependency held by every worker makes every
    worker a candidate for every block, and the scheduler then moves whole blocks between
    workers to even out their queues (dask/distributed#6570). Without it each block is scored
    where it lies. The future that keeps the broadcast copy alive stays in this process, in
    the ref held by the scores' graph; pickling drops it.
    """

    __slots__ = ("digest", "key", "future")

    def __init__(self, digest: str, key: str, future: Any = None) -> None:
        self.digest, self.key, self.future = digest, key, future

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return ModelRef, (self.digest, self.key)

    def __copy__(self) -> ModelRef:
        return self  # immutable; a copy must keep the future

    def __deepcopy__(self, memo: dict[int, Any]) -> ModelRef:
        return self

    def __dask_tokenize__(self) -> tuple[str, str]:
        return (self.digest, self.key)

    def __repr__(self) -> str:
        return f"ModelRef({self.digest[:12]})"


def ship(client: Any, blob: ModelBlob) -> ModelRef:
    """Broadcast ``blob`` to every worker of ``client``; the ref that tasks carry to it.

    A fresh copy per call, so each call's tasks have their own keys (a failed block of an
    earlier call, still held somewhere, is never handed back as this call's result).
    """
    future = client.scatter(blob, broadcast=True, hash=False)
    return ModelRef(blob.digest, future.key, future)


class _Held:
    """A key already in cluster memory, as a task argument: the task depends on it."""

    __dask_future__ = True

    def __init__(self, key: str) -> None:
        self.key = key


def _same(blob: ModelBlob) -> ModelBlob:
    return blob


def _fetch(ref: ModelRef) -> ModelBlob:
    """On a worker: the broadcast blob, from this worker's memory or, on a worker that joined
    or restarted since the broadcast, through a task that depends on it."""
    from distributed import get_worker, worker_client

    try:
        worker = get_worker()
    except ValueError:
        raise RuntimeError(
            "scores from mlc.score are computed on the cluster's workers; call .compute()"
            " without scheduler=."
        ) from None
    if ref.key in worker.data:
        return cast(ModelBlob, worker.data[ref.key])
    # Seceded from the worker's thread pool while waiting: the helper may run right here.
    with worker_client() as client:
        try:
            blob: ModelBlob = client.submit(_same, _Held(ref.key), pure=False).result()
            return blob
        except Exception:
            raise RuntimeError(
                f"the model {ref.digest[:12]} of these scores is no longer on the cluster (its"
                " workers restarted, or nothing holds the scores any more); call mlc.score"
                " again."
            ) from None


def cached_model(ref: ModelRef) -> Any:
    """On a worker: the model, loaded on first use in this process and cached by hash."""
    with _load_lock:
        if ref.digest in _loaded:
            return _loaded[ref.digest]
    # Fetched outside the lock: a fetch gives up its thread while it waits for a helper
    # task, and a block waiting for the lock in that thread would starve the helper.
    blob = _fetch(ref)
    with _load_lock:
        if ref.digest not in _loaded:
            _loaded[ref.digest] = blob.load()
            _load_counts[ref.digest] = _load_counts.get(ref.digest, 0) + 1
        return _loaded[ref.digest]


def load_counts() -> dict[str, int]:
    """On a worker: how many times each model (by hash) was loaded there."""
    with _load_lock:
        return dict(_load_counts)


def outputs_of(model: Any, rows: np.ndarray, torch_dtype: Any = None) -> np.ndarray:
    """``model``'s outputs on ``rows`` here (a few thousand rows at most), as 2-D float64."""
    import torch

    with torch.inference_mode():
        batch = torch.from_numpy(np.ascontiguousarray(rows)).to(
            torch_dtype or parameter_dtype(model))
        out = model(batch)
    return np.asarray(out.float().numpy(), dtype=np.float64).reshape(len(rows), -1)


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


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def check_device(client: Any, device: str) -> None:
    """Refuse ``device="cuda"`` up front when no worker of ``client`` has a usable GPU (the
    blocks would otherwise each fail on their worker)."""
    if device == "cuda" and not any(client.run(_cuda_available).values()):
        raise ValueError(
            "device='cuda' but no worker of the cluster has a GPU torch can use; use"
            " device='auto' (a worker's GPU where it has one) or device='cpu'."
        )


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
    total = len(rows)
    if any(stride < 0 for stride in rows.strides):  # torch views no reversed arrays
        rows = np.ascontiguousarray(rows)
    source = torch.as_tensor(rows)  # a view: batches are sliced from it without copies
    # Scores go straight into one array made at the first batch, on the device (one copy
    # back at the end, no sync per batch). A batch needing a cast (float64 data, float32
    # model) or a row-major copy goes through one staging buffer reused by every batch.
    # Nothing of a batch outlives it: fresh per-batch buffers, or outputs kept alive between
    # batches, made glibc return and re-fault memory, costing a quarter to a half more CPU
    # per row than a bare loop.
    scores = staging = None
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            batch = source[start:stop]
            if batch.dtype != input_dtype or not batch.is_contiguous():
                if staging is None:
                    staging = torch.empty((min(batch_size, total), *source.shape[1:]),
                                          dtype=input_dtype)
                batch = staging[: stop - start].copy_(batch)
            batch = batch.to(target)  # a copy to the GPU; nothing on the CPU
            if autocast is not None:
                with autocast:
                    result = model(batch)
            else:
                result = model(batch)
            result = result.reshape(stop - start, -1)
            if scores is None:
                out_dtype = torch.float32 if low_precision else result.dtype
                scores = torch.empty((total, result.shape[1]), dtype=out_dtype, device=target)
            scores[start:stop] = result  # before the staging buffer is overwritten
            del batch, result
    if scores is None:
        return np.zeros((0, 1), dtype=np.float32)
    return scores.cpu().numpy()


def score_block(block: np.ndarray, ref: ModelRef, batch_size: int, device: str,
                dtype: Any) -> np.ndarray:
    """One block of rows, on a worker, with the cached model."""
    return predict(cached_model(ref), np.asarray(block), batch_size, device, dtype)


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
