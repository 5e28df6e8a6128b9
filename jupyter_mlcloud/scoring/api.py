"""Batch scoring of large datasets with a PyTorch model on the cluster's workers.

``score`` returns the scores lazily as the same kind of container it was given (xarray in,
xarray out with the sample coordinates; dask DataFrame in, dask DataFrame out), or writes them
to zarr / parquet, resumably. The model crosses to each worker once (see
:mod:`.model`); blocks are scored in batches inside each task.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..cluster import api as clusters
from ..cluster import info as cluster_info
from ..cost import Budget, BudgetReached, Cost, meter_for, parse_budget
from ..monitoring.reference import Reference
from . import storage
from .model import (
    DEVICES,
    ModelBlob,
    ModelRef,
    check_device,
    output_shape,
    outputs_of,
    resolve_dtype,
    score_block,
    ship,
)


@dataclass
class ScoreReport:
    """What a written scoring run did: ``summary`` and where the scores are (``open()``)."""

    output: str
    format: str
    summary: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None  # the MLflow run recording the job (track=True)
    drift: Any = None  # with reference=: the inputs' and outputs' drift, one row a feature
    #: What the job used: the cluster's workers × its wall time (and GPU-seconds, cost).
    cost: Cost | None = None

    def open(self) -> Any:
        """The written scores, lazily: an xarray DataArray (zarr) or dask DataFrame (parquet)."""
        if self.format == "parquet":
            import dask.dataframe as dd

            return dd.read_parquet(self.output)
        import xarray as xr

        return xr.open_zarr(self.output)["score"]


def _check_numeric(dtype: Any, what: str) -> None:
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if not is_numeric_dtype(dtype) or is_bool_dtype(dtype):
        raise ValueError(f"{what} must be numeric, got dtype {dtype}.")


def _matrix(data: Any, sample_dim: str | None, features: Sequence[str] | None) -> Any:
    """(dask array samples x features with regular row blocks, xarray template or None)."""
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
            raise ValueError(
                f"features {missing} are not in the Dataset; it has {list(data.data_vars)}."
            )
        dim = sample_dim or data[features[0]].dims[0]
        if any(data[f].dims != (dim,) for f in features):
            raise ValueError(f"each feature variable must have the one dim {dim!r}.")
        data = xr.concat([data[f] for f in features], dim="feature").transpose(dim, "feature")
    if isinstance(data, xr.DataArray):
        dim = sample_dim or data.dims[0]
        if dim not in data.dims:
            raise ValueError(
                f"sample dimension {dim!r} is not among the data's dims {tuple(data.dims)}; pass"
                " sample_dim= with one of them."
            )
        if data.ndim != 2:
            raise ValueError(
                f"a DataArray to score needs 2 dims (samples, features), got {tuple(data.dims)}."
            )
        data = data.transpose(dim, ...)
        array = data.data if isinstance(data.data, da.Array) else da.from_array(data.values)
        template: Any = data
    elif isinstance(data, (np.ndarray, da.Array)):
        if data.ndim != 2:
            raise ValueError(
                f"an array to score needs 2 dims (samples, features), got shape {data.shape}."
            )
        array = data if isinstance(data, da.Array) else da.from_array(data)
        template = None
    else:
        raise ValueError(
            f"cannot score a {type(data).__name__}; pass an xarray DataArray or Dataset, a dask"
            " or numpy array, a dask or pandas DataFrame, or a path to zarr, parquet or netCDF."
        )
    _check_numeric(array.dtype, "features")
    if array.numblocks[0] == 1 and array.shape[0] > 1:  # in-memory data: ~8 blocks
        rows = max(1, -(-array.shape[0] // 8))
    else:
        rows = array.chunks[0][0]
    return array.rechunk({0: rows, 1: -1}), template


def _score_frame(frame: Any, ref: ModelRef, batch_size: int, device: str, dtype: Any,
                 columns: list[str]) -> Any:
    import pandas as pd

    values = score_block(frame.to_numpy(), ref, batch_size, device, dtype)
    return pd.DataFrame(values.reshape(len(frame), -1), index=frame.index, columns=columns)


def _fingerprint(*parts: Any) -> str:
    from dask.base import tokenize

    return hashlib.sha256(tokenize(*parts).encode()).hexdigest()


def score(
    model: Any,
    data: Any,
    *,
    sample_dim: str | None = None,
    features: Sequence[str] | None = None,
    batch_size: int = 1024,
    output: str | None = None,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str | None = None,
    cluster: Any = None,
    progress: bool = True,
    track: bool = True,
    reference: Any = None,
    budget: float | str | None = None,
) -> Any:
    """Score ``data`` with ``model`` on the cluster's workers.

    ``data``: an xarray ``DataArray`` with dims (sample_dim, one feature dim); an xarray
    ``Dataset`` (``features=[variables]``, each along sample_dim, stacked in that order); a
    dask or numpy array (rows are samples); a dask or pandas DataFrame (``features=[columns]``);
    or a path/URL of a zarr store, parquet dataset or netCDF file.

    ``model``: a ``torch.nn.Module``, a callable on a batch tensor, or a path to a
    ``torch.save``-d model or a ``torch.export`` ``.pt2`` file. It is sent to each worker once.
    Inference runs in ``torch.inference_mode`` in batches of ``batch_size`` on the worker's GPU
    when it has one (``device="auto"``; or ``"cpu"``, ``"cuda"``); ``dtype`` casts the inputs
    (``bfloat16``/``float16`` autocast on GPUs).

    Without ``output``: the scores, lazily, as the same kind of container (xarray with dims
    ``(sample_dim, "output")`` and the sample coordinates; a dask DataFrame with columns
    ``score`` or ``score_0..``; else a dask array). With ``output`` (``.zarr`` or, for
    DataFrames, ``.parquet``): the scores are written, resuming an interrupted earlier write of
    the same job, and a :class:`ScoreReport` is returned (``.summary``, ``.open()``). With
    ``track`` (default on) a written job is recorded in MLflow, its options as params and its
    summary as metrics (``report.mlflow_run_id``). With ``reference`` (a sample of the inputs
    the model was made for: an array, DataFrame, xarray object or dask collection), the
    report's ``drift`` compares a sample of ``data`` and its scores with it, one row per
    input feature and output (see :func:`jupyter_mlcloud.monitoring.drift.compare`).

    A written job also records what it cost (``report.cost``, and ``worker_seconds``,
    ``gpu_seconds`` and, with the Dask config ``mlcloud.cost.prices``, ``cost`` in its summary
    and MLflow metrics): the cluster's workers × the job's wall time. ``budget`` (with
    ``output``) is a hard stop, a cost or worker time as ``"2h"``, ``"30m"`` or ``"90s"``: once
    reached, the blocks not yet written are cancelled and ``BudgetReached`` says how many were
    written; the same call later resumes with the rest.
    """
    import dask.dataframe as dd
    import pandas as pd

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not allowed; use one of {', '.join(DEVICES)}.")
    if not isinstance(track, bool):
        raise ValueError(f"track must be True or False, got {track!r}.")
    torch_dtype = resolve_dtype(dtype)
    out_format = storage.file_format(output) if output is not None else None
    if reference is not None and output is None:
        raise ValueError("reference= compares the job's inputs in its report: give output= too"
                         " (a .zarr store or .parquet dataset).")
    sample = Reference.of(reference) if reference is not None else None
    limit = parse_budget(budget)
    if limit is not None and output is None:
        raise ValueError("budget= stops a job that writes its scores: give output= too (a"
                         " .zarr store or .parquet dataset).")
    if isinstance(data, str):
        data = storage.open_input(data, features)
    if isinstance(data, pd.DataFrame):
        data = dd.from_pandas(data, npartitions=8)
    is_frame = isinstance(data, dd.DataFrame)
    if out_format is not None and out_format != ("parquet" if is_frame else "zarr"):
        raise ValueError(
            f"output {output!r} must be {'a .parquet dataset' if is_frame else 'a .zarr store'}"
            f" for {'DataFrame' if is_frame else 'array'} input."
        )
    blob = ModelBlob.of(model)
    local_model = blob.load()
    client = clusters.resolve_client(cluster)

    def params() -> dict[str, Any]:  # what a recorded job logs as its MLflow params
        return {"model": model if isinstance(model, str) else type(model).__name__,
                "model_sha256": blob.digest, "output": output, "batch_size": batch_size,
                "device": device, "dtype": dtype, "sample_dim": sample_dim,
                "features": ",".join(features) if features else None}

    check_device(client, device)

    if is_frame:
        if not features:
            raise ValueError(f"a DataFrame needs features=[column names]; it has"
                             f" {list(data.columns)}.")
        missing = [f for f in features if f not in data.columns]
        if missing:
            raise ValueError(f"features {missing} are not columns; it has {list(data.columns)}.")
        frame = data[list(features)]
        for name, column_dtype in frame.dtypes.items():
            _check_numeric(column_dtype, f"feature column {name!r}")
        width, out_dtype = output_shape(local_model, len(features), torch_dtype)
        columns = ["score"] if width == 1 else [f"score_{j}" for j in range(width)]
        shipped = ship(client, blob)
        meta = pd.DataFrame({c: np.array([], dtype=out_dtype) for c in columns})
        scores = frame.map_partitions(_score_frame, shipped, batch_size, device, torch_dtype,
                                      columns, meta=meta)
        if output is None:
            return scores
        fingerprint = _fingerprint(blob.digest, frame, batch_size, device, dtype)
        _prepare(output, fingerprint, overwrite, init=None)
        return _with_drift(_recorded(track, params(), lambda: _write(
            client, scores.to_delayed(), output, "parquet", fingerprint, progress,
            budget=limit)),
            sample, frame, local_model, torch_dtype)

    array, template = _matrix(data, sample_dim, features)
    width, out_dtype = output_shape(local_model, int(array.shape[1]), torch_dtype)
    shipped = ship(client, blob)
    import dask.array as da
    import xarray as xr

    scores = da.map_blocks(score_block, array, shipped, batch_size, device, torch_dtype,
                           dtype=out_dtype, chunks=(array.chunks[0], (width,)))
    dim = template.dims[0] if template is not None else "sample"
    coords = {dim: template[dim]} if template is not None and dim in template.coords else {}
    result = xr.DataArray(scores, dims=(dim, "output"), coords=coords, name="score")
    if output is None:
        return result if template is not None else scores
    fingerprint = _fingerprint(blob.digest, array, batch_size, device, dtype)
    # The store's layout (metadata, coordinates) first; the blocks fill it in.
    _prepare(output, fingerprint, overwrite,
             init=lambda: result.to_dataset().to_zarr(output, compute=False, mode="w"))
    return _with_drift(_recorded(track, params(), lambda: _write(
        client, scores.to_delayed().ravel(), output, "zarr", fingerprint, progress,
        starts=np.cumsum((0,) + array.chunks[0][:-1]), budget=limit)), sample, array,
        local_model,
        torch_dtype)


def _with_drift(report: ScoreReport, reference: Reference | None, data: Any, model: Any,
                torch_dtype: Any) -> ScoreReport:
    """``report`` with the drift of a sample of ``data`` (and ``model``'s outputs on it)
    from ``reference`` (and the outputs on that), when there is one."""
    if reference is None:
        return report
    from ..monitoring.drift import compare

    current = Reference.of(data, max_rows=len(reference.values), seed=1)
    if current.values.shape[1] != reference.values.shape[1]:
        raise ValueError(f"the reference has {reference.values.shape[1]} feature(s) and the"
                         f" data {current.values.shape[1]}; give a reference like the data.")
    ref_out, cur_out = (outputs_of(model, rows, torch_dtype)
                        for rows in (reference.values, current.values))
    names = [*reference.names, *[f"output_{j}" for j in range(ref_out.shape[1])]]
    report.drift = compare(np.hstack([reference.values, ref_out]),
                           np.hstack([current.values, cur_out]), names)
    return report



def _recorded(track: bool, params: dict[str, Any], write: Any) -> ScoreReport:
    """``write()``, recorded in MLflow as a scoring job when ``track``: FINISHED with its
    summary as metrics, FAILED (KILLED if interrupted) when it raised."""
    if not track:
        return write()  # type: ignore[no-any-return]
    from ..tracking.runs import record_scoring

    try:
        report: ScoreReport = write()
    except BaseException as e:
        record_scoring(params, None, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    recorder = record_scoring(params, report.summary, "FINISHED")
    recorder.wait(timeout=30)  # a job's record is small: complete before the report returns
    report.mlflow_run_id = recorder.run_id
    return report


def _prepare(output: str, fingerprint: str, overwrite: bool, init: Any) -> None:
    """A new output is laid out and marked incomplete; an unfinished one is resumed."""
    if not storage.prepare_output(output, fingerprint, overwrite):
        if init is not None:
            init()
        storage.write_state(output, fingerprint, complete=False)


def _write(client: Any, blocks: Sequence[Any], output: str, out_format: str, fingerprint: str,
           progress: bool, starts: Any = None, budget: Budget | None = None) -> ScoreReport:
    """Write every block not already written, with a progress bar; return the report."""
    from dask import delayed
    from distributed import wait

    done = storage.done_blocks(output)
    tasks = []
    for index, block in enumerate(blocks):
        if index in done:
            continue
        if out_format == "zarr":
            tasks.append(delayed(storage.write_zarr_block)(block, output, index,
                                                              int(starts[index])))
        else:
            tasks.append(delayed(storage.write_parquet_part)(block, output, index))
    start = time.perf_counter()
    meter = meter_for(client, list(cluster_info.workers(client)))
    futures = client.compute(tasks)
    if progress and futures:
        from distributed import progress as progress_bar

        progress_bar(futures)
    # Let every block that can finish do so before reporting a failure: a re-run then
    # redoes only the blocks that failed.
    while True:
        try:
            wait(futures, timeout=0.25)
            break
        except TimeoutError:
            pass
        if budget is not None and budget.reached(meter.cost()):
            spent = meter.cost()
            client.cancel([f for f in futures if not f.done()])
            written = sum(1 for f in futures if f.status == "finished")
            raise BudgetReached(
                f"the scoring job reached its budget of {budget.describe()} after"
                f" {spent.describe()}: {written + len(done)} of {len(blocks)} blocks are written"
                f" to {output}, and the same call resumes with the rest.")
    meter.close()
    failed = next((f for f in futures if f.status == "error"), None)
    if failed is not None:
        failed.result()  # raises the block's own error
    results = client.gather(futures)
    seconds = time.perf_counter() - start
    storage.write_state(output, fingerprint, complete=True)
    rows = sum(r["rows"] for r in results)
    per_worker = Counter()  # type: Counter[str]
    for r in results:
        per_worker[r["worker"]] += r["rows"]
    summary = {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
        "blocks_written": len(tasks),
        "blocks_skipped": len(done),
        "per_worker_share": {w: round(n / rows, 3) for w, n in per_worker.items()} if rows else {},
        **meter.cost().as_dict(),
    }
    return ScoreReport(output, out_format, summary, cost=meter.cost())
