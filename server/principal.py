"""Who is calling: the authenticated principal of the current RPC, for the data plane (which has no grpc).

The auth interceptor (server/transport/auth.py) sets it for the duration of each call; tasks a handler starts copy it.
None means authentication is off: sessions are then not bound to a caller.
"""

from __future__ import annotations

from contextvars import ContextVar

PRINCIPAL: ContextVar[str | None] = ContextVar("rnnserve_principal", default=None)


def current_principal() -> str | None:
    return PRINCIPAL.get()
