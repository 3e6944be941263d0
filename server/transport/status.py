"""The one table from domain errors to gRPC status codes, and how a call or a stream ends with a status."""

from __future__ import annotations

import logging

import grpc

from rnnserve.server.errors import RnnServeError
from rnnserve.tensors import TensorDecodeError

log = logging.getLogger(__name__)

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


MAX_STATUS_MESSAGE_BYTES = 2048
"""A status message's bound (UTF-8 bytes). It travels in a response header, percent-encoded (up to 3
bytes a byte), and clients refuse headers past 8 kB by default: the status itself would then be lost."""


def to_status(exc: BaseException, *, log_as: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed call returns; ``log_as``: log an INTERNAL error as this call's, with
    its traceback.

    Then drops the error's traceback (and those of the errors it chains): its frames hold the refused
    request's bytes, decoded message and tensors, and an error kept by a stream's queue or by grpc would
    keep them all alive, in reference cycles the server's tuned collector rarely visits."""
    if isinstance(exc, RnnServeError):
        code, message = STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message
    elif isinstance(exc, TensorDecodeError):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    if log_as is not None and code == grpc.StatusCode.INTERNAL:
        log.error("internal error in %s", log_as, exc_info=exc)
    forget_frames(exc)
    return code, bounded(message)


def forget_frames(exc: BaseException | None) -> None:
    """Drop the tracebacks of ``exc`` and the errors it chains (``__cause__``, ``__context__``)."""
    seen = 0
    while exc is not None and seen < 16:  # a chain is short; the bound guards against a cycle of contexts
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
        seen += 1


def bounded(message: str) -> str:
    """``message`` cut to ``MAX_STATUS_MESSAGE_BYTES`` of UTF-8 (on a character boundary), the cut marked."""
    data = message.encode("utf-8", errors="replace")
    if len(data) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    return data[: MAX_STATUS_MESSAGE_BYTES - 32].decode("utf-8", errors="ignore") + f"...({len(data)} bytes)"


def end_with(context: grpc.aio.ServicerContext, exc: BaseException, *, log_as: str | None = None) -> grpc.StatusCode:
    """End the call with ``exc``'s status (``to_status``) and return its code.

    The status is set, not raised (``context.abort``): grpc keeps the error it raises in a reference cycle with
    the handler's frame, and so the refused request's bytes, until a full collection."""
    code, message = to_status(exc, log_as=log_as)
    context.set_code(code)
    context.set_details(message)
    return code
