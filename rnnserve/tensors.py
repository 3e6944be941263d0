"""numpy <-> wire tensors, shared by the server and the client (numpy only: no torch here).

Tensors travel as raw little-endian bytes in C order plus dtype and shape, decoded with
``numpy.frombuffer`` rather than per-element protobuf fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rnnserve.echo import echo
from rnnserve.proto import rnnserve_pb2 as pb

# dtype name (numpy spelling, as used in manifests) <-> wire enum
DTYPE_TO_PB: dict[str, pb.DataType] = {
    "float32": pb.FLOAT32,
    "float64": pb.FLOAT64,
    "float16": pb.FLOAT16,
    "int64": pb.INT64,
    "int32": pb.INT32,
    "int16": pb.INT16,
    "int8": pb.INT8,
    "uint8": pb.UINT8,
    "bool": pb.BOOL,
}
PB_TO_DTYPE: dict[int, str] = {v: k for k, v in DTYPE_TO_PB.items()}
# Wire byte order is little-endian whatever the host.
_WIRE_DTYPE: dict[str, np.dtype] = {name: np.dtype(name).newbyteorder("<") for name in DTYPE_TO_PB}
# Native dtype -> (wire enum, wire dtype), for the step path: ``dtype.name`` is a Python-level property in
# numpy 2 and cost about 10 us per encoded tensor (measured by ``rnnserve bench``).
_ENCODE: dict[np.dtype, tuple[pb.DataType, np.dtype]] = {
    np.dtype(n): (DTYPE_TO_PB[n], _WIRE_DTYPE[n]) for n in DTYPE_TO_PB
}


class TensorDecodeError(ValueError):
    """A wire tensor is malformed (unknown dtype, negative dims, or bytes that do not match the shape)."""


MAX_DIMS = 32
"""Dimensions a wire tensor may have (numpy 1's bound; numpy 2 allows 64)."""


def element_count(shape: Sequence[int], name: str, itemsize: int = 1, *, kind: str = "tensor") -> int:
    """The element count of a claimed tensor shape (native or KServe), once it is one an array can have;
    else TensorDecodeError naming the tensor (``kind`` 'name'). Zero dimensions make an empty tensor, but
    numpy still refuses one whose other dimensions multiply past its index range ([0, 2**62])."""
    if len(shape) > MAX_DIMS:
        raise TensorDecodeError(
            f"{kind} '{echo(name)}': its shape has {len(shape)} dimensions; a tensor has at most {MAX_DIMS}"
        )
    count = 1
    span = itemsize  # bytes spanned by the non-zero dimensions: numpy's bound, also for an empty array
    for d in shape:
        if d < 0:
            raise TensorDecodeError(f"{kind} '{echo(name)}': negative dimension in shape {list(shape)}")
        count *= d
        span *= d or 1
    if span >= 1 << 63:
        raise TensorDecodeError(
            f"{kind} '{echo(name)}': shape {list(shape)} is too large for any array (its non-zero dimensions "
            "multiply past 2**63 bytes)"
        )
    return count


def dtype_name(dtype: np.dtype | str | type) -> str:
    """The manifest/wire name of a numpy dtype, e.g. ``float32``."""
    name = np.dtype(dtype).name
    if name not in DTYPE_TO_PB:
        raise TypeError(f"dtype {name} is not supported on the wire; use one of {sorted(DTYPE_TO_PB)}")
    return name


def to_proto(array: np.ndarray | float | int | bool, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode an array (anything ``np.asarray`` accepts) as a wire tensor."""
    arr = np.asarray(array)
    found = _ENCODE.get(arr.dtype)
    if found is None:  # a non-native byte order, or a dtype the wire lacks (dtype_name raises)
        name = dtype_name(arr.dtype)
        found = DTYPE_TO_PB[name], _WIRE_DTYPE[name]
    code, wire = found
    msg = out if out is not None else pb.Tensor()
    msg.dtype = code
    del msg.shape[:]
    msg.shape.extend(arr.shape)
    if arr.dtype != wire or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=wire)
    msg.data = arr.tobytes()
    return msg


def from_proto(msg: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Decode a wire tensor; raise TensorDecodeError naming ``name`` when it is malformed.

    The result is a read-only view of the message bytes (no copy).
    """
    dtype = PB_TO_DTYPE.get(msg.dtype)
    if dtype is None:
        raise TensorDecodeError(
            f"tensor '{echo(name)}': unknown dtype enum {msg.dtype}; expected one of {sorted(DTYPE_TO_PB)}"
        )
    shape = tuple(msg.shape)
    wire = _WIRE_DTYPE[dtype]
    count = element_count(shape, name, wire.itemsize)
    if len(msg.data) != count * wire.itemsize:
        raise TensorDecodeError(
            f"tensor '{echo(name)}': {len(msg.data)} bytes of data do not hold shape {list(shape)} of {dtype} "
            f"({count * wire.itemsize} bytes expected)"
        )
    arr = np.frombuffer(msg.data, dtype=wire, count=count).reshape(shape)
    if not wire.isnative:
        arr = arr.astype(wire.newbyteorder("="))
    return arr


def encode_map(arrays: Mapping[str, np.ndarray], target) -> None:  # target: protobuf map field
    """Fill a ``map<string, Tensor>`` field from named arrays."""
    for key, value in arrays.items():
        to_proto(value, target[key])


def decode_map(field: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
    """Decode a ``map<string, Tensor>`` field into named arrays."""
    return {key: from_proto(value, key) for key, value in field.items()}
