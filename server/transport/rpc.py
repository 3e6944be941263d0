"""Both services' handlers take raw request bytes: the request is parsed here (garbage gets INVALID_ARGUMENT
naming the expected type, not grpc's INTERNAL), and a unary method's refusal becomes the call's status."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from rnnserve.server.errors import InvalidArgument, ResourceExhausted
from rnnserve.server.transport.status import end_with

UnaryMethod = Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]
Parsed = TypeVar("Parsed", bound=Message)


def parse(message_type: type[Parsed], data: bytes, max_bytes: int | None = None) -> Parsed:
    """Deserialize a request ourselves so garbage bytes get INVALID_ARGUMENT with the expected type named
    (grpc's own deserializer would answer INTERNAL), and a message over ``max_bytes`` (--max-message-bytes)
    gets RESOURCE_EXHAUSTED naming that flag (see ``transport_receive_limit``)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ResourceExhausted(
            f"the {message_type.DESCRIPTOR.name} message is {len(data)} bytes; the limit is {max_bytes} bytes "
            "per message (--max-message-bytes)"
        )
    try:
        return message_type.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidArgument(f"request is not a valid {message_type.DESCRIPTOR.full_name} message ({exc})") from exc


def transport_receive_limit(max_message_bytes: int) -> int:
    """grpc's own receive limit for a server whose messages are bounded by ``max_message_bytes``: twice that,
    so a message somewhat over the bound reaches ``parse`` and its refusal names --max-message-bytes (grpc's
    own refusal names neither the flag nor the limit). grpc caps the option at 2**31 - 1."""
    return min(2 * max_message_bytes, 2**31 - 1)


def unary(
    method: UnaryMethod,
    request_type: type[Message],
    *,
    max_bytes: int,
    rejected: Counter[tuple[str, str]] | None = None,
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message | None]]:
    """``method`` on the parsed request; a refusal ends the call with its status (counted in ``rejected``)."""
    name = method.__name__

    async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Message | None:
        try:
            return await method(parse(request_type, raw, max_bytes), context)
        except Exception as exc:
            code = end_with(context, exc, log_as=request_type.DESCRIPTOR.name)
            if rejected is not None:
                rejected[(name, code.name)] += 1
        return None

    return handler


def service_handler(
    name: str,
    service: ServiceDescriptor,
    servicer: object,
    *,
    max_bytes: int,
    rejected: Counter[tuple[str, str]] | None = None,
) -> grpc.GenericRpcHandler:
    """Every method of ``service`` (the proto's descriptor), served under ``name`` by ``servicer``'s method of
    the same name: a unary one on its parsed request (``unary``), a streaming one on the raw message stream (it
    parses each message its own way: see server/transport/pump.py)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        call = getattr(servicer, method.name)
        response_type = GetMessageClass(method.output_type)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                call, response_serializer=response_type.SerializeToString
            )
        else:
            request_type = GetMessageClass(method.input_type)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                unary(call, request_type, max_bytes=max_bytes, rejected=rejected),
                response_serializer=response_type.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(name, handlers)
