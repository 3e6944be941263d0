"""The grpc channel settings both shells open their channels with, and the health service they ask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rnnserve.install import install_hint

# Chunks of many timesteps easily pass grpc's 4 MiB default receive limit.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# After a dropped connection grpc waits 1 s (growing to 120 s) between reconnection attempts; calls retried
# meanwhile fail at once. A client that retries transparently reconnects sooner.
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


def channel_options(max_message_bytes: int | None, options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """grpc channel options: reconnection backoff and message limits first, so explicit ``options`` override
    them."""
    opts: list[tuple[str, Any]] = list(RECONNECT_OPTIONS)
    if max_message_bytes is not None:
        opts += [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
    opts += list(options or ())
    return opts


def health_call(channel: Any, service: str) -> tuple[Any, Any]:
    """The standard health service's Check method on ``channel`` and the request for ``service``."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:  # a base-install dependency that grpcio itself does not ship: a partial install
        raise ImportError(
            f"health checks need grpcio-health-checking, which rnnserve installs: {install_hint('')}"
        ) from exc
    return health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest(service=service)


def health_status(response: Any) -> str:
    """The ServingStatus name of a grpc.health.v1 HealthCheckResponse (SERVING, NOT_SERVING, ...)."""
    return response.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[response.status].name
