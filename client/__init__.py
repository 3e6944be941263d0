"""rnnserve client SDK: sync (``Client``) and asyncio (``AsyncClient``), numpy only (no torch).

::

    from rnnserve.client import Client

    with Client("localhost:50051") as client, client.session("lstm") as s:
        y = s.step(x)                 # one timestep, per-session shapes
        ys = s.step_chunk(xs)         # several timesteps in one message (leading time axis)
        for y in s.stream(xs):        # a bidirectional stream, pipelined in order
            ...

Every server error, whether a failed call or a failed step inside a stream, raises ``RnnServeError``.
"""

from rnnserve.client._aio import AsyncClient, AsyncMultiStream, AsyncSession
from rnnserve.client._channel import DEFAULT_MAX_MESSAGE_BYTES
from rnnserve.client._errors import RnnServeError
from rnnserve.client._predict import PredictResult
from rnnserve.client._stream import DEFAULT_WINDOW
from rnnserve.client._sync import Client, MultiStream, Session
from rnnserve.client._types import BatchResult, ModelInfo, ModelStats, StateSpec, Stats, TensorSpec, UnloadResult

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_WINDOW",
    "AsyncClient",
    "AsyncMultiStream",
    "AsyncSession",
    "BatchResult",
    "Client",
    "ModelInfo",
    "ModelStats",
    "MultiStream",
    "PredictResult",
    "RnnServeError",
    "Session",
    "StateSpec",
    "Stats",
    "TensorSpec",
    "UnloadResult",
]
