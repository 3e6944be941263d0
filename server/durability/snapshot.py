"""Session snapshots: self-describing, checksummed bytes that restore a session here or on another replica."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.errors import FailedPrecondition, InvalidArgument
from rnnserve.tensors import TensorDecodeError, decode_map, encode_map

MAGIC = b"RNS1"
_HEADER = struct.Struct("<4sI")


@dataclass
class Snapshot:
    model: str
    version: int
    steps: int
    state: dict[str, np.ndarray]


def encode(snapshot: Snapshot) -> bytes:
    msg = pb.SessionSnapshot(model=snapshot.model, version=snapshot.version, steps=snapshot.steps)
    encode_map(snapshot.state, msg.state)
    payload = msg.SerializeToString()
    return _HEADER.pack(MAGIC, zlib.crc32(payload)) + payload


def decode(data: bytes) -> Snapshot:
    if len(data) < _HEADER.size:
        raise InvalidArgument("snapshot is too short to be an rnnserve snapshot (take one with GetState)")
    magic, crc = _HEADER.unpack_from(data)
    payload = data[_HEADER.size :]
    if magic != MAGIC:
        raise InvalidArgument(f"snapshot does not start with {MAGIC!r}: it is not an rnnserve snapshot")
    if zlib.crc32(payload) != crc:
        raise InvalidArgument("snapshot checksum mismatch: the bytes were truncated or altered")
    try:
        msg = pb.SessionSnapshot.FromString(payload)
        state = decode_map(msg.state)
    except (DecodeError, TensorDecodeError) as exc:
        raise InvalidArgument(f"snapshot payload is malformed: {exc}") from exc
    return Snapshot(msg.model, msg.version, msg.steps, state)


def check_target(snapshot: Snapshot, model: str, version: int, *, allow_other_version: bool) -> None:
    """A snapshot restores only into its own model, and only into its own version unless the caller allows
    another: matching state shapes alone do not make another model's state meaningful."""
    if snapshot.model != model or (snapshot.version != version and not allow_other_version):
        hint = (
            "set allow_other_version to restore it into another version of its model"
            if snapshot.model == model
            else "a snapshot restores only into its own model"
        )
        raise FailedPrecondition(
            f"the snapshot is of model {snapshot.model}:{snapshot.version}, not {model}:{version}; {hint}"
        )
