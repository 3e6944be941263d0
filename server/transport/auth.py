"""Token authentication: ``authorization: Bearer TOKEN`` metadata on every RPC, mapped to a principal.

Tokens come from a file (``--auth-tokens``, one ``TOKEN PRINCIPAL`` per line, ``#`` comments) and/or the
``RNNSERVE_TOKENS`` environment variable (the same pairs separated by ``;`` or newlines). The health service
stays open, so orchestrators can probe without a secret; everything else, reflection included, needs a token.
The principal is put in a context variable (server/principal.py) for the call, so the data plane can bind
sessions to whoever opened them.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from rnnserve.server.principal import PRINCIPAL

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
# Repository control, through either API: with --admin-principals only those principals may call these.
ADMIN_METHODS = (
    "/rnnserve.v1.RnnServe/LoadModel",
    "/rnnserve.v1.RnnServe/UnloadModel",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
)


class TokenError(ValueError):
    """A token table that cannot be used (the server refuses to start with it)."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """``TOKEN PRINCIPAL`` pairs, one per line or ``;``-separated, ``#`` starting a comment -> {token: principal}."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.replace(";", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenError(f"{source}, entry {number}: expected 'TOKEN PRINCIPAL', got {len(parts)} field(s)")
        token, principal = parts
        if len(token) < 16:
            raise TokenError(f"{source}, entry {number}: token of principal {principal!r} is shorter than 16 chars")
        if token in tokens and tokens[token] != principal:
            raise TokenError(f"{source}, entry {number}: one token for two principals")
        tokens[token] = principal
    return tokens


def load_tokens(path: Path | None, env_value: str | None) -> dict[str, str]:
    """The token table of the settings; empty when authentication is off."""
    tokens: dict[str, str] = {}
    if path is not None:
        tokens.update(parse_tokens(path.read_text(), str(path)))
    if env_value:
        tokens.update(parse_tokens(env_value, "RNNSERVE_TOKENS"))
    return tokens


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _refusal(code: grpc.StatusCode, message: str, streaming: bool) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # an async generator, like the handler it replaces

    if streaming:
        return grpc.stream_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def _with_principal(handler: Any, principal: str) -> grpc.RpcMethodHandler:
    """The same handler, run with PRINCIPAL set (set inside the handler: that is the context it runs in).
    ``handler``: grpc's method handler, a named tuple of the aio server's async callables (which grpc's type
    stubs describe as the sync server's)."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            PRINCIPAL.set(principal)
            return await inner(request, context)

        return handler._replace(unary_unary=unary)
    if handler.stream_stream is not None:
        inner_stream = handler.stream_stream

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            PRINCIPAL.set(principal)
            async for response in inner_stream(request_iterator, context):
                yield response

        return handler._replace(stream_stream=stream)
    return handler  # rnnserve has no other kinds; the reflection service is stream-stream


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        tokens: dict[str, str],
        *,
        admins: frozenset[str] | None = None,
        on_refused: Callable[[str, grpc.StatusCode], None] | None = None,
    ):
        self._tokens = tokens
        self._admins = admins
        self._on_refused = on_refused

    def _principal(self, token: str | None) -> str | None:
        if token is None:
            return None
        found = None
        # Compare against every token in constant time, so timing does not reveal a token's prefix.
        for known, principal in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = principal
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED
        streaming = handler.request_streaming
        principal = self._principal(bearer_token(handler_call_details.invocation_metadata))
        if principal is None:
            return self._refuse(
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid token: send metadata 'authorization: Bearer <token>'",
                streaming,
            )
        if self._admins is not None and method in ADMIN_METHODS and principal not in self._admins:
            return self._refuse(
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"principal {principal!r} may not load or unload models (--admin-principals)",
                streaming,
            )
        return _with_principal(handler, principal)

    def _refuse(self, method: str, code: grpc.StatusCode, message: str, streaming: bool) -> grpc.RpcMethodHandler:
        if self._on_refused is not None:
            self._on_refused(method.rsplit("/", 1)[-1], code)
        return _refusal(code, message, streaming)
