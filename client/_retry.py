"""Retry decisions: which failures are retried, how long to wait before each retry, and how many in a row.

Only UNAVAILABLE (no connection, a dropped one, a server restarting, its session store down),
DEADLINE_EXCEEDED (the call's deadline, or a step whose session-store write was not confirmed: its outcome is
unknown) and ABORTED (the session moved to another replica behind the gateway, which the retry reaches) are
retried, as a call's status and as a stream step's (``_stream.check_resumable``): every other status is the
server's answer and would be the same again. Steps are safe to resend because each carries
its session's ``step_index``: the server answers a repeat of an applied step from its replay cache instead of
stepping twice (docs/durability.md, "Exactly-once steps and retries").

Nothing here does I/O: the shells report failures, and sleep for the delays these decisions return.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from rnnserve.client._errors import RnnServeError, from_rpc_error

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})


# grpc core's own messages for a stream that broke under it (never an rnnserve server's words).
_TRANSPORT_BREAKS = ("RST_STREAM", "Internal error from Core", "Stream removed")


def retry_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    """The status a failed call counts as for retrying. A proxy (the gateway) whose replica died mid-call
    resets the HTTP/2 stream, which grpc reports as INTERNAL ("Received RST_STREAM", or in asyncio "Internal
    error from Core"): a broken connection, not the server's answer, so it counts as UNAVAILABLE."""
    code = err.code()
    if code == grpc.StatusCode.INTERNAL and any(m in (err.details() or "") for m in _TRANSPORT_BREAKS):
        return grpc.StatusCode.UNAVAILABLE
    if code == grpc.StatusCode.CANCELLED:
        # Our own cancellation never gets here (the clients stop before asking); this one is a server ending
        # its calls at the end of its shutdown grace: like a dropped connection.
        return grpc.StatusCode.UNAVAILABLE
    return code


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` consecutive failed attempts are retried (0: none), after an exponential backoff from
    ``backoff`` seconds, capped at ``max_backoff``, with jitter so that many clients do not retry in step."""

    retries: int = 5
    backoff: float = 0.05
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"retries and backoffs must be >= 0, got {self}")

    def should_retry(self, code: grpc.StatusCode | None, failures: int) -> bool:
        """Whether a call that failed with ``code`` after ``failures`` earlier failures is tried again."""
        return code in RETRYABLE and failures < self.retries

    def delay(self, failures: int) -> float:
        """Seconds to wait before retry number ``failures + 1``: half the backoff fixed, half random."""
        cap = min(self.max_backoff, self.backoff * 2**failures)
        return cap / 2 + random.uniform(0, cap / 2)


Failure = grpc.RpcError | RnnServeError
"""How an attempt failed: the call's own status (as grpc raised it), or the server's answer inside it."""


def failure_status(failure: Failure, address: str = "") -> tuple[grpc.StatusCode | None, RnnServeError]:
    """The status ``failure`` counts as for retrying, and the error the caller gets when it is not retried
    (naming ``address``, the client's target, when the call reached no server)."""
    if isinstance(failure, RnnServeError):
        return failure.code, failure
    return retry_code(failure), from_rpc_error(failure, address)


class Attempts:
    """The consecutive failed attempts of one call, or of one stream's calls, under a policy, to ``address``
    (the client's target, which the error names when no server answered there).

    A stream counts failures since its last answered step: ``retries`` bounds reconnections in a row, not in
    a stream's lifetime, so a long stream rides out many separate drops.
    """

    def __init__(self, policy: RetryPolicy, address: str = "") -> None:
        self.policy = policy
        self.address = address
        self.failures = 0

    def after(self, failure: Failure, *, allowed: bool = True) -> float:
        """Seconds to wait before the next attempt after ``failure``; raises the failure as RnnServeError
        when it is not retried (``allowed=False``: the request may not be resent, whatever the status)."""
        code, error = failure_status(failure, self.address)
        if not (allowed and self.policy.should_retry(code, self.failures)):
            raise error from None  # the grpc exception adds nothing the RnnServeError does not say
        delay = self.policy.delay(self.failures)
        self.failures += 1
        return delay

    def succeeded(self) -> None:
        self.failures = 0
