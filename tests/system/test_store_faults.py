"""Session-store faults under every-step durability, with a real redis-server: restarted under a stream (kill -9),
restarted older than the servers' copies (an RDB snapshot loaded), and hung mid-write (SIGSTOP). Nothing the
client saw acknowledged is lost, and a step whose outcome the server could not learn is settled by its retry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from conftest import TINY_INPUT, TINY_OUTPUT, tiny_expected
from redis_server import RedisServer, needs_redis
from test_durability import check_against_eager, durable_repository, eventually, steps_of, stub_for

from rnnserve.client import AsyncClient, Client, RnnServeError
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.server.durability.store import open_store
from rnnserve.tensors import from_proto, to_proto

__all__ = ["durable_repository"]  # a module-scoped fixture shared with test_durability

MODEL = "gru_every"
SAVE_ERRORS = (MODEL, 1, "save")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server whose `SAVE` snapshots are what a restart loads."""
    server = RedisServer(data=tmp_path).start()
    yield server
    server.resume()  # a test that failed while it was paused
    server.stop()


def in_background(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` on a thread; the returned join re-raises what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test thread
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(60)
        assert not thread.is_alive()
        if raised:
            raise raised[0]

    return join


def stored_steps(url: str, session_id: str) -> int:
    store = open_store(url, ttl=60)
    try:
        record = store.get(session_id)
        return -1 if record is None else record.steps
    finally:
        store.close()


Fault = Callable[[], Callable[[], None]]
"""Starts a fault and returns a join, called once the stream ends."""


def stream_through_a_fault(
    address: str, store_url: str, xs: np.ndarray, flavour: str, fault_after: int, fault: Fault
) -> tuple[list[np.ndarray], int, int, int]:
    """Stream ``xs`` through one session with the SDK (``flavour``: sync or asyncio client, retries on), calling
    ``fault()`` once ``fault_after`` outputs are in; the join it returns is called once the stream ends. Returns
    the outputs, the steps the client acknowledged, and the server's and the store's step counts after it."""
    ys: list[np.ndarray] = []
    joins: list[Callable[[], None]] = []

    def took(y: np.ndarray) -> None:
        ys.append(y)
        if len(ys) == fault_after:
            joins.append(fault())

    if flavour == "sync":
        with Client(address, retries=50) as client, client.session(MODEL) as s:
            for y in s.stream(xs, window=4):
                took(y)
            joins[0]()
            return ys, s.steps, s._get_state().steps, stored_steps(store_url, s.id)

    async def run() -> tuple[list[np.ndarray], int, int, int]:
        async with AsyncClient(address, retries=50) as client, client.session(MODEL) as s:
            async for y in s.stream(xs, window=4):
                took(y)
            joins[0]()
            return ys, s.steps, (await s._get_state()).steps, stored_steps(store_url, s.id)

    return asyncio.run(run())


# ---- Redis restarts under SDK streams ------------------------------------------------------------------------
@needs_redis
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_sdk_streams_ride_out_a_redis_restart(durable_repository, redis_server, server_factory, flavour):
    """Redis is killed (kill -9) mid-stream and restarted (empty) a moment later: the steps written meanwhile fail
    with a retryable status, and the stream retries them like a broken stream, from their step indexes."""
    total = 40
    xs = np.random.default_rng(21).standard_normal((total, TINY_INPUT)).astype(np.float32)
    server = server_factory(durable_repository, session_store=redis_server.url)
    store_errors = server.server.persistence.errors
    errors = store_errors[SAVE_ERRORS]

    def kill_and_restart() -> Callable[[], None]:
        redis_server.stop()  # SIGKILL
        # Restarted while the stream goes on: its next steps meet a dead store first.
        return in_background(lambda: (threading.Event().wait(0.5), redis_server.start()))

    ys, acknowledged, server_steps, stored = stream_through_a_fault(
        server.address, redis_server.url, xs, flavour, 12, kill_and_restart
    )
    assert store_errors[SAVE_ERRORS] > errors  # some steps did meet the dead store
    assert acknowledged == server_steps == stored == total
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)


# ---- Redis restarts older than the servers' copies -------------------------------------------------------------
@needs_redis
def test_a_store_restored_older_loses_no_acknowledged_step(durable_repository, redis_server, server_factory):
    """An RDB snapshot taken at step 10, Redis killed at step 20 and restarted from it: every record is ten steps
    behind the server's copy. The copy is the truth: the next step writes it back, and no acknowledged step is
    lost (the sessions go on to the end and equal eager PyTorch)."""
    n, total, saved_at, restart_at = 10, 30, 10, 20
    xs = np.random.default_rng(22).standard_normal((n, total, TINY_INPUT)).astype(np.float32)
    ys = np.full((n, total, TINY_OUTPUT), np.nan, np.float32)
    server = server_factory(durable_repository, session_store=redis_server.url)
    admin = redis.Redis.from_url(redis_server.url)
    with Client(server.address, retries=5) as client:
        sessions = [client.open_session(MODEL) for _ in range(n)]
        for t in range(total):
            if t == saved_at:
                admin.save()
            if t == restart_at:
                redis_server.stop()
                redis_server.start()  # loads the snapshot
                admin = redis.Redis.from_url(redis_server.url)
                assert {stored_steps(redis_server.url, s.id) for s in sessions} == {saved_at}
            for i, s in enumerate(sessions):
                ys[i, t] = s.step(xs[i, t])
        assert [s.steps for s in sessions] == [total] * n
        channel, stub = stub_for(server.address)
        with channel:
            assert {steps_of(stub, s.id) for s in sessions} == {total}
        assert {stored_steps(redis_server.url, s.id) for s in sessions} == {total}
    admin.close()
    check_against_eager(xs, ys)


@needs_redis
def test_two_replicas_and_a_store_restored_older(durable_repository, redis_server, server_factory):
    """A session moves A -> B; Redis then comes back from a snapshot older than both copies. B's copy (newer) is
    the truth and is written back on its next step; A's copy is stale: A never writes it, and a step numbered
    past it is refused there without changing anything."""
    xs = np.random.default_rng(23).standard_normal((12, TINY_INPUT)).astype(np.float32)
    a = server_factory(durable_repository, session_store=redis_server.url)
    b = server_factory(durable_repository, session_store=redis_server.url)
    (ch_a, stub_a), (ch_b, stub_b) = stub_for(a.address), stub_for(b.address)
    admin = redis.Redis.from_url(redis_server.url)

    def step(stub: pb_grpc.RnnServeStub, sid: str, t: int) -> np.ndarray:
        request = pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs[t])}, step_index=t + 1)
        return from_proto(stub.Step(request, timeout=20).outputs["y"])

    with ch_a, ch_b:
        sid = stub_a.OpenSession(pb.OpenSessionRequest(model=MODEL)).session_id
        ys = [step(stub_a, sid, t) for t in range(3)]
        admin.save()  # the store at step 3
        ys += [step(stub_a, sid, t) for t in range(3, 5)]
        ys += [step(stub_b, sid, t) for t in range(5, 10)]  # B loads it from the store at step 5
        admin.close()
        redis_server.stop()
        redis_server.start()
        assert stored_steps(redis_server.url, sid) == 3
        with pytest.raises(grpc.RpcError) as info:  # A's copy (step 5) is behind the client
            step(stub_a, sid, 10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
        assert stored_steps(redis_server.url, sid) == 3  # A wrote nothing
        ys += [step(stub_b, sid, t) for t in range(10, 12)]  # B's copy goes on, and is written back
        assert stored_steps(redis_server.url, sid) == 12
        assert steps_of(stub_a, sid) == 12  # A now finds the store newer than its copy, and reloads
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)


# ---- Redis hangs mid-write -----------------------------------------------------------------------------------
@needs_redis
def test_a_write_redis_never_confirmed_is_reported_unknown(durable_repository, redis_server, server_factory):
    """Redis is stopped (SIGSTOP) while a step is written: the step fails with DEADLINE_EXCEEDED saying its outcome
    is unknown (its write is queued in Redis and lands when Redis continues); resent with its step_index, it is
    applied once whichever way it went, and the session ends as a fault-free run."""
    total, hang_at = 8, 4
    xs = np.random.default_rng(24).standard_normal((total, TINY_INPUT)).astype(np.float32)
    server = server_factory(durable_repository, session_store=redis_server.url)
    with Client(server.address, retries=0) as client, client.session(MODEL) as s:
        ys = [s.step(x) for x in xs[:hang_at]]
        redis_server.pause()
        with pytest.raises(RnnServeError) as info:
            s.step(xs[hang_at])
        redis_server.resume()
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
        assert "may or may not" in info.value.message and "step_index" in info.value.message
        assert s.steps == hang_at
        ys += [s.step(x) for x in xs[hang_at:]]  # the same index again first: applied at most once
        assert s.steps == total
        channel, stub = stub_for(server.address)
        with channel:
            assert steps_of(stub, s.id) == total
        assert stored_steps(redis_server.url, s.id) == total
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)


@needs_redis
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_sdk_streams_ride_out_a_hung_redis(durable_repository, redis_server, server_factory, flavour):
    """SIGSTOP of Redis mid-stream, SIGCONT once a step's write has failed (its write then lands late): the SDK's
    stream retries the step whose outcome is unknown and finishes; its outputs equal eager PyTorch, and the
    server's step count equals the steps the client acknowledged."""
    total = 16
    xs = np.random.default_rng(25).standard_normal((total, TINY_INPUT)).astype(np.float32)
    server = server_factory(durable_repository, session_store=redis_server.url)
    store_errors = server.server.persistence.errors
    errors = store_errors[SAVE_ERRORS]

    def resume_after_a_failed_write() -> None:
        assert eventually(lambda: store_errors[SAVE_ERRORS] > errors, timeout=30)
        redis_server.resume()

    def hang() -> Callable[[], None]:
        redis_server.pause()
        return in_background(resume_after_a_failed_write)

    ys, acknowledged, server_steps, stored = stream_through_a_fault(
        server.address, redis_server.url, xs, flavour, 6, hang
    )
    assert acknowledged == server_steps == stored == total
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)
