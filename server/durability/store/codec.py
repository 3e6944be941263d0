"""A session record as bytes, for a store outside the process (server/durability/store/redis.py).

The body is a snapshot (server/durability/snapshot.py: self-describing, checksummed), the replay cache another, and the
whole is a list of named fields: ``b"RNR1"``, then per field a u16 name length, the name, a u32 value length
and the value. Encoding runs on the store's I/O thread, never on a batch's critical path more than needed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from rnnserve.server.core.sessions import session_id_of
from rnnserve.server.core.work import ReplayEntry
from rnnserve.server.durability import snapshot as snapshots
from rnnserve.server.durability.store import SessionRecord
from rnnserve.server.errors import Internal, InvalidArgument

MAGIC = b"RNR1"
_NAME, _VALUE = struct.Struct("<H"), struct.Struct("<I")
_SNAPSHOT, _OWNER, _REPLAY = "snapshot", "owner", "replay"


def encode_replay(entries: Sequence[ReplayEntry]) -> bytes:
    if not entries:
        return b""
    # Every step of every entry has the model's outputs, same shapes: one stacked tensor per output keeps
    # this a few tensors whatever the window (it is encoded with every write of the session).
    meta = np.array([(i, n, fp) for i, n, fp, _ in entries], dtype=np.int64)
    steps = [step for _, _, _, outs in entries for step in outs]
    arrays = {"meta": meta, **{str(o): np.stack([s[o] for s in steps]) for o in range(len(steps[0]))}}
    return snapshots.encode(snapshots.Snapshot("replay", 1, len(entries), arrays))


def decode_replay(data: bytes) -> list[ReplayEntry]:
    if not data:
        return []
    arrays = snapshots.decode(data).state
    outputs = [arrays[str(o)] for o in range(len(arrays) - 1)]
    entries: list[ReplayEntry] = []
    row = 0
    for index, num_steps, print_ in arrays["meta"].tolist():
        count = num_steps or 1
        entries.append(ReplayEntry(index, num_steps, print_, [[o[row + t] for o in outputs] for t in range(count)]))
        row += count
    return entries


def encode_record(record: SessionRecord) -> bytes:
    snap = snapshots.Snapshot(record.model, record.version, record.steps, record.state)
    fields = {
        **record.extra,
        _SNAPSHOT: snapshots.encode(snap),
        _OWNER: record.owner.encode(),
        _REPLAY: encode_replay(record.replay),
    }
    parts = [MAGIC]
    for name, value in fields.items():
        key = name.encode()
        parts += [_NAME.pack(len(key)), key, _VALUE.pack(len(value)), value]
    return b"".join(parts)


def _fields(data: bytes) -> dict[str, bytes]:
    if not data.startswith(MAGIC):
        raise ValueError(f"it does not start with {MAGIC!r}")
    fields, at = {}, len(MAGIC)
    while at < len(data):
        (n,) = _NAME.unpack_from(data, at)
        name = data[at + 2 : at + 2 + n].decode()
        at += 2 + n
        (n,) = _VALUE.unpack_from(data, at)
        at += 4
        if at + n > len(data):
            raise ValueError(f"field {name!r} is truncated")
        fields[name] = data[at : at + n]
        at += n
    return fields


def decode_record(key: str, data: bytes) -> SessionRecord:
    try:
        fields = _fields(data)
        snap = snapshots.decode(fields.pop(_SNAPSHOT))
        replay = decode_replay(fields.pop(_REPLAY, b""))
    except (ValueError, KeyError, struct.error, InvalidArgument) as exc:
        reason = exc.message if isinstance(exc, InvalidArgument) else f"{type(exc).__name__}: {exc}"
        # Named by the client's id: the key may hold the principal, which no message shows.
        raise Internal(f"session '{session_id_of(key)}' in the session store is corrupt: {reason}") from exc
    owner = fields.pop(_OWNER, b"").decode()
    return SessionRecord(key, snap.model, snap.version, snap.steps, snap.state, owner, replay, fields)
