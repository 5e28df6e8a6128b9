"""``mlc.export``: a model as an ONNX or ``torch.export`` file with a dynamic batch dimension,
checked against the eager model before anything is written.

The file is made in a temporary folder beside ``path`` and moved into place only once every
check passed, so a failed export leaves nothing behind, not even a partial file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from .failures import ExportError
from .latency import BATCHES, medians
from .result import ExportResult, Parity, QuantizationChange

#: Suffix -> format.
FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
QUANTIZE = ("int8",)


def _format(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        named = f"has the suffix {suffix!r}" if suffix else "has no suffix"
        raise ValueError(f"cannot export to {path!r}: it {named}; use .onnx (ONNX, runs in"
                         " onnxruntime without torch) or .pt2 (a torch.export program).")
    return FORMATS[suffix]


@contextlib.contextmanager
def _staged(path: str) -> Iterator[str]:
    """A path named like ``path`` inside a fresh hidden folder beside it; on success every
    file made there replaces its namesake beside ``path``; the folder goes either way."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot export to {path!r}: the folder {folder!r} does not exist.")
    name = os.path.basename(path)
    stage = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    try:
        yield os.path.join(stage, name)
        for entry in os.scandir(stage):
            if entry.is_file():
                os.replace(entry.path, os.path.join(folder, entry.name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))


def export(model: Any, path: str | os.PathLike[str], *, example: Any = None,
           features: int | None = None, check: bool = True,
           quantize: str | None = None) -> ExportResult:
    """Export ``model`` to ``path``: ``.onnx`` (torch's dynamo exporter; runs in onnxruntime,
    where torch need not be installed) or ``.pt2`` (``torch.export.save``). Dimension 0 of
    every input and output is a dynamic batch.

    ``model`` is anything ``mlc.score`` takes: a ``torch.nn.Module`` or callable, a path to
    a saved model, or ``models:/NAME@ALIAS``. ``example`` is what the model takes: an array,
    tensor, DataFrame or ``.npy`` path (a tuple: one per input), with a few rows; or
    ``features=N`` for random rows of N features (the default when the model starts with a
    Linear layer).

    ``check=True``: the written model runs (the ONNX file in onnxruntime) on the example and
    on a random batch of another size, and the export fails with :class:`ExportError`,
    naming the output and its largest difference, unless every float32 output is within
    1e-4 of the eager model's. The result then also holds the median latency of one call at
    batch 1 and 64 on one thread (onnxruntime's and torch's), beside eager torch.

    ``quantize="int8"``: the ONNX file gets int8 weights (onnxruntime's dynamic
    quantization); the parity check is of the float model, and what quantization changes
    on the example is in ``result.quantization``.

    A model torch.export cannot capture (data-dependent control flow, say) or the ONNX
    converter cannot translate raises :class:`ExportError` naming the line or operator;
    bad arguments raise ValueError. Either way nothing is written.
    """
    try:
        target = os.fspath(path)
    except TypeError:
        raise ValueError(f"path must be a file path ending in .onnx or .pt2, got"
                         f" {type(path).__name__}.") from None
    fmt = _format(target)
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not supported; use quantize='int8' or"
                         " leave it None.")
    if quantize and fmt != "onnx":
        raise ValueError(f"quantize={quantize!r} makes an ONNX model; export to a .onnx path"
                         f" instead of {target!r}.")
    if not isinstance(check, bool):
        raise ValueError(f"check must be True or False, got {check!r}.")

    from . import onnx as onnx_format
    from . import parity, program
    from . import pt2 as pt2_format

    writer = onnx_format if fmt == "onnx" else pt2_format
    runtime = "onnxruntime" if fmt == "onnx" else "torch.export"
    with program.eager_module(model) as module:
        example_in = program.examples(example, features, module)
        traced = program.trace(module, example_in, fmt)
        names = traced.output_names
        eager_out = program.eager(module, example_in)
        found: list[Parity] = []
        changes: list[QuantizationChange] = []
        fp32_size = None
        timed: dict[str, Callable[[Any], Any]] = {}  # what the latency is measured of
        with _staged(target) as staged:
            # An int8 model is quantized from the float one, written (and checked) beside it.
            written = _beside(staged, "float") if quantize else staged
            writer.write(traced, written)
            if check:
                run = writer.runner(written, 1)
                rows = parity.other_batch(example_in)
                random_in = parity.random_like(example_in, rows)
                found += parity.compare(eager_out, run(example_in), names, "example",
                                        len(example_in[0]))
                found += parity.compare(program.eager(module, random_in), run(random_in), names,
                                        "random", rows)
                parity.require(found, fmt)
                timed[runtime] = run
            if quantize:
                fp32_size = _size(written)
                onnx_format.quantize_int8(written, staged)
                quantized = onnx_format.runner(staged, 1)
                changes = parity.change(eager_out, quantized(example_in), names)
                if check:
                    timed = {runtime: quantized, f"{runtime} fp32": run}
        latency: dict[str, dict[int, float]] = {}
        if check:
            timed["torch"] = program.eager_runner(module)
            with program.one_thread():
                latency = medians(timed, {b: parity.random_like(example_in, b, seed=2)
                                          for b in BATCHES})
    return ExportResult(
        path=target, format=fmt, size=_size(target),
        opset=onnx_format.opset(target) if fmt == "onnx" else None,
        inputs=traced.input_names, outputs=names, parity=tuple(found), quantize=quantize,
        quantization=tuple(changes), fp32_size=fp32_size, latency_ms=latency)


def _beside(staged: str, folder: str) -> str:
    """A path named like ``staged`` in a new ``folder`` inside the staging folder (gone with
    it: only the staging folder's own files are moved into place)."""
    os.mkdir(os.path.join(os.path.dirname(staged), folder))
    return os.path.join(os.path.dirname(staged), folder, os.path.basename(staged))


__all__ = ["ExportError", "ExportResult", "export"]
