"""Request limits: every bound a client can run into, checked before anything is decoded or queued.

A request past a limit gets RESOURCE_EXHAUSTED with a message naming the limit (the flag that sets it), so
an operator can tell which bound was hit and a client can tell what to shrink. Limits are checked on the
protobuf message, before tensors are decoded, so an oversized request costs no more than reading its header.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.errors import ResourceExhausted, echo
from rnnserve.server.principal import current_principal
from rnnserve.tensors import decode_map, element_count, from_proto


@dataclass(frozen=True)
class Limits:
    """The per-request and per-model bounds (see ServerSettings for each one's meaning)."""

    max_tensor_elements: int = 4_194_304
    max_steps_per_message: int = 16_384
    max_queued_steps: int = 131_072
    max_sessions_per_client: int | None = None
    max_message_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings) -> Limits:  # settings: ServerSettings (not imported: no pydantic here)
        return cls(
            max_tensor_elements=settings.max_tensor_elements,
            max_steps_per_message=settings.max_steps_per_message,
            max_queued_steps=settings.max_queued_steps,
            max_sessions_per_client=settings.max_sessions_per_client,
            max_message_bytes=settings.max_message_bytes,
        )

    # ---- sessions -----------------------------------------------------------------------------------------
    def session_owner(self, peer: str | None) -> str | None:
        """Whom a new session belongs to, whichever API opens it: the principal with auth on; else the peer's
        host when sessions are counted per client (``peer``: grpc's ``context.peer()``); None otherwise, so an
        idle session does not carry a string it never needs."""
        principal = current_principal()
        if principal is not None:
            return principal
        if self.max_sessions_per_client is not None:
            return peer_host(peer or "unknown")
        return None

    # ---- tensors ----------------------------------------------------------------------------------------
    def check_tensor(self, msg: pb.Tensor, name: str) -> None:
        self.check_elements(name, msg.shape, element_count(msg.shape, name))

    def check_elements(self, name: str, shape: Sequence[int], count: int) -> None:
        """Refuse a tensor of either API whose claimed shape holds more than --max-tensor-elements elements."""
        if count > self.max_tensor_elements:
            raise ResourceExhausted(
                f"tensor '{echo(name)}' has shape {list(shape)[:8]} ({count} elements); the limit is "
                f"{self.max_tensor_elements} elements per tensor (--max-tensor-elements)"
            )

    def tensors(self, field: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
        """Decode a ``map<string, Tensor>`` field after checking every tensor's element count."""
        for name, msg in field.items():
            self.check_tensor(msg, name)
        return decode_map(field)

    def tensor(self, msg: pb.Tensor, name: str) -> np.ndarray:
        self.check_tensor(msg, name)
        return from_proto(msg, name)

    # ---- steps ------------------------------------------------------------------------------------------
    def check_steps(self, count: int) -> None:
        if count > self.max_steps_per_message:
            raise ResourceExhausted(
                f"the message carries {count} steps; the limit is {self.max_steps_per_message} steps per message "
                "(--max-steps-per-message): split it"
            )

    def stream_message_error(self, message: pb.StreamStepRequest) -> ResourceExhausted | None:
        """Why a StreamStep message is refused as a whole (chunk lengths and StepBatch rows add up), or None."""
        count = len(message.batch.session_ids)
        for step in message.steps:
            count += step.num_steps or 1
        try:
            self.check_steps(count)
        except ResourceExhausted as exc:
            return exc
        return None

    def check_queue(self, queued: int, adding: int, model_key: str) -> None:
        """A model version's global bound on queued steps (all sessions): backpressure, not unbounded memory."""
        if queued + adding > self.max_queued_steps:
            raise ResourceExhausted(
                f"model {model_key} already has {queued} steps queued; the limit is {self.max_queued_steps} "
                "(--max-queued-steps): the server is overloaded, retry later"
            )


def peer_host(peer: str) -> str:
    """The client's address without its port: ``ipv4:10.0.0.1:5123`` -> ``ipv4:10.0.0.1``,
    ``ipv6:[::1]:5123`` -> ``ipv6:[::1]`` (each connection has its own port; a client is its host)."""
    head, sep, tail = peer.rpartition(":")
    if sep and tail.isdigit() and head.count(":") >= 1:
        return head
    return peer
