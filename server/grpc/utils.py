"""The one table from domain errors to gRPC status codes, and request parsing that never crashes."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError, Message

from rnnserve.server.errors import InvalidArgument, RnnServeError
from rnnserve.tensors import TensorDecodeError

STATUS_CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "ABORTED": grpc.StatusCode.ABORTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def to_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed call returns."""
    if isinstance(exc, RnnServeError):
        return STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message
    if isinstance(exc, TensorDecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def parse(message_type: type[Message], data: bytes) -> Message:
    """Deserialize a request ourselves so garbage bytes get INVALID_ARGUMENT with the expected type named
    (grpc's own deserializer would answer INTERNAL)."""
    try:
        return message_type.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidArgument(f"request is not a valid {message_type.DESCRIPTOR.full_name} message ({exc})") from exc
