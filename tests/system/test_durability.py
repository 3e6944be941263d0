"""Durable sessions (issue 5): the session store backends, and sessions that survive `kill -9` of the server.

The restart tests run real `rnnserve serve` processes on a real `redis-server` (started here on a free
loopback port; scripts/setup.sh --system installs it, as CI does). Only they skip without redis-server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from conftest import TINY_INPUT, TINY_OUTPUT, ServerHandle, build_tiny_repository, tiny_expected
from redis_server import RedisServer, needs_redis

from rnnserve.bench.procs import ServerProcess, rnnserve_server
from rnnserve.manifest import Durability, ModelManifest
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.server.durability.store import SessionRecord, StoreUnavailable, open_store
from rnnserve.server.durability.store.codec import decode_record, encode_record
from rnnserve.server.errors import Internal
from rnnserve.tensors import from_proto, to_proto

MODELS = {
    "gru_every": Durability(mode="every-step"),
    "gru_periodic": Durability(mode="periodic", every_steps=4),
    "gru_periodic_ms": Durability(mode="periodic", every_ms=100),
    "gru_none": Durability(mode="none"),
}


# ---- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def durable_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ONNX GRU once per durability mode (MODELS)."""
    built = build_tiny_repository(tmp_path_factory.mktemp("tiny"))
    root = tmp_path_factory.mktemp("durable")
    for name, durability in MODELS.items():
        target = root / name / "1"
        shutil.copytree(built / "gru" / "1", target)
        manifest = ModelManifest.read(target)
        manifest.model_copy(update={"name": name, "durability": durability}).write(target)
    return root


@contextlib.contextmanager
def serving(
    repository: Path, workdir: Path, redis: RedisServer, tag: str, extra: tuple[str, ...] = ()
) -> Iterator[ServerProcess]:
    proc = rnnserve_server(
        repository, workdir, tag=tag, max_sessions=1000, extra=["--session-store", redis.url, *extra]
    ).start()
    try:
        yield proc
    finally:
        proc.stop(grace=2)


def kill9(proc: ServerProcess) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.proc is not None
    proc.proc.wait(10)


def stub_for(address: str) -> tuple[grpc.Channel, pb_grpc.RnnServeStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.RnnServeStub(channel)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def steps_of(stub: pb_grpc.RnnServeStub, sid: str) -> int:
    return stub.GetState(pb.SessionRequest(session_id=sid), timeout=10).steps


def stream(
    stub: pb_grpc.RnnServeStub,
    ids: list[str],
    xs: np.ndarray,
    ys: np.ndarray,
    first: int,
    *,
    window: int,
    after: Callable[[int], None] = lambda t: None,
) -> int:
    """Step every session through steps ``first..T`` (1-based ``step_index``), one StepBatch message per step
    with at most ``window`` unanswered. Fills ``ys[:, t - 1]``; returns the last step answered in full (the
    stream may break: the server was killed). ``after(t)`` runs once step t is answered."""
    n, total = xs.shape[:2]
    credit = threading.Semaphore(window)
    finished = threading.Event()

    def requests() -> Iterator[pb.StreamStepRequest]:
        for t in range(first, total + 1):
            while not credit.acquire(timeout=0.05):
                if finished.is_set():
                    return
            batch = pb.StepBatch(session_ids=ids, inputs={"x": to_proto(xs[:, t - 1])}, step_indices=[t] * n)
            yield pb.StreamStepRequest(batch=batch)

    acked = first - 1
    try:
        for response in stub.StreamStep(requests(), timeout=60):
            result = response.batch
            assert list(result.codes) == [0] * n, list(result.messages)[:3]
            t = acked + 1
            assert list(result.steps) == [t] * n
            ys[:, t - 1] = from_proto(result.outputs["y"])
            acked = t
            credit.release()
            after(t)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
    finally:
        finished.set()
    return acked


def reference_run(server_factory, repository: Path, model: str, xs: np.ndarray) -> np.ndarray:
    """The same steps on a server that is never interrupted (in process, memory store)."""
    server = server_factory(repository)
    channel, stub = stub_for(server.address)
    with channel:
        ids = [stub.OpenSession(pb.OpenSessionRequest(model=model)).session_id for _ in range(len(xs))]
        ys = np.zeros((*xs.shape[:2], TINY_OUTPUT), np.float32)
        assert stream(stub, ids, xs, ys, 1, window=4) == xs.shape[1]
    return ys


def check_against_eager(xs: np.ndarray, ys: np.ndarray) -> None:
    for i in range(0, len(xs), max(1, len(xs) // 8)):  # the eager model is slow; a spread of sessions is enough
        np.testing.assert_allclose(ys[i], tiny_expected(xs[i])[0], atol=1e-5)


def record(sid: str = "s1", steps: int = 3) -> SessionRecord:
    rng = np.random.default_rng(0)
    state = {"h": rng.standard_normal((1, 5)).astype(np.float32), "speaker": np.array([0.5, -0.5], np.float32)}
    replay = [(3, 0, 123, [[np.ones(2, np.float32)]]), (4, 2, 7, [[np.zeros(2, np.float32)], [np.ones(2, np.float32)]])]
    return SessionRecord(sid, "gru", 1, steps, state, owner="alice", replay=replay, extra={"note": b"kept"})


# ---- the store backends ---------------------------------------------------------------------------------------
def same_record(got: SessionRecord, want: SessionRecord) -> None:
    assert (got.key, got.model, got.version, got.steps, got.owner, got.extra) == (
        want.key, want.model, want.version, want.steps, want.owner, want.extra,
    )  # fmt: skip
    assert got.state.keys() == want.state.keys()
    assert all(np.array_equal(got.state[k], v) and got.state[k].dtype == v.dtype for k, v in want.state.items())
    assert [e[:3] for e in got.replay] == [e[:3] for e in want.replay]
    for (*_, outs), (*_, want_outs) in zip(got.replay, want.replay, strict=True):
        for step, want_step in zip(outs, want_outs, strict=True):
            assert all(np.array_equal(a, b) for a, b in zip(step, want_step, strict=True))


def test_record_encoding_round_trip_and_corruption():
    want = record("a", 7)
    data = encode_record(want)
    same_record(decode_record("a", data), want)
    flipped = bytearray(data)
    flipped[-1] ^= 1  # inside the replay snapshot: its checksum catches it
    for bad in (bytes(flipped), data[:-3], b"junk" + data):
        with pytest.raises(Internal, match="corrupt"):
            decode_record("a", bad)


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=needs_redis)])
def test_store_round_trip_ttl_and_delete(backend, request):
    url = "memory" if backend == "memory" else request.getfixturevalue("redis_server").url
    store = open_store(url, ttl=0.5)
    try:
        a, b = record("a", 3), record("b", 9)
        store.put_many([a, b])
        got_a, missing, got_b = store.get_many(["a", "nope", "b"])
        assert missing is None and sorted(store.keys()) == ["a", "b"]
        same_record(got_a, a)
        same_record(got_b, b)
        store.put_many([record("a", 4)])  # a write replaces the record (and renews its TTL)
        assert store.get("a").steps == 4
        store.delete("a")
        assert store.get("a") is None and store.keys() == ["b"]
        time.sleep(0.7)  # the TTL: abandoned sessions do not accumulate
        assert store.get("b") is None and store.keys() == []
    finally:
        store.close()


@needs_redis
def test_redis_store_down_is_unavailable(redis_server):
    store = open_store(redis_server.url, ttl=60)
    redis_server.stop()
    with pytest.raises(StoreUnavailable) as info:
        store.put_many([record()])
    assert redis_server.url in info.value.message
    store.close()


# ---- every-step: the restart test -----------------------------------------------------------------------------
@needs_redis
def test_every_step_sessions_survive_kill_9(durable_repository, redis_server, tmp_path, server_factory):
    """200 sessions stream; the server is killed mid-stream and started again on the same Redis; every
    session goes on from its last acknowledged step, and the outputs equal an uninterrupted run's exactly."""
    n, total, window, kill_at = 200, 24, 4, 10
    xs = np.random.default_rng(5).standard_normal((n, total, TINY_INPUT)).astype(np.float32)
    ys = np.full((n, total, TINY_OUTPUT), np.nan, np.float32)
    # One batch at a time, so each StepBatch message (all 200 sessions) is one batch and one store write, and
    # every session resumes at the same step. (With concurrent batches a message may be split in two, and a
    # kill between their writes leaves the halves one step apart: still each at or past its acknowledged step.)
    one_batch = ("--concurrent-batches", "1")
    with serving(durable_repository, tmp_path, redis_server, "first", one_batch) as first:
        channel, stub = stub_for(first.address)
        with channel:
            ids = [stub.OpenSession(pb.OpenSessionRequest(model="gru_every")).session_id for _ in range(n)]
            # Killed right after step kill_at is answered, with up to `window` later steps in flight.
            acked = stream(stub, ids, xs, ys, 1, window=window, after=lambda t: t == kill_at and kill9(first))
        assert kill_at <= acked < kill_at + window
    with serving(durable_repository, tmp_path, redis_server, "second", one_batch) as second:
        channel, stub = stub_for(second.address)
        with channel:
            # Each session is back (restored from Redis on first use) at its last acknowledged step, or past it
            # by steps that were written but whose answers died with the server.
            resumed = {steps_of(stub, sid) for sid in ids}
            assert len(resumed) == 1 and acked <= resumed.pop() <= acked + window
            # The client resends from its last acknowledged step: steps already applied are answered from the
            # restored replay cache (exactly once), the rest are computed.
            assert stream(stub, ids, xs, ys, acked + 1, window=window) == total
            assert {steps_of(stub, sid) for sid in ids} == {total}
    assert np.array_equal(ys, reference_run(server_factory, durable_repository, "gru_every", xs))
    check_against_eager(xs, ys)


# ---- periodic and none ----------------------------------------------------------------------------------------
@needs_redis
def test_periodic_resumes_from_last_write_and_none_is_lost(durable_repository, redis_server, tmp_path):
    n, total, kill_after = 20, 12, 10
    xs = np.random.default_rng(6).standard_normal((n, total, TINY_INPUT)).astype(np.float32)
    ys = np.full((n, total, TINY_OUTPUT), np.nan, np.float32)
    y_ms = []
    with serving(durable_repository, tmp_path, redis_server, "first") as first:
        channel, stub = stub_for(first.address)
        with channel:
            ids = [stub.OpenSession(pb.OpenSessionRequest(model="gru_periodic")).session_id for _ in range(n)]
            none_id = stub.OpenSession(pb.OpenSessionRequest(model="gru_none")).session_id
            ms_id = stub.OpenSession(pb.OpenSessionRequest(model="gru_periodic_ms")).session_id
            assert stream(stub, ids, xs[:, :kill_after], ys, 1, window=1) == kill_after
            for t in range(3):
                for sid in (none_id, ms_id):
                    out = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs[0, t])}, step_index=t + 1))
                    if sid == ms_id:
                        y_ms.append(from_proto(out.outputs["y"]))
            time.sleep(0.5)  # idle past every_ms: the background task writes the ms session's 3 steps
        kill9(first)
    with serving(durable_repository, tmp_path, redis_server, "second") as second:
        channel, stub = stub_for(second.address)
        with channel:
            # every_steps=4: the last write was at step 8; steps 9 and 10 are lost and the client learns so.
            assert {steps_of(stub, sid) for sid in ids} == {8}
            assert steps_of(stub, ms_id) == 3
            with pytest.raises(grpc.RpcError) as info:
                steps_of(stub, none_id)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # Resending from the server's step count recomputes the lost steps: same outputs as before.
            lost = ys[:, 8:kill_after].copy()
            assert stream(stub, ids, xs, ys, 9, window=2) == total
            assert np.array_equal(ys[:, 8:kill_after], lost)
            y4 = stub.Step(pb.StepRequest(session_id=ms_id, inputs={"x": to_proto(xs[0, 3])}, step_index=4))
            y_ms.append(from_proto(y4.outputs["y"]))
    check_against_eager(xs, ys)
    np.testing.assert_allclose(np.stack(y_ms), tiny_expected(xs[0, :4])[0], atol=1e-5)


@needs_redis
def test_graceful_shutdown_keeps_none_sessions_once(durable_repository, redis_server, server_factory):
    """`none` sessions are written on a clean shutdown only, and consumed when restored: a later crash does
    not bring them back at a stale step."""
    xs = np.random.default_rng(7).standard_normal((4, TINY_INPUT)).astype(np.float32)
    store = open_store(redis_server.url, ttl=60)

    def step(stub: pb_grpc.RnnServeStub, sid: str, x: np.ndarray) -> np.ndarray:
        return from_proto(stub.Step(pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)})).outputs["y"])

    first = ServerHandle(durable_repository, session_store=redis_server.url)  # stopped here, not by a fixture
    try:
        channel, stub = stub_for(first.address)
        with channel:
            sid = stub.OpenSession(pb.OpenSessionRequest(model="gru_none")).session_id
            ys = [step(stub, sid, x) for x in xs[:3]]
        assert store.keys() == []  # nothing is written while serving
    finally:
        first.stop()
    assert store.keys() == [sid]
    second = server_factory(durable_repository, session_store=redis_server.url)
    channel, stub = stub_for(second.address)
    with channel:
        assert steps_of(stub, sid) == 3
        assert eventually(lambda: store.keys() == [])  # consumed by the restore
        ys.append(step(stub, sid, xs[3]))
    store.close()
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)


@needs_redis
def test_every_step_batches_never_run_on_the_event_loop(durable_repository, redis_server, server_factory):
    """An every-step batch waits on a store round trip, so it always runs on a worker thread, however quick the
    model (its dispatch is chosen without inline batches: server/scheduling/dispatch.py); the same lone session
    of a `none` model steps on the event loop."""
    xs = np.random.default_rng(12).standard_normal((12, TINY_INPUT)).astype(np.float32)
    # A budget far above the tiny model's time (a slow moment of a busy host must not make it look slow), and
    # the every-step model's dispatch told that a lone batch took 1 ns before any ran: a dispatch that may run
    # batches inline would run even the first one on the event loop.
    server = server_factory(durable_repository, session_store=redis_server.url, inline_budget_us=1_000_000)
    server.server.repository.models[("gru_every", 1)].batcher.dispatch.measured(1, 1, time.perf_counter_ns())

    def step(stub: pb_grpc.RnnServeStub, sid: str, x: np.ndarray) -> np.ndarray:
        return from_proto(stub.Step(pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)})).outputs["y"])

    channel, stub = stub_for(server.address)
    with channel:
        for model in ("gru_every", "gru_none"):
            sid = stub.OpenSession(pb.OpenSessionRequest(model=model)).session_id
            np.testing.assert_allclose(np.stack([step(stub, sid, x) for x in xs]), tiny_expected(xs)[0], atol=1e-5)
        stats = {m.name: m for m in stub.GetStats(pb.StatsRequest()).models}
    assert stats["gru_every"].batches == 12 and stats["gru_every"].inline_batches == 0
    assert stats["gru_none"].batches == 12 and stats["gru_none"].inline_batches >= 8


# ---- store failure, close, expiry -----------------------------------------------------------------------------
@needs_redis
def test_store_failure_fails_the_step_and_changes_nothing(durable_repository, redis_server, server_factory):
    """A step whose write fails is reported with its outcome unknown (a write can fail after Redis ran it);
    here Redis is down, so nothing changed, and the retry with the same step_index applies it once."""
    xs = np.random.default_rng(8).standard_normal((5, TINY_INPUT)).astype(np.float32)
    server = server_factory(durable_repository, session_store=redis_server.url)
    channel, stub = stub_for(server.address)

    def step(sid: str, t: int) -> np.ndarray:
        request = pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs[t])}, step_index=t + 1)
        return from_proto(stub.Step(request, timeout=10).outputs["y"])

    with channel:
        sid = stub.OpenSession(pb.OpenSessionRequest(model="gru_every")).session_id
        ys = [step(sid, t) for t in range(3)]
        before = stub.GetState(pb.SessionRequest(session_id=sid))
        errors = server.server.persistence.errors[("gru_every", 1, "save")]
        redis_server.stop()
        with pytest.raises(grpc.RpcError) as info:
            step(sid, 3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "session store" in info.value.details() and "may or may not" in info.value.details()
        assert server.server.persistence.errors[("gru_every", 1, "save")] == errors + 1  # rnnserve_store_errors_total
        with pytest.raises(grpc.RpcError) as info:  # a new durable session can't be promised either
            stub.OpenSession(pb.OpenSessionRequest(model="gru_every"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        after = stub.GetState(pb.SessionRequest(session_id=sid))
        assert after.steps == 3 and after.snapshot == before.snapshot
        redis_server.start()  # same port: the step is retried and applies once
        ys += [step(sid, 3), step(sid, 4)]
        assert steps_of(stub, sid) == 5
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)


@needs_redis
def test_close_and_expiry_delete_the_record(durable_repository, redis_server, server_factory):
    server = server_factory(durable_repository, session_store=redis_server.url, session_ttl=1.0)
    store = open_store(redis_server.url, ttl=60)
    channel, stub = stub_for(server.address)
    with channel:
        closed, idle = (stub.OpenSession(pb.OpenSessionRequest(model="gru_every")).session_id for _ in range(2))
        assert sorted(store.keys()) == sorted([closed, idle])
        ttl_ms = redis.Redis.from_url(redis_server.url).pttl(f"rnnserve:session:{idle}")
        assert 0 < ttl_ms <= 1000  # the session TTL: Redis forgets it even if this server dies
        stub.CloseSession(pb.SessionRequest(session_id=closed))
        assert eventually(lambda: store.keys() == [idle])
        # Give the idle one a long TTL in Redis: only the server's expiry can delete it now.
        redis.Redis.from_url(redis_server.url).pexpire(f"rnnserve:session:{idle}", 60_000)
        assert eventually(lambda: server.server.sessions.expired == 1 and store.keys() == [])
    store.close()


@needs_redis
@pytest.mark.parametrize("numbered", [True, False], ids=["step_index", "unnumbered"])
def test_a_stale_replica_never_steps_an_old_state(durable_repository, redis_server, server_factory, numbered):
    """Two replicas share the store and the session goes A -> B -> A -> B (as a gateway's ring changes), so each
    time it comes back the replica's copy is stale. A numbered step shows it (its step_index is past the copy):
    the replica asks the store and resumes from it. An unnumbered step is computed on the copy, but its write
    is refused: ABORTED, nothing applied, the copy dropped, and the retry resumes from the store. A read of a
    stale copy reloads it first."""
    xs = np.random.default_rng(11).standard_normal((8, TINY_INPUT)).astype(np.float32)
    a = server_factory(durable_repository, session_store=redis_server.url)
    b = server_factory(durable_repository, session_store=redis_server.url)
    (ch_a, stub_a), (ch_b, stub_b) = stub_for(a.address), stub_for(b.address)

    def step(stub: pb_grpc.RnnServeStub, sid: str, t: int) -> np.ndarray:
        request = pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs[t])}, step_index=t + 1 if numbered else 0)
        return from_proto(stub.Step(request, timeout=10).outputs["y"])

    def moved(stub: pb_grpc.RnnServeStub, sid: str, t: int) -> list[np.ndarray]:
        if not numbered:
            with pytest.raises(grpc.RpcError) as info:
                step(stub, sid, t)
            assert info.value.code() == grpc.StatusCode.ABORTED, info.value
            assert "another replica" in info.value.details() and "retry" in info.value.details()
        return [step(stub, sid, t)]

    with ch_a, ch_b:
        sid = stub_a.OpenSession(pb.OpenSessionRequest(model="gru_every")).session_id
        ys = [step(stub_a, sid, t) for t in range(3)]
        ys += [step(stub_b, sid, t) for t in range(3, 6)]  # B loads it from the store
        ys += moved(stub_a, sid, 6)  # A's copy is at step 3
        ys += moved(stub_b, sid, 7)  # B's at step 6
        assert stub_a.GetState(pb.SessionRequest(session_id=sid)).steps == 8  # not A's stale 7
        assert steps_of(stub_b, sid) == 8
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)


@needs_redis
def test_client_chosen_ids_are_unique_across_replicas(durable_repository, redis_server, server_factory):
    a = server_factory(durable_repository, session_store=redis_server.url)
    b = server_factory(durable_repository, session_store=redis_server.url)
    (ch_a, stub_a), (ch_b, stub_b) = stub_for(a.address), stub_for(b.address)
    sid = "client-chosen-id-0123456789"
    with ch_a, ch_b:
        assert stub_a.OpenSession(pb.OpenSessionRequest(model="gru_every", session_id=sid)).session_id == sid
        for stub in (stub_a, stub_b):  # here, and at a replica that only the store tells
            with pytest.raises(grpc.RpcError) as info:
                stub.OpenSession(pb.OpenSessionRequest(model="gru_every", session_id=sid))
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value
        assert steps_of(stub_a, sid) == 0  # the refused opens changed nothing
        with pytest.raises(grpc.RpcError) as info:
            stub_a.OpenSession(pb.OpenSessionRequest(model="gru_every", session_id="short"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in info.value.details()
