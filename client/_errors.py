"""One exception type for everything the server reports: RPC failures and failed steps inside streams."""

from __future__ import annotations

import grpc


class RnnServeError(Exception):
    """The server (or the channel) reported an error.

    Attributes:
        code: the ``grpc.StatusCode`` of the failure.
        message: the server's details text, unchanged; for a call that reached no server, which address was
            tried (with the channel's own words after it).
        session_id: the session a failed stream step belonged to, when known.
        request_id: the ``request_id`` of a failed stream step, when known.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        session_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.session_id = session_id
        self.request_id = request_id
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" (session {self.session_id})" if self.session_id else ""
        return f"{self.code.name}: {self.message}{where}"

    def __repr__(self) -> str:
        return f"RnnServeError({self.code.name}, {self.message!r})"


# StatusCode members by their integer value, for StepResult.code (an int32 on the wire).
_CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` for a wire integer; UNKNOWN for values outside the enum."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


# How grpc's channel words a call that found no server to send to (nothing listening at the port, a host
# that does not resolve), as opposed to a status that a server sent.
_NO_CONNECTION = ("failed to connect to all addresses", "DNS resolution failed", "errors resolving")


def from_rpc_error(err: grpc.RpcError, address: str = "") -> RnnServeError:
    """Convert a sync ``grpc.RpcError`` or an ``grpc.aio.AioRpcError`` (both expose code() and details()).

    A call that reached no server at ``address`` (the client's target) says so first: grpc's own text
    ("failed to connect to all addresses; last error: UNKNOWN: ...") names neither the address plainly nor
    what to check.
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or str(err)
    if address and code == grpc.StatusCode.UNAVAILABLE and any(m in details for m in _NO_CONNECTION):
        details = (
            f"no server answered at {address}: is `rnnserve serve` running there, on that host and port? "
            f"(grpc: {details})"
        )
    return RnnServeError(code or grpc.StatusCode.UNKNOWN, details)
