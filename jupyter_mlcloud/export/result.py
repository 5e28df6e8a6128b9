"""What an export gives back: where the file is, how big, its opset, how closely it matches
the eager model, what int8 quantization changed, and how fast it runs beside eager torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Parity:
    """One output of the exported model against the eager model on one input."""

    input: str  # "example" or "random"
    batch: int  # rows of that input
    output: str  # the output's name in the exported model
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass(frozen=True)
class QuantizationChange:
    """How much int8 quantization moved one output on the example, against the eager model."""

    output: str
    max_abs_diff: float
    mean_abs_diff: float
    relative: float  # mean absolute change over the mean absolute eager value
    top1_agreement: float | None  # share of rows whose largest column stays the largest


@dataclass(frozen=True)
class ExportResult:
    """An exported model.

    ``latency_ms`` maps a runtime (``"onnxruntime"`` or ``"torch.export"`` for the written
    file, ``"torch"`` for the eager model; ``"onnxruntime fp32"`` beside an int8 file) to
    the median milliseconds of one call at batch 1 and 64, all on this process's threads.
    ``parity`` and ``latency_ms`` are empty with ``check=False``.
    """

    path: str
    format: str  # "onnx" or "pt2"
    size: int  # bytes on disk
    opset: int | None  # the ONNX opset (None for .pt2)
    inputs: tuple[str, ...]  # input names, in call order; dimension 0 is the batch
    outputs: tuple[str, ...]
    parity: tuple[Parity, ...] = ()
    quantize: str | None = None
    quantization: tuple[QuantizationChange, ...] = ()
    fp32_size: int | None = None  # bytes of the unquantized model, beside an int8 one
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)

    @property
    def max_abs_diff(self) -> float | None:
        """The largest difference from the eager model over every checked output."""
        return max((p.max_abs_diff for p in self.parity), default=None)

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.format == "onnx" else "torch.export"

    def speedup(self, batch: int) -> float | None:
        """Eager torch's latency over the exported model's, at ``batch`` (1 or 64)."""
        exported = self.latency_ms.get(self.runtime, {}).get(batch)
        eager = self.latency_ms.get("torch", {}).get(batch)
        return eager / exported if exported and eager else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (JSON-ready: latency batches as strings)."""
        out = asdict(self)
        out["latency_ms"] = {k: {str(b): v for b, v in t.items()}
                             for k, t in self.latency_ms.items()}
        out["max_abs_diff"] = self.max_abs_diff
        return out

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.format}, {_size(self.size)}"
                 + (f", opset {self.opset}" if self.opset else "")
                 + (f", {self.quantize} (fp32 {_size(self.fp32_size)})"
                    if self.quantize and self.fp32_size else "")]
        lines.append(f"  inputs {', '.join(self.inputs)} -> outputs {', '.join(self.outputs)}"
                     " (dimension 0 is the batch)")
        for p in self.parity:
            lines.append(f"  parity {p.output} on the {p.input} (batch {p.batch}): max abs diff"
                         f" {p.max_abs_diff:.2e} (allowed {p.tolerance:.0e})")
        for q in self.quantization:
            agree = (f", top-1 unchanged on {q.top1_agreement:.1%} of rows"
                     if q.top1_agreement is not None else "")
            lines.append(f"  {self.quantize} changes {q.output} on the example by up to"
                         f" {q.max_abs_diff:.2e} (mean {q.mean_abs_diff:.2e},"
                         f" {q.relative:.2%} of its mean magnitude{agree})")
        for runtime, table in self.latency_ms.items():
            cells = ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in table.items())
            lines.append(f"  latency {runtime}: {cells}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's display
        printer.text(str(self))


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
