"""Triton sequences on rnnserve sessions: (client, model, sequence id) -> the native session that holds its state.

A KServe client names its sequences with small ids it picks itself (1, 2, "user-7"). They never become native
session ids, which stay random 128-bit capabilities: a sequence id cannot reach a native session, nor the
other way round. Ids are per model, as Triton's sequence batcher keeps them, and per authenticated client
(see kserve.client_key). The native session behind a sequence keeps its TTL and the model's shared batcher.
"""

from __future__ import annotations

from dataclasses import dataclass

from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.server.core.session import Session
from rnnserve.server.errors import InvalidArgument, echo

SequenceId = int | str
Key = tuple[str, str, SequenceId]  # (client, model name, sequence id)


@dataclass(frozen=True)
class SequenceFlags:
    id: SequenceId | None  # None: the request is not part of a sequence
    start: bool
    end: bool


def _bool_param(params, name: str) -> bool:
    if name not in params:
        return False
    p = params[name]
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"parameter '{name}' must be a bool")
    return p.bool_param


def sequence_flags(request: kpb.ModelInferRequest) -> SequenceFlags:
    """The request's sequence_id (int64, uint64 or string; 0 and "" mean none), sequence_start, sequence_end."""
    params = request.parameters
    start, end = _bool_param(params, "sequence_start"), _bool_param(params, "sequence_end")
    seq: SequenceId | None = None
    if "sequence_id" in params:
        p = params["sequence_id"]
        kind = p.WhichOneof("parameter_choice")
        if kind in ("int64_param", "uint64_param"):
            seq = getattr(p, kind) or None
        elif kind == "string_param":
            seq = p.string_param or None
        else:
            raise InvalidArgument("parameter 'sequence_id' must be an int64, uint64 or string")
    if seq is None and (start or end):
        raise InvalidArgument("sequence_start and sequence_end need a non-zero sequence_id")
    return SequenceFlags(seq, start, end)


def missing_start(seq: SequenceId, model: str) -> InvalidArgument:
    # Triton's own wording, so code that matches on it keeps working.
    return InvalidArgument(
        f"inference request for sequence {echo(seq)} to model '{echo(model)}' must specify the START flag on the first "
        "request of the sequence"
    )


class SequenceTable:
    """Live sequences. An entry whose session has ended (closed, expired after the TTL, unloaded) is dead:
    lookups drop it, so the next request of that sequence needs START again, and opens sweep the table
    now and then so sequences nobody comes back for do not pile up."""

    _SWEEP_AT = 1024

    def __init__(self) -> None:
        self._live: dict[Key, Session] = {}
        self._sweep_at = self._SWEEP_AT

    def __len__(self) -> int:
        return len(self._live)

    def get(self, key: Key) -> Session | None:
        session = self._live.get(key)
        if session is not None and session.closed:
            del self._live[key]
            return None
        return session

    def put(self, key: Key, session: Session) -> None:
        self._live[key] = session
        if len(self._live) >= self._sweep_at:
            self._sweep()

    def pop(self, key: Key) -> Session | None:
        session = self._live.pop(key, None)
        return None if session is None or session.closed else session

    def _sweep(self) -> None:
        self._live = {k: s for k, s in self._live.items() if not s.closed}
        # Amortized: the next sweep waits until the table has doubled past what is live now.
        self._sweep_at = max(self._SWEEP_AT, 2 * len(self._live))
