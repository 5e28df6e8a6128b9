"""The data side of scoring: opening inputs, and resumable writes of outputs.

A written output carries ``_mlcloud_score.json`` (what wrote it, and whether it is complete)
and, while incomplete, one marker per finished block in ``_mlcloud_done/``. A block's marker
is written only after its data, so a re-run after a crash rewrites exactly the blocks that
have no marker and never trusts a half-written one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import numpy as np

STATE_FILE = "_mlcloud_score.json"
DONE_DIR = "_mlcloud_done"
FORMATS = {".zarr": "zarr", ".parquet": "parquet", ".pq": "parquet", ".nc": "netcdf",
           ".nc4": "netcdf", ".netcdf": "netcdf"}


def file_format(path: str) -> str:
    """zarr, parquet or netcdf, from the path's suffix; ValueError for anything else."""
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"unknown file format {suffix or path!r} in {path!r}; allowed: .zarr, .parquet"
            " (.pq), .nc."
        )
    return FORMATS[suffix]


def open_input(path: str, features: Any) -> Any:
    """A lazy xarray or dask DataFrame for a zarr store, parquet dataset or netCDF file."""
    import fsspec

    kind = file_format(path)
    fs, _, [location] = fsspec.get_fs_token_paths(path)
    if not fs.exists(location):
        raise ValueError(f"input {path!r} does not exist.")
    if kind == "parquet":
        import dask.dataframe as dd

        return dd.read_parquet(path, columns=list(features) if features else None)
    import xarray as xr

    if kind == "zarr":
        data = xr.open_zarr(path)
    else:
        data = xr.open_dataset(fs.open(location, "rb") if "://" in path else path, chunks={})
    if not features and len(data.data_vars) == 1:
        return data[next(iter(data.data_vars))]
    return data


# ---------------------------------------------------------------- resumable outputs


def _fs(output: str) -> tuple[Any, str]:
    import fsspec

    fs, _, [location] = fsspec.get_fs_token_paths(output)
    return fs, location


def prepare_output(output: str, fingerprint: str, overwrite: bool) -> bool:
    """Make ``output`` ready for writing; True when resuming an earlier, unfinished write.

    Refuses (ValueError) an existing output unless ``overwrite`` — except an unfinished one
    written for the same model, data and settings, which is resumed.
    """
    try:
        fs, location = _fs(output)
        exists = fs.exists(location)
    except Exception as e:
        raise ValueError(f"cannot use output {output!r}: {e}.") from None
    if exists:
        state = read_state(output)
        if state is not None and not state["complete"] and state["fingerprint"] == fingerprint:
            return True
        if not overwrite:
            raise ValueError(
                f"output {output!r} already exists; pass overwrite=True (--overwrite) to replace"
                " it."
            )
        fs.rm(location, recursive=True)
    return False


def read_state(output: str) -> dict[str, Any] | None:
    fs, location = _fs(output)
    try:
        with fs.open(f"{location}/{STATE_FILE}", "r") as f:
            return dict(json.load(f))
    except (FileNotFoundError, OSError, ValueError):
        return None


def write_state(output: str, fingerprint: str, complete: bool) -> None:
    fs, location = _fs(output)
    fs.makedirs(location, exist_ok=True)
    with fs.open(f"{location}/{STATE_FILE}", "w") as f:
        json.dump({"fingerprint": fingerprint, "complete": complete, "time": time.time()}, f)
    if complete:
        done = f"{location}/{DONE_DIR}"
        if fs.exists(done):
            fs.rm(done, recursive=True)


def done_blocks(output: str) -> set[int]:
    """Blocks finished by an earlier, interrupted write."""
    fs, location = _fs(output)
    done = f"{location}/{DONE_DIR}"
    if not fs.exists(done):
        return set()
    return {int(os.path.basename(p)) for p in fs.ls(done, detail=False)}


def _mark_done(output: str, index: int) -> None:
    fs, location = _fs(output)
    fs.makedirs(f"{location}/{DONE_DIR}", exist_ok=True)
    fs.pipe_file(f"{location}/{DONE_DIR}/{index}", b"")


def _where() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except Exception:
        return socket.gethostname()


def write_zarr_block(values: np.ndarray, output: str, index: int, start: int) -> dict[str, Any]:
    """Write one block of scores into the store's ``score`` array, then mark it done."""
    import zarr

    array = zarr.open_array(store=output, path="score", mode="r+")
    array[start : start + len(values)] = values
    _mark_done(output, index)
    return {"rows": len(values), "worker": _where()}


def write_parquet_part(frame: Any, output: str, index: int) -> dict[str, Any]:
    """Write one partition as ``part.<index>.parquet`` (via a temporary name), mark it done."""
    fs, location = _fs(output)
    fs.makedirs(location, exist_ok=True)
    final = f"{location}/part.{index:05d}.parquet"
    temporary = f"{location}/_tmp.part.{index:05d}.parquet"
    with fs.open(temporary, "wb") as f:
        frame.to_parquet(f)
    fs.mv(temporary, final)
    _mark_done(output, index)
    return {"rows": len(frame), "worker": _where()}
