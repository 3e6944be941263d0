"""KServe v2 tensors <-> numpy: datatype names, raw and typed input contents, raw output contents."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.proto import kserve_model_config_pb2 as kcfg
from rnnserve.server.errors import InvalidArgument, echo
from rnnserve.server.limits import Limits
from rnnserve.tensors import element_count

if TYPE_CHECKING:
    pass

# numpy dtype name (as in manifests) -> KServe datatype string and Triton's model-config enum.
DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
NUMPY_DTYPES: dict[str, np.dtype] = {v: np.dtype(k).newbyteorder("<") for k, v in DATATYPES.items()}
# Little-endian dtype -> KServe datatype, for outputs (keyed by dtype: ``dtype.name`` is a slow property).
_DATATYPE_OF: dict[np.dtype, str] = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
CONFIG_TYPES: dict[str, kcfg.DataType] = {
    k: cast(kcfg.DataType, kcfg.DataType.Value(f"TYPE_{v}")) for k, v in DATATYPES.items()
}

# The typed-contents field that carries each datatype. FP16 has none: the protocol sends it raw only.
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def decode_inputs(request: kpb.ModelInferRequest, limits: Limits) -> dict[str, np.ndarray]:
    """The request's input tensors, with the shapes the client gave (leading batch dimension included), each
    within ``limits``' element count."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"the request has {len(request.inputs)} input(s) but {len(raw)} raw_input_contents entries; "
            "give one raw entry per input, in order, or typed contents for every input"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidArgument(f"input '{echo(tensor.name)}' is given twice")
        arrays[tensor.name] = _decode(tensor, raw[i] if raw else None, limits)
    return arrays


def _decode(tensor: kpb.ModelInferRequest.InferInputTensor, raw: bytes | None, limits: Limits) -> np.ndarray:
    label = f"input '{echo(tensor.name)}'"
    dtype = NUMPY_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgument(
            f"{label}: datatype '{echo(tensor.datatype)}' is not supported; use one of {sorted(NUMPY_DTYPES)}"
        )
    shape = tuple(tensor.shape)
    count = element_count(shape, tensor.name, dtype.itemsize, kind="input")
    limits.check_elements(tensor.name, shape, count)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"{label}: {tensor.datatype}{list(shape)} needs {count * dtype.itemsize} bytes of "
                f"raw_input_contents, got {len(raw)}"
            )
        arr = np.frombuffer(raw, dtype=dtype)
    else:
        field = _CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            raise InvalidArgument(f"{label}: {tensor.datatype} travels in raw_input_contents only")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidArgument(
                f"{label}: {tensor.datatype}{list(shape)} needs {count} values in contents.{field}, got {len(values)}"
            )
        # Typed fields are wider than narrow types (INT8 in int32): a value that does not fit is an error,
        # not a silent wrap-around.
        wide = np.asarray(values)
        arr = wide.astype(dtype)
        if count and dtype.kind in "iu" and not np.array_equal(arr, wide):
            raise InvalidArgument(f"{label}: a value in contents.{field} does not fit {tensor.datatype}")
    return arr.astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def encode_outputs(
    response: kpb.ModelInferResponse, outputs: Mapping[str, np.ndarray], names: Sequence[str], *, one_row: bool = False
) -> None:
    """Append ``names`` from ``outputs`` to the response, raw (what tritonclient reads), in that order.
    ``one_row``: the arrays are one session's, without the batch axis; they go out as a batch of one."""
    for name in names:
        arr = outputs[name]
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
        datatype = _DATATYPE_OF.get(arr.dtype)
        if datatype is None:  # big-endian (converted below), or a dtype KServe has no name for
            datatype = DATATYPES.get(arr.dtype.name)
            if datatype is None:
                raise InvalidArgument(f"output '{name}' has dtype {arr.dtype.name}, which KServe clients cannot read")
            arr = arr.astype(NUMPY_DTYPES[datatype])
        response.outputs.add(name=name, datatype=datatype, shape=(1, *arr.shape) if one_row else arr.shape)
        response.raw_output_contents.append(arr.tobytes())  # C order, whatever the array's layout
