"""The model and its example as ``torch.export`` sees them: the eager module (whatever form the
model came in), the example as arrays, and the exported program with a dynamic batch
dimension, or one sentence saying why there is none."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .failures import ExportError, explain

#: Rows of the random example made from ``features=N``.
EXAMPLE_ROWS = 8


@dataclass
class Traced:
    """An exported program and the names its inputs and outputs get."""

    program: Any  # torch.export.ExportedProgram; dimension 0 of every input is "batch"
    input_names: tuple[str, ...]  # the exported model's, in call order
    output_names: tuple[str, ...]  # as :func:`flatten` names the eager model's outputs


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep torch's and the ONNX exporter's log lines, warnings and graph dumps (torch.export
    prints a failed trace's partial graph to stderr) out of the notebook while exporting; a
    failure still raises, and :func:`explain` turns it into one sentence."""
    names = ["torch", "onnxscript", "onnx_ir"] + [
        name for name in list(logging.root.manager.loggerDict)
        if name.startswith(("torch.", "onnxscript.", "onnx_ir."))]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _wrap(fn: Any) -> Any:
    """A module around a plain callable (torch.export takes modules only)."""
    import torch

    class Function(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, *args: Any) -> Any:
            return self.fn(*args)

    return Function()


@contextlib.contextmanager
def eager_module(model: Any) -> Iterator[Any]:
    """``model`` (anything ``mlc.score`` takes) as a torch module in eval mode on the CPU; a
    module passed in is put back in the mode it was in."""
    import torch

    from ..scoring.model import ModelBlob

    if isinstance(model, torch.nn.Module):
        module = model
    elif callable(model):
        module = _wrap(model)
    else:  # a saved model's path or a models:/ URI: ValueError naming it if unusable
        loaded = ModelBlob.of(model).load()
        module = loaded if isinstance(loaded, torch.nn.Module) else _wrap(loaded)
    devices = {p.device.type for p in module.parameters()} | {
        b.device.type for b in module.buffers()}
    if devices - {"cpu"}:
        raise ValueError(f"the model is on {', '.join(sorted(devices - {'cpu'}))}; export"
                         " runs on the CPU: pass model.cpu().")
    training = module.training
    _train(module, False)
    try:
        yield module
    finally:
        _train(module, training)


def _train(module: Any, mode: bool) -> None:
    try:
        module.train(mode)
    except NotImplementedError:  # a loaded .pt2 program: traced in eval mode, it has no modes
        pass


def _first_layer_width(module: Any) -> int | None:
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            return int(layer.in_features)
        if any(True for _ in layer.parameters(recurse=False)):
            return None  # the first layer with weights is no Linear: its input is unknown
    return None


def _array(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    elif hasattr(value, "to_numpy"):  # a pandas object
        value = value.to_numpy()
    elif hasattr(value, "compute"):  # a dask collection: an example is a few rows
        value = value.compute()
    array = np.asarray(getattr(value, "values", value))  # an xarray object: its values
    if array.ndim == 0 or len(array) == 0:
        raise ValueError(f"{what} must have at least one row (dimension 0 is the batch), got"
                         f" shape {array.shape}.")
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{what} must be numeric, got dtype {array.dtype}.")
    return array


def examples(example: Any, features: int | None, module: Any) -> tuple[np.ndarray, ...]:
    """The example inputs as arrays (a tuple is one array per input), floats in the model's
    parameter dtype; from ``features=N`` or the model's first Linear layer, random rows."""
    from ..scoring.model import parameter_dtype

    if example is not None and features is not None:
        raise ValueError("pass example= or features=, not both.")
    if example is None:
        if features is None:
            features = _first_layer_width(module)
            if features is None:
                raise ValueError("export needs an example input: pass example= (a few rows"
                                 " the model takes) or features=N for random rows of N"
                                 " features.")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive whole number, got {features!r}.")
        rows = np.random.default_rng(0).standard_normal((EXAMPLE_ROWS, features))
        arrays: tuple[np.ndarray, ...] = (rows,)
    elif isinstance(example, (str, os.PathLike)):
        path = os.fspath(example)
        if not path.endswith(".npy"):
            raise ValueError(f"example {path!r} is a path but not a .npy file; pass an array"
                             " or a .npy file.")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the example {path!r} ({e}).") from None
        arrays = (_array(loaded, f"the example {path!r}"),)
    elif isinstance(example, tuple):
        arrays = tuple(_array(x, f"example input {i}") for i, x in enumerate(example))
        if not arrays:
            raise ValueError("example is an empty tuple; pass one array per model input.")
    else:
        arrays = (_array(example, "example"),)
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(f"the example inputs have different numbers of rows"
                         f" {[len(a) for a in arrays]}; dimension 0 is the batch of each.")
    dtype = str(parameter_dtype(module)).removeprefix("torch.")
    float_dtype = dtype if dtype in ("float16", "float32", "float64") else "float32"
    return tuple(a.astype(float_dtype) if a.dtype.kind == "f" else a for a in arrays)


def tensors(arrays: tuple[np.ndarray, ...], module: Any) -> tuple[Any, ...]:
    """The arrays as torch tensors, floats in the module's parameter dtype."""
    import torch

    from ..scoring.model import parameter_dtype

    dtype = parameter_dtype(module)
    return tuple(torch.as_tensor(a).to(dtype) if a.dtype.kind == "f" else torch.as_tensor(a)
                 for a in arrays)


def _key(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten(output: Any) -> list[tuple[str, Any]]:
    """The model's output as (name, tensor) pairs, in the order exported models give them:
    one tensor is ``output``; a tuple gives ``output_0``, ...; a dict its keys."""
    import torch
    from torch.utils._pytree import tree_flatten_with_path

    leaves, _ = tree_flatten_with_path(output)
    found = [(path, leaf) for path, leaf in leaves if isinstance(leaf, torch.Tensor)]
    if len(found) == 1 and not found[0][0]:
        return [("output", found[0][1])]
    named = []
    for path, leaf in found:
        name = "_".join(_key(entry) for entry in path)
        named.append((f"output_{name}" if not name[:1].isalpha() else name, leaf))
    return named


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for an operator, as long as the block runs (then as before)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eager_runner(module: Any) -> Any:
    """A function calling the eager model on arrays, as a user would, for timing."""
    import torch

    def run(arrays: tuple[np.ndarray, ...]) -> Any:
        with torch.inference_mode():
            return module(*tensors(arrays, module))

    return run


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__


def eager(module: Any, arrays: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """The eager model's outputs on ``arrays``, flattened, as float32/64 or integer arrays."""
    import torch

    with torch.inference_mode():
        out = module(*tensors(arrays, module))
    return [t.detach().cpu().float().numpy() if t.dtype in (torch.bfloat16,) else
            t.detach().cpu().numpy() for _, t in flatten(out)]


def _takes_varargs(module: Any) -> bool:
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(parameters) and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL


def trace(module: Any, arrays: tuple[np.ndarray, ...], fmt: str) -> Traced:
    """``torch.export`` of ``module`` with dimension 0 of every input dynamic, or
    :class:`ExportError` naming the operator or line that stopped it."""
    import torch

    args = tensors(arrays, module)
    if len(arrays[0]) == 1:  # torch.export fixes a dimension seen as 1: show it two rows
        args = tuple(torch.cat([a, a]) for a in args)
    try:
        with quiet(), torch.no_grad():
            reference = module(*args)
    except Exception as e:
        shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
        raise ValueError(f"the model cannot run on the example of shape {shapes}:"
                         f" {_first_line(e)}.") from None
    batch = torch.export.Dim("batch")
    dynamic: tuple[Any, ...] = tuple({0: batch} for _ in args)
    if _takes_varargs(module):  # forward(self, *args): the specs nest as the inputs do
        dynamic = (dynamic,)
    try:
        with quiet():
            program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        raise ExportError(explain(e, fmt)) from None
    names = [name for name, _ in flatten(reference)]
    if not names:
        raise ExportError("the model returns no tensor; export needs a model whose output is"
                          " a tensor, or a tuple or dict of tensors.")
    inputs = ("input",) if len(args) == 1 else tuple(f"input_{i}" for i in range(len(args)))
    return Traced(program, inputs, tuple(names))
