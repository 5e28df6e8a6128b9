"""Why an export failed, in one sentence: the operator or the line of the model's code that
torch.export or the ONNX converter stopped at, never their multi-page reports."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterator
from typing import Any


class ExportError(ValueError):
    """The model could not be exported, or the exported model does not match it; the message
    is one sentence, and no file was written."""


FORMAT_NAMES = {"onnx": "ONNX", "pt2": "a torch.export program"}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OPERATOR = re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)")
_TORCH_OP = re.compile(r"\b((?:aten|prims|torch\.ops\.\w+)[.:]{1,2}[\w.]+)")
_CALL = re.compile(r'File "([^"]+)", line (\d+), in [^\n]+\n\s*([^\n]+)')
_SPECIALIZED = re.compile(r"specialized it to be a constant \((\d+)\)")
# Frames in these packages are the exporter's own; the model's code is anything else.
_LIBRARIES = ("torch", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "jupyter_mlcloud",
              "sympy", "functorch", "contextlib")


def _library_dirs() -> tuple[str, ...]:
    dirs = []
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if origin:
            # A package's folder; a plain module (contextlib) is its own file.
            dirs.append(os.path.dirname(origin) if origin.endswith("__init__.py") else origin)
    dirs.append(os.path.dirname(os.__file__))  # the standard library
    return tuple(dirs)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what caused it, as far as the chain goes."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _where(filename: str, line: int | str, code: str) -> str:
    return f"{os.path.basename(filename)} line {line}, `{code.strip()}`"


def _model_frame(error: BaseException) -> str | None:
    """The innermost frame of the model's own code in the tracebacks of ``error``'s chain."""
    libraries = _library_dirs()
    for link in _chain(error):
        frames = traceback.extract_tb(link.__traceback__)
        for frame in reversed(frames):
            if frame.filename.startswith(libraries) or frame.filename.startswith("<frozen"):
                continue
            if frame.line:
                return _where(frame.filename, frame.lineno or "?", frame.line)
    return None


def _message_frame(text: str) -> str | None:
    """The last call torch.export quotes in its message ("The following call raised...")."""
    found = _CALL.findall(text)
    return _where(*found[-1]) if found else None


def _operator(text: str) -> str | None:
    found = _OPERATOR.search(text)
    if found:
        return f"{found.group(1)}.{found.group(2)}"
    found = _TORCH_OP.search(text)
    return found.group(1).replace("::", ".") if found else None


def _base(operator: str) -> str:
    """``aten._linalg_svd.default`` -> ``linalg_svd``: an operator's name, whatever the
    namespace, overload or private spelling (decompositions rename ``x`` to ``_x``)."""
    parts = operator.split(".")
    if len(parts) > 2:
        parts = parts[:-1]  # the overload
    return parts[-1].lstrip("_")


def _node_frame(program: Any, operator: str) -> str | None:
    """Where the model calls ``operator``, from the exported graph's recorded stack."""
    if program is None:
        return None
    for node in program.graph.nodes:
        if node.op == "call_function" and _base(str(node.target)) == _base(operator):
            found = _CALL.findall(node.meta.get("stack_trace") or "")
            if found:
                return _where(*found[-1])
    return None


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line and not line.startswith(("Failed to ", "Next steps", "- ")) \
                and line != "Exception summary":
            return line.rstrip(".")
    return "no reason given"


def _kinds(error: BaseException) -> set[str]:
    return {cls.__name__ for link in _chain(error) for cls in type(link).__mro__}


def explain(error: BaseException, fmt: str, program: Any = None) -> str:
    """One sentence saying why exporting to ``fmt`` ("onnx" or "pt2") failed, naming the
    operator or the model's line where it stopped (``program``: the exported graph, when
    the failure came after torch.export)."""
    text = _ANSI.sub("", "\n".join(str(link) for link in _chain(error)))
    kinds = _kinds(error)
    where = _model_frame(error) or _message_frame(text)
    target = FORMAT_NAMES[fmt]
    if "GuardOnDataDependentSymNode" in kinds or "data-dependent" in text:
        at = f" at {where}" if where else ""
        return (f"the model cannot be exported to {target}: it branches on the values of a"
                f" tensor (data-dependent control flow){at}; express the choice with"
                " torch.where or torch.cond.")
    specialized = _SPECIALIZED.search(text)
    if specialized:
        at = f" ({where})" if where else ""
        return (f"the model cannot be exported to {target} with a dynamic batch dimension: its"
                f" code fixes the batch size to {specialized.group(1)}{at}; use -1 or"
                " x.shape[0] where the batch size is needed.")
    operator = _operator(text) if {"DispatchError", "ConversionError"} & kinds else None
    if operator:
        where = _node_frame(program, operator) or where
        at = f" (called at {where})" if where else ""
        return (f"the model cannot be exported to {target}: the operator {operator}{at} has no"
                " ONNX translation; replace that call, or export to .pt2.")
    at = f" at {where}" if where else ""
    return f"the model cannot be exported to {target}{at}: {_first_line(text)}."
