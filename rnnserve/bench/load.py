"""Closed-loop load generators: worker processes driving rnnserve's native API (or the floor) with ``grpc.aio``.

A pool of spawned processes, pinned to the load CPUs, stays up for the whole bench; each phase splits its
sessions over them. Every stream is closed-loop: message t+1 goes out when message t's response has arrived, as a
stateful session cannot run ahead. The workers use raw method handles on pre-serialized request bytes
(a few input variants per stream, cycled), so per message the client only writes bytes, reads bytes and
parses the response to check every result's status; the floor runs this very code. As the client
SDK does, the client proposes each session's id on OpenSession and sends it as ``x-session-id`` metadata there,
on the session's stream and on CloseSession, so that behind the gateway every call of a session reaches one
replica (a server without a gateway ignores it).

A phase goes: setup (open sessions, open streams, ``warmup`` untimed round trips each) -> ``ready`` ->
the parent snapshots server counters and says ``go`` -> timed part -> ``done`` (parent snapshots again) ->
cleanup (close sessions) -> ``result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import secrets
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from rnnserve.bench.model import InputDesc, random_batch

SERVICE = "/rnnserve.v1.RnnServe/"
SHAPE_KEY = "x-bench-shape"  # echo.SHAPE_KEY; not imported so workers need not import the echo module
SESSION_KEY = "x-session-id"  # rnnserve.gateway.HEADER: the gateway routes a session's calls by it
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
INPUT_VARIANTS = 4  # distinct pre-serialized messages per stream, cycled


@dataclass(frozen=True)
class LoadSpec:
    """One phase of load, split over the pool's workers."""

    kind: Literal["steps", "open"]
    address: str
    target: Literal["rnnserve", "echo"]
    model: str
    inputs: tuple[InputDesc, ...]
    sessions: int
    """Sessions in the whole phase (all workers)."""
    group: int = 1
    """Sessions per stream, all of whose step t travels in one message (1: one stream per session)."""
    chunk: int = 0
    """Timesteps per message of one session (0: a single step without a time axis)."""
    steps: int = 1
    """Timesteps per session in the timed part (a multiple of ``chunk``)."""
    columnar: bool = False
    """Send a group's step t as one StepBatch (stacked inputs) instead of a list of StepRequests."""
    warmup: int = 1
    """Untimed round trips per stream before the timed part."""
    timeout: float = 300.0
    concurrency: int = 64
    """OpenSession/CloseSession calls in flight per worker."""
    version: int = 0
    seed: int = 0

    @property
    def steps_per_message(self) -> int:
        return max(self.chunk, 1)


@dataclass
class LoadResult:
    steps: int = 0
    messages: int = 0
    wall_s: float = 0.0
    latencies_ms: np.ndarray = field(default_factory=lambda: np.empty(0))
    client_cpu_s: float = 0.0
    opened: int = 0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms.size else float("nan")


class PhaseError(RuntimeError):
    pass


# ---- worker side --------------------------------------------------------------------------------------------
def _share(total: int, index: int, procs: int) -> int:
    return len(range(index, total, procs))


def _step_messages(spec: LoadSpec, session_ids: list[str], rng: np.random.Generator) -> list[bytes]:
    from rnnserve.proto import rnnserve_pb2 as pb
    from rnnserve.tensors import to_proto

    messages = []
    rows = max(spec.chunk, 1)
    for _ in range(INPUT_VARIANTS):
        request = pb.StreamStepRequest()
        if spec.columnar:
            request.batch.session_ids.extend(session_ids)
            for name, value in random_batch(list(spec.inputs), len(session_ids), rng).items():
                to_proto(value, request.batch.inputs[name])
            messages.append(request.SerializeToString())
            continue
        for sid in session_ids:
            step = request.steps.add(session_id=sid, num_steps=spec.chunk)
            for name, value in random_batch(list(spec.inputs), rows, rng).items():
                to_proto(value if spec.chunk else value[0], step.inputs[name])
        messages.append(request.SerializeToString())
    return messages


def _session_metadata(request: Any) -> tuple[tuple[str, str], ...]:
    return ((SESSION_KEY, request.session_id),)


async def _unary_many(
    channel,
    method: str,
    requests: list[Any],
    concurrency: int,
    parse: Callable,
    metadata: Callable[[Any], tuple[tuple[str, str], ...]] | None = None,
) -> list[Any]:
    """Send every request (``concurrency`` in flight, each with ``metadata(request)``); the responses, in order."""
    call = channel.unary_unary(
        SERVICE + method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=parse
    )
    results: list[Any] = [None] * len(requests)
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < len(requests):
            i = next_index
            next_index += 1
            results[i] = await call(requests[i], timeout=60, metadata=metadata(requests[i]) if metadata else None)

    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(requests))))))
    return results


class _Stream:
    """One closed-loop stream carrying the steps of ``len(session_ids)`` sessions per message."""

    def __init__(self, channel, spec: LoadSpec, session_ids: list[str], rng: np.random.Generator):
        from rnnserve.proto import rnnserve_pb2 as pb

        self._parse = pb.StreamStepResponse.FromString
        self.expected = len(session_ids)
        self.messages = _step_messages(spec, session_ids, rng)
        method = channel.stream_stream(SERVICE + "StreamStep", request_serializer=None, response_deserializer=None)
        self.columnar = spec.columnar
        metadata = [(SHAPE_KEY, f"{self.expected},{spec.chunk},{int(spec.columnar)}")]
        if self.expected == 1:
            # Behind the gateway a session's stream must reach the replica its OpenSession did (as the SDK does).
            metadata.append((SESSION_KEY, session_ids[0]))
        self.call = method(metadata=tuple(metadata))
        self.sent = 0

    async def round_trip(self) -> int:
        """Send one message, wait for its answer; the latency in ns. Raises on any failed step."""
        import grpc

        message = self.messages[self.sent % INPUT_VARIANTS]
        self.sent += 1
        t = time.perf_counter_ns()
        await self.call.write(message)
        raw = await self.call.read()
        elapsed = time.perf_counter_ns() - t
        if raw is grpc.aio.EOF:
            raise PhaseError(f"stream ended early: {await self.call.code()} {await self.call.details()}")
        response = self._parse(raw)
        if self.columnar:
            codes = response.batch.codes
            if len(codes) != self.expected or any(codes):
                raise PhaseError(f"batch failed: codes {list(codes)[:8]}... {list(response.batch.messages)[:2]}")
            return elapsed
        if len(response.results) != self.expected:
            raise PhaseError(f"{len(response.results)} results for {self.expected} steps")
        for result in response.results:
            if result.code:
                raise PhaseError(f"step failed: code {result.code}: {result.message}")
        return elapsed


async def _phase_steps(spec: LoadSpec, index: int, procs: int, commands: mp.Queue, out: mp.Queue, progress) -> None:
    import grpc

    from rnnserve.proto import rnnserve_pb2 as pb

    rng = np.random.default_rng([spec.seed, index])
    mine = _share(spec.sessions, index, procs)
    async with grpc.aio.insecure_channel(spec.address, options=CHANNEL_OPTIONS) as channel:
        if spec.target == "rnnserve":
            # The client proposes each session's id and sends it as x-session-id, as the client SDK does, so that
            # behind the gateway OpenSession lands on the replica that the session's later calls hash to.
            requests = [
                pb.OpenSessionRequest(model=spec.model, version=spec.version, session_id=secrets.token_urlsafe(16))
                for _ in range(mine)
            ]
            opened = await _unary_many(
                channel,
                "OpenSession",
                requests,
                spec.concurrency,
                pb.OpenSessionResponse.FromString,
                _session_metadata,
            )
            ids = [r.session_id for r in opened]
            if ids != [r.session_id for r in requests]:
                raise PhaseError("the server did not keep the proposed session ids")
        else:
            ids = [secrets.token_hex(16) for _ in range(mine)]
        streams = [_Stream(channel, spec, ids[i : i + spec.group], rng) for i in range(0, len(ids), spec.group)]

        async def warm(stream: _Stream) -> None:
            for _ in range(spec.warmup):
                await stream.round_trip()

        await asyncio.wait_for(asyncio.gather(*(warm(s) for s in streams)), spec.timeout)
        out.put(("ready", index, None))
        if await asyncio.get_running_loop().run_in_executor(None, commands.get) != "go":
            return
        messages = spec.steps // spec.steps_per_message
        per_message = spec.steps_per_message
        latencies: list[int] = []

        async def drive(stream: _Stream) -> None:
            for _ in range(messages):
                latencies.append(await stream.round_trip())
                progress[index] += per_message * stream.expected

        cpu0 = time.process_time()
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(drive(s) for s in streams)), spec.timeout)
        t1 = time.monotonic()
        cpu = time.process_time() - cpu0
        out.put(("done", index, None))
        for stream in streams:
            await stream.call.done_writing()
        if spec.target == "rnnserve":
            await _unary_many(
                channel,
                "CloseSession",
                [pb.SessionRequest(session_id=sid) for sid in ids],
                spec.concurrency,
                pb.CloseSessionResponse.FromString,
                _session_metadata,
            )
        payload = {
            "steps": messages * per_message * len(ids),
            "messages": len(latencies),
            "t0": t0,
            "t1": t1,
            "latencies_ns": np.asarray(latencies, dtype=np.int64),
            "cpu_s": cpu,
        }
        out.put(("result", index, payload))


async def _phase_open(spec: LoadSpec, index: int, procs: int, commands: mp.Queue, out: mp.Queue, progress) -> None:
    import grpc

    from rnnserve.proto import rnnserve_pb2 as pb

    mine = _share(spec.sessions, index, procs)
    async with grpc.aio.insecure_channel(spec.address, options=CHANNEL_OPTIONS) as channel:
        out.put(("ready", index, None))
        if await asyncio.get_running_loop().run_in_executor(None, commands.get) != "go":
            return
        call = channel.unary_unary(
            SERVICE + "OpenSession",
            request_serializer=pb.OpenSessionRequest.SerializeToString,
            response_deserializer=pb.OpenSessionResponse.FromString,
        )
        request = pb.OpenSessionRequest(model=spec.model, version=spec.version)
        left = mine

        async def lane() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call(request, timeout=60)
                progress[index] += 1

        cpu0 = time.process_time()
        t0 = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(*(lane() for _ in range(max(1, min(spec.concurrency, mine))))), spec.timeout
        )
        t1 = time.monotonic()
        out.put(("done", index, None))
        out.put(("result", index, {"opened": mine, "t0": t0, "t1": t1, "cpu_s": time.process_time() - cpu0}))


def worker_main(index: int, commands: mp.Queue, out: mp.Queue, progress, cpus: list[int] | None = None) -> None:
    """A load generator process: run phases until told to stop (``None``)."""
    import os
    import signal

    if cpus:  # before grpc starts its threads, which inherit it
        os.sched_setaffinity(0, cpus)
    # The parent handles Ctrl-C and stops the pool; a worker must not die half-way through a message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        command = commands.get()
        if command is None:
            return
        spec, procs = command
        try:
            runner = _phase_steps if spec.kind == "steps" else _phase_open
            asyncio.run(runner(spec, index, procs, commands, out, progress))
        except BaseException as exc:
            detail = "timed out" if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) else traceback.format_exc()
            out.put(("error", index, f"{type(exc).__name__}: {exc} {detail}".strip()))


# ---- parent side --------------------------------------------------------------------------------------------
class LoadPool:
    """``procs`` load generator processes on ``cpus`` (spawned: grpc and fork do not mix)."""

    def __init__(self, procs: int, cpus: list[int] | None = None):
        self.procs = max(1, procs)
        self.cpus = cpus
        self._ctx = mp.get_context("spawn")
        self._workers: list[Any] = []
        self._commands: list[Any] = []
        self._out: Any = None
        self.progress: Any = None

    def start(self) -> LoadPool:
        self._out = self._ctx.Queue()
        self.progress = self._ctx.RawArray("q", self.procs)
        for i in range(self.procs):
            commands = self._ctx.Queue()
            proc = self._ctx.Process(
                target=worker_main,
                args=(i, commands, self._out, self.progress, self.cpus),
                name=f"bench-load-{i}",
                daemon=True,
            )
            proc.start()
            self._workers.append(proc)
            self._commands.append(commands)
        return self

    def close(self) -> None:
        for commands in self._commands:
            with contextlib.suppress(OSError, ValueError):
                commands.put(None)
        deadline = time.monotonic() + 3
        for proc in self._workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        self._workers, self._commands = [], []

    def restart(self) -> None:
        self.close()
        self.start()

    def _collect(self, kind: str, count: int, timeout: float, tick: Callable[[], None] | None) -> list[Any]:
        """One ``kind`` message from each of the first ``count`` workers, in worker order."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                what, index, payload = self._out.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self._workers if not p.is_alive()]
                if dead:
                    raise PhaseError(f"load generator(s) {dead} died") from None
                if time.monotonic() > deadline:
                    raise PhaseError(f"load generators did not report {kind!r} within {timeout:.0f} s") from None
                if tick is not None:
                    tick()
                continue
            if what == "error":
                raise PhaseError(f"load generator {index}: {payload}")
            if what != kind:
                raise PhaseError(f"load generator {index} said {what!r}, expected {kind!r}")
            got[index] = payload
        return [got[i] for i in range(count)]

    def run(
        self,
        spec: LoadSpec,
        *,
        on_start: Callable[[], None] | None = None,
        on_done: Callable[[], None] | None = None,
        tick: Callable[[int], None] | None = None,
    ) -> LoadResult:
        """Run one phase; ``on_start``/``on_done`` run right before and after the timed part, ``tick(done)``
        about once a second with the steps (or opens) done so far."""
        # Fewer sessions than workers: only the first ``procs`` workers take part.
        procs = min(self.procs, spec.sessions)
        for i in range(self.procs):
            self.progress[i] = 0
        active = self._commands[:procs]
        for commands in active:
            commands.put((spec, procs))
        progress = (lambda: tick(sum(self.progress))) if tick is not None else None
        self._collect("ready", procs, spec.timeout + 60, progress)
        if on_start is not None:
            on_start()
        for commands in active:
            commands.put("go")
        self._collect("done", procs, spec.timeout + 30, progress)
        if on_done is not None:
            on_done()
        payloads = self._collect("result", procs, spec.timeout + 60, progress)
        t0 = min(p["t0"] for p in payloads)
        t1 = max(p["t1"] for p in payloads)
        result = LoadResult(wall_s=t1 - t0, client_cpu_s=sum(p["cpu_s"] for p in payloads))
        if spec.kind == "open":
            result.opened = sum(p["opened"] for p in payloads)
        else:
            result.steps = sum(p["steps"] for p in payloads)
            result.messages = sum(p["messages"] for p in payloads)
            result.latencies_ms = np.concatenate([p["latencies_ns"] for p in payloads]) / 1e6
        return result
