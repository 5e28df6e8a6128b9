"""Open Inference Protocol v2 tensors over REST: requests and responses in JSON, and in
Triton's binary tensor data extension (the JSON header first, its length in the
``Inference-Header-Content-Length`` HTTP header, then each binary tensor's bytes in order,
little-endian, row-major). Numpy only: this module runs wherever a request is parsed.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The binary extension's HTTP header: the length of the JSON part of a body.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: Protocol datatype names and their numpy dtypes (BYTES and BF16 are not served).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}


class BadRequest(ValueError):
    """A request the protocol cannot read; the message is the sentence sent back (400)."""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as metadata gives it: name, datatype, shape (-1: any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        """The metadata entry of this tensor."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferRequest:
    """A decoded infer request: its id, input arrays by name, and how outputs are wanted."""

    id: str | None
    inputs: dict[str, tuple[str, np.ndarray]]  # name -> (datatype, array)
    outputs: dict[str, bool] = field(default_factory=dict)  # requested name -> binary?
    binary_output: bool = False  # the default for outputs not listed


def datatype_of(dtype: Any) -> str:
    """The protocol name of a numpy dtype; BadRequest-free (a server-side question)."""
    dtype = np.dtype(dtype)
    for name, known in DATATYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype.")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object.")
    return value


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                            and d >= 0 for d in raw):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers, got"
                         f" {json.dumps(raw)}.")
    return tuple(raw)


def decode_infer(body: bytes, header_length: str | None = None) -> InferRequest:
    """Read an infer request body (JSON, or JSON then binary tensors when ``header_length``,
    the value of the ``Inference-Header-Content-Length`` header, is given)."""
    binary = b""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise BadRequest(f"the {HEADER_LENGTH} header must be an integer, got"
                             f" {header_length!r}.") from None
        if not 0 < split <= len(body):
            raise BadRequest(f"the {HEADER_LENGTH} header ({split}) must be between 1 and the"
                             f" body's length ({len(body)}).")
        body, binary = body[:split], body[split:]
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e}).") from None
    doc = _object(doc, "the request body")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string.")
    parameters = _object(doc.get("parameters") or {}, "'parameters'")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("the request must have a non-empty 'inputs' list.")
    inputs: dict[str, tuple[str, np.ndarray]] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        raw = _object(raw, f"inputs[{i}]")
        name = raw.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"inputs[{i}] needs a 'name' string.")
        where = f"input {name!r}"
        datatype = raw.get("datatype")
        if datatype not in DATATYPES:
            raise BadRequest(f"{where}: datatype {datatype!r} is not served; use one of"
                             f" {', '.join(DATATYPES)}.")
        dtype = DATATYPES[datatype]
        shape = _shape(raw.get("shape"), where)
        count = int(np.prod(shape, dtype=np.int64))
        params = _object(raw.get("parameters") or {}, f"{where}: 'parameters'")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise BadRequest(f"{where}: binary_data_size must be a non-negative integer.")
            if size != count * dtype.itemsize:
                raise BadRequest(f"{where}: binary_data_size is {size} bytes but shape"
                                 f" {list(shape)} of {datatype} takes"
                                 f" {count * dtype.itemsize}.")
            if offset + size > len(binary):
                raise BadRequest(f"{where}: the body holds fewer binary bytes than"
                                 " binary_data_size says.")
            array = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count,
                                  offset=offset).astype(dtype).reshape(shape)
            offset += size
        else:
            if "data" not in raw:
                raise BadRequest(f"{where} has neither 'data' nor binary data.")
            try:
                array = np.asarray(raw["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError):
                raise BadRequest(f"{where}: 'data' does not hold {datatype} values.") from None
            if array.size != count:
                raise BadRequest(f"{where}: 'data' has {array.size} values but shape"
                                 f" {list(shape)} needs {count}.")
            array = array.reshape(shape)
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice.")
        inputs[name] = (datatype, array)
    if offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} binary bytes no input claims.")
    outputs: dict[str, bool] = {}
    for i, raw in enumerate(doc.get("outputs") or []):
        raw = _object(raw, f"outputs[{i}]")
        name = raw.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"outputs[{i}] needs a 'name' string.")
        params = _object(raw.get("parameters") or {}, f"output {name!r}: 'parameters'")
        outputs[name] = bool(params.get("binary_data", False))
    return InferRequest(request_id, inputs, outputs, bool(parameters.get("binary_data_output",
                                                                          False)))


def encode_infer(model_name: str, model_version: str, request_id: str | None,
                 outputs: Sequence[tuple[str, np.ndarray]], request: InferRequest
                 ) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers: outputs in JSON, or binary where the
    request asked (per output, or ``binary_data_output`` for those it did not list)."""
    wanted = request.outputs
    known = {name for name, _ in outputs}
    for name in wanted:
        if name not in known:
            raise BadRequest(f"output {name!r} is not an output of this model; it has"
                             f" {', '.join(repr(n) for n in sorted(known))}.")
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in outputs:
        if wanted and name not in wanted:
            continue
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype),
                                 "shape": list(array.shape)}
        if wanted.get(name, request.binary_output):
            data = np.ascontiguousarray(array)
            if sys.byteorder != "little":
                data = data.astype(data.dtype.newbyteorder("<"))
            raw = data.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    header = json.dumps({"model_name": model_name, "model_version": model_version,
                         "id": request_id or str(uuid.uuid4()), "outputs": entries}).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream",
                                         HEADER_LENGTH: str(len(header))}
