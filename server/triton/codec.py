"""Tensors of the KServe v2 protocol <-> numpy arrays and byte strings.

A request's inputs come either all as `raw_input_contents` (little-endian, row-major bytes, one
entry per input) or all as typed `contents` lists. BYTES elements are raw-encoded as a 4-byte
little-endian length followed by the bytes. FP16 has no typed list: it travels raw only.
Errors are `InvalidInput` naming the tensor.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from clipserve.server.errors import InvalidInput
from clipserve.triton import grpc_service_pb2 as pb

#: Numeric protocol datatypes and their little-endian numpy dtypes (BF16 has none in numpy).
NUMPY_DTYPES: Mapping[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
        "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
        "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    }.items()
}
BYTES = "BYTES"

#: The typed `contents` list of each datatype.
CONTENTS_FIELDS: Mapping[str, str] = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", BYTES: "bytes_contents",
}

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    """A decoded input: numeric data as an array of `shape`; BYTES as a flat element list."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """Every input of the request, by name."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "send one per input, in order, or none"
        )
    tensors: dict[str, Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        if raw and tensor.HasField("contents"):
            raise InvalidInput(
                f"input {tensor.name!r} has contents while the request uses raw_input_contents: "
                "use one or the other for all inputs"
            )
        tensors[tensor.name] = decode_tensor(tensor, raw[i] if raw else None)
    return tensors


def decode_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None
) -> Tensor:
    """One input from its raw bytes (when given) or its typed contents."""
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r} has shape {list(shape)}: dimensions must be >= 0")
    count = math.prod(shape)
    if datatype == BYTES:
        elements = (
            deserialize_bytes(raw, name) if raw is not None
            else list(tensor.contents.bytes_contents)
        )
        if len(elements) != count:
            raise InvalidInput(
                f"input {name!r} has {len(elements)} BYTES elements, shape {list(shape)} needs "
                f"{count}"
            )
        return Tensor(name, datatype, shape, elements)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input {name!r} has datatype {datatype!r}, which is not supported")
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r} has {len(raw)} bytes of raw contents, {datatype} "
                f"{list(shape)} needs {count * dtype.itemsize}"
            )
        return Tensor(name, datatype, shape, np.frombuffer(raw, dtype).reshape(shape))
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} travels as raw_input_contents only")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r} has {len(values)} values in contents.{field}, shape "
            f"{list(shape)} needs {count}"
        )
    try:
        array = np.asarray(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"input {name!r}: a value does not fit {datatype} ({exc})") from None
    return Tensor(name, datatype, shape, array)


def deserialize_bytes(buffer: bytes, name: str) -> list[bytes]:
    """Raw BYTES contents -> elements."""
    view = memoryview(buffer)
    elements: list[bytes] = []
    at = 0
    while at < len(view):
        if at + _LENGTH.size > len(view):
            raise InvalidInput(_truncated(name, at))
        (length,) = _LENGTH.unpack_from(view, at)
        at += _LENGTH.size
        if at + length > len(view):
            raise InvalidInput(_truncated(name, at))
        elements.append(bytes(view[at : at + length]))
        at += length
    return elements


def _truncated(name: str, at: int) -> str:
    return (
        f"raw contents of input {name!r} end inside an element at byte {at}: each BYTES element "
        "is a 4-byte little-endian length followed by that many bytes"
    )


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """Elements -> raw BYTES contents."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def encode_output(
    name: str, array: np.ndarray, *, raw: bool
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes | None]:
    """A numeric output tensor, with its raw bytes (raw=True) or typed contents."""
    datatype = next((k for k, v in NUMPY_DTYPES.items() if v == array.dtype), None)
    if datatype is None:
        raise TypeError(f"no protocol datatype for numpy dtype {array.dtype}")
    tensor = pb.ModelInferResponse.InferOutputTensor(
        name=name, datatype=datatype, shape=list(array.shape)
    )
    if raw:
        return tensor, np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise TypeError(f"{datatype} has no typed contents; encode it raw")
    getattr(tensor.contents, field).extend(array.ravel().tolist())
    return tensor, None
