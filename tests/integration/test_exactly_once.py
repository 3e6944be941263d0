"""Exactly-once steps (StepRequest.step_index, StepBatch.step_indices): the server's admission rules over raw
stubs, then the client SDK's retries and stream resumption through a proxy that drops connections."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, ServerHandle, tiny_expected

from rnnserve.client import AsyncClient, Client
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.tensors import from_proto, to_proto

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def server(server_factory, tiny_repository) -> ServerHandle:
    return server_factory(tiny_repository, replay_window=4)


@pytest.fixture
def stub(server: ServerHandle):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RnnServeStub(channel)


def xs_for(seed: int, steps: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, TINY_INPUT)).astype(np.float32)


def open_session(stub, model: str = "gru") -> str:
    return stub.OpenSession(pb.OpenSessionRequest(model=model)).session_id


def step(stub, sid: str, x: np.ndarray, index: int, num_steps: int = 0) -> pb.StepResponse:
    return stub.Step(pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)}, num_steps=num_steps, step_index=index))


def refused(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)
    return info.value


def state(stub, sid: str) -> tuple[int, np.ndarray]:
    s = stub.GetState(pb.SessionRequest(session_id=sid))
    return s.steps, from_proto(s.state["h"]).reshape(-1)


def model_steps(stub) -> int:
    return sum(m.steps for m in stub.GetStats(pb.StatsRequest()).models)


# ---- the server's rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gru", "gru_ts"])
def test_a_repeat_of_an_applied_step_gets_its_cached_response(stub, model):
    xs = xs_for(1, 3)
    sid = open_session(stub, model)
    first = [step(stub, sid, xs[t], t + 1) for t in range(3)]
    computed = model_steps(stub)
    for t in (2, 1):  # the last applied step, and an older one still in the window
        again = step(stub, sid, xs[t], t + 1)
        assert again.steps == t + 1 and again.outputs["y"].data == first[t].outputs["y"].data
    assert model_steps(stub) == computed  # answered without a model call
    steps, h = state(stub, sid)
    expected_y, expected_h = tiny_expected(xs)
    assert steps == 3 and np.abs(h - expected_h).max() <= 1e-5
    assert np.abs(from_proto(first[2].outputs["y"]) - expected_y[2]).max() <= 1e-5


def test_a_gap_names_the_expected_index(stub):
    sid = open_session(stub)
    x = xs_for(2, 1)[0]
    err = refused(step, stub, sid, x, 2)
    assert err.code() == FAILED_PRECONDITION and f"session '{sid}' expects step_index 1 (got 2)" in err.details()
    step(stub, sid, x, 1)
    err = refused(step, stub, sid, x, 5)
    assert err.code() == FAILED_PRECONDITION and "expects step_index 2 (got 5)" in err.details()
    assert state(stub, sid)[0] == 1


def test_a_repeat_outside_the_window_or_with_other_inputs_is_refused(stub):
    sid = open_session(stub)
    xs = xs_for(3, 6)
    for t in range(6):
        step(stub, sid, xs[t], t + 1)
    err = refused(step, stub, sid, xs[0], 1)  # the window holds steps 3..6
    assert err.code() == FAILED_PRECONDITION and "expects step_index 7 (got 1)" in err.details()
    assert "not among the 4 recent steps" in err.details()
    err = refused(step, stub, sid, xs[0], 6)  # index 6 with step 1's inputs: another step, not a retry
    assert err.code() == FAILED_PRECONDITION and "other inputs" in err.details()
    assert state(stub, sid)[0] == 6


def test_a_rejected_step_does_not_consume_its_index(stub):
    sid = open_session(stub)
    bad = np.full(TINY_INPUT, np.nan, np.float32)
    assert refused(step, stub, sid, bad, 1).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(step, stub, sid, np.zeros(2, np.float32), 1).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert step(stub, sid, xs_for(4, 1)[0], 1).steps == 1


def test_a_chunk_covers_num_steps_indexes(stub):
    sid = open_session(stub)
    xs = xs_for(5, 6)
    chunk = step(stub, sid, xs[:4], 1, num_steps=4)
    assert chunk.steps == 4
    again = step(stub, sid, xs[:4], 1, num_steps=4)
    assert again.steps == 4 and again.outputs["y"].data == chunk.outputs["y"].data
    err = refused(step, stub, sid, xs[2], 3)  # inside the applied chunk, not a repeat of a request
    assert err.code() == FAILED_PRECONDITION and "expects step_index 5 (got 3)" in err.details()
    assert step(stub, sid, xs[4:], 5, num_steps=2).steps == 6
    expected_y, expected_h = tiny_expected(xs)
    steps, h = state(stub, sid)
    assert steps == 6 and np.abs(h - expected_h).max() <= 1e-5
    assert np.abs(from_proto(chunk.outputs["y"]) - expected_y[:4]).max() <= 1e-5


def test_a_repeat_of_a_queued_step_gets_that_steps_result(stub):
    # Pipelined in one message: step 1, its repeat (queued behind it, not yet applied), step 2.
    sid = open_session(stub)
    xs = xs_for(6, 2)
    requests = [
        pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs[t])}, step_index=i, request_id=str(k))
        for k, (t, i) in enumerate([(0, 1), (0, 1), (1, 2)])
    ]
    (response,) = list(stub.StreamStep(iter([pb.StreamStepRequest(steps=requests)])))
    results = list(response.results)
    assert [r.code for r in results] == [0, 0, 0] and [r.steps for r in results] == [1, 1, 2]
    assert results[0].outputs["y"].data == results[1].outputs["y"].data
    assert state(stub, sid)[0] == 2 and model_steps(stub) == 2


def test_step_indices_of_a_step_batch_apply_per_row(stub):
    a, b = open_session(stub), open_session(stub)
    xs = xs_for(7, 4).reshape(2, 2, TINY_INPUT)  # [session, t]

    def batch(ids: list[str], rows: np.ndarray, indices: list[int]) -> pb.StepBatchResult:
        msg = pb.StreamStepRequest(
            batch=pb.StepBatch(session_ids=ids, inputs={"x": to_proto(rows)}, step_indices=indices)
        )
        (response,) = list(stub.StreamStep(iter([msg])))
        return response.batch

    first = batch([a, b], xs[:, 0], [1, 1])
    assert list(first.codes) == [0, 0] and list(first.steps) == [1, 1]
    # a repeats step 1 (cached) then sends step 2 in the same message; b skips to 3.
    second = batch([a, a, b], np.stack([xs[0, 0], xs[0, 1], xs[1, 1]]), [1, 2, 3])
    assert list(second.codes)[:2] == [0, 0] and second.codes[2] == FAILED_PRECONDITION.value[0]
    assert "expects step_index 2 (got 3)" in second.messages[2]
    assert list(second.steps)[:2] == [1, 2]
    assert np.array_equal(from_proto(second.outputs["y"])[0], from_proto(first.outputs["y"])[0])
    assert state(stub, a)[0] == 2 and state(stub, b)[0] == 1
    assert np.abs(state(stub, a)[1] - tiny_expected(xs[0])[1]).max() <= 1e-5
    msg = pb.StreamStepRequest(
        batch=pb.StepBatch(session_ids=[a], inputs={"x": to_proto(xs[0, :1])}, step_indices=[1, 2])
    )
    (response,) = list(stub.StreamStep(iter([msg])))
    assert response.batch.codes[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_reset_and_restore_renumber_the_session(stub):
    sid = open_session(stub)
    xs = xs_for(8, 3)
    step(stub, sid, xs[0], 1)
    snap = stub.GetState(pb.SessionRequest(session_id=sid)).snapshot
    step(stub, sid, xs[1], 2)
    stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
    err = refused(step, stub, sid, xs[1], 2)  # not a repeat any more: the cache went with the reset
    assert "expects step_index 1 (got 2)" in err.details()
    step(stub, sid, xs[2], 1)
    stub.SetState(pb.SetStateRequest(session_id=sid, snapshot=snap))
    assert step(stub, sid, xs[1], 2).steps == 2
    assert np.abs(state(stub, sid)[1] - tiny_expected(xs[:2])[1]).max() <= 1e-5


# ---- the client SDK through a proxy that drops connections ---------------------------------------------------

DROPS = 6


@pytest.fixture
def served(server_factory, tiny_repository) -> ServerHandle:
    return server_factory(tiny_repository)  # the default --replay-window covers the client's default window


@pytest.fixture
def proxy(served: ServerHandle):
    from proxy import DroppingProxy

    p = DroppingProxy(served.port, seed=11, drops=DROPS)
    yield p
    p.close()


def flaky_client(proxy) -> Client:
    # More retries than drops: a test never fails on the retry bound, only on a wrong answer.
    return Client(proxy.address, timeout=10, retries=DROPS + 2, backoff=0.01)


def check_applied_once(server: ServerHandle, runs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """Each session's outputs equal the eager ones, and the server applied (and computed) each step once."""
    with grpc.insecure_channel(server.address) as channel:
        direct = pb_grpc.RnnServeStub(channel)
        for sid, xs in runs.items():
            expected_y, expected_h = tiny_expected(xs)
            assert outputs[sid].shape == expected_y.shape
            assert np.abs(outputs[sid] - expected_y).max() <= 1e-5
            steps, h = state(direct, sid)
            assert steps == len(xs) and np.abs(h - expected_h).max() <= 1e-5
        assert model_steps(direct) == sum(len(xs) for xs in runs.values())


def test_sync_unary_steps_and_chunks_survive_drops(served, proxy):
    with flaky_client(proxy) as client:
        a, b = client.open_session("gru"), client.open_session("gru")
        xa, xb = xs_for(20, 40), xs_for(21, 40)
        ya = np.stack([a.step(x) for x in xa])
        yb = np.concatenate([b.step_chunk(xb[t : t + 5]) for t in range(0, 40, 5)])
        assert a.steps == b.steps == 40
    assert proxy.dropped > 0
    check_applied_once(served, {a.id: xa, b.id: xb}, {a.id: ya, b.id: yb})


def test_sync_streams_resume_after_drops(served, proxy):
    with flaky_client(proxy) as client:
        sessions = [client.open_session("gru") for _ in range(2)]
        runs = {s.id: xs_for(30 + i, 150) for i, s in enumerate(sessions)}
        outs = {s.id: np.stack(list(s.stream(runs[s.id], window=8))) for s in sessions}
        assert [s.steps for s in sessions] == [150, 150]
    assert proxy.dropped == DROPS
    check_applied_once(served, runs, outs)


def test_sync_multi_stream_resends_after_drops(served, proxy):
    with flaky_client(proxy) as client:
        a, b, c = (client.open_session("gru") for _ in range(3))
        runs = {s.id: xs_for(40 + i, 60) for i, s in enumerate((a, b, c))}
        outs: dict[str, list[np.ndarray]] = {s.id: [] for s in (a, b, c)}
        with client.multi_stream() as ms:
            for t in range(60):
                if t % 2:
                    got = ms.step({a: runs[a.id][t], b: runs[b.id][t], c: runs[c.id][t]})
                    for s in (a, b, c):
                        outs[s.id].append(got[s])
                else:
                    r = ms.step_batch([a, b, c], np.stack([runs[s.id][t] for s in (a, b, c)]))
                    for i, s in enumerate((a, b, c)):
                        outs[s.id].append(r.outputs[i])
    assert proxy.dropped > 0
    check_applied_once(served, runs, {k: np.stack(v) for k, v in outs.items()})


def test_async_client_survives_drops(served, proxy):
    async def run() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        async with AsyncClient(proxy.address, timeout=10, retries=DROPS + 2, backoff=0.01) as client:
            unary, chunked, streamed, multi = [await client.open_session("gru") for _ in range(4)]
            runs = {s.id: xs_for(50 + i, 60) for i, s in enumerate((unary, chunked, streamed, multi))}
            outs = {unary.id: np.stack([await unary.step(x) for x in runs[unary.id]])}
            outs[chunked.id] = np.concatenate(
                [await chunked.step_chunk(runs[chunked.id][t : t + 6]) for t in range(0, 60, 6)]
            )
            outs[streamed.id] = np.stack([y async for y in streamed.stream(runs[streamed.id], window=8)])
            ys = []
            async with client.multi_stream() as ms:
                for x in runs[multi.id]:
                    ys.append((await ms.step({multi: x}))[multi])
            outs[multi.id] = np.stack(ys)
            return runs, outs

    runs, outs = asyncio.run(run())
    assert proxy.dropped > 0
    check_applied_once(served, runs, outs)


# ---- cancellation -----------------------------------------------------------------------------------------

CHUNK = 4


def test_cancelled_calls_and_broken_streams_never_half_advance_a_session(server_factory, tiny_repository):
    # A queue delay keeps calls queued long enough for some cancellations to land before they run.
    server = server_factory(tiny_repository, max_queue_delay_us=2000)
    rng = np.random.default_rng(9)
    total = 48
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sessions = {open_session(stub): xs_for(60 + i, total) for i in range(4)}

        def check(sid: str, before: int) -> int:
            """The session applied whole chunks only, and its state is the eager one after exactly its steps."""
            steps, h = state(stub, sid)  # queued behind whatever the cancelled calls left queued
            assert steps >= before and steps % CHUNK == 0
            expected_h = tiny_expected(sessions[sid][:steps])[1] if steps else np.zeros_like(h)
            assert np.abs(h - expected_h).max() <= 1e-5
            return steps

        def chunk(sid: str, start: int, indexed: bool) -> pb.StepRequest:
            xs = sessions[sid][start : start + CHUNK]
            index = start + 1 if indexed else 0
            return pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs)}, num_steps=CHUNK, step_index=index)

        done = dict.fromkeys(sessions, 0)
        for round_ in range(200):
            if all(steps >= total for steps in done.values()):
                break
            sid = list(sessions)[round_ % len(sessions)]
            start = done[sid]
            if start >= total:
                continue
            indexed = bool(rng.integers(2))
            if rng.integers(2):  # a unary chunk, cancelled right away or a moment later
                call = stub.Step.future(chunk(sid, start, indexed))
                if rng.integers(2):
                    call.done()  # no wait: cancel at once
                else:
                    threading.Event().wait(float(rng.uniform(0, 0.003)))
                call.cancel()
            else:  # a stream pipelining several chunks, broken after a random number of responses
                ahead = [chunk(sid, s, indexed) for s in range(start, min(total, start + 3 * CHUNK), CHUNK)]
                stream = stub.StreamStep(iter([pb.StreamStepRequest(steps=[r]) for r in ahead]))
                keep = int(rng.integers(0, len(ahead) + 1))
                for _ in range(keep):
                    next(stream)
                stream.cancel()
            done[sid] = check(sid, start)
        for sid in sessions:  # finish each session, then compare its whole run
            while done[sid] < total:
                stub.Step(chunk(sid, done[sid], True))
                done[sid] = check(sid, done[sid])
