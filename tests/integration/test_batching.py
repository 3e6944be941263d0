"""Cross-session batching under concurrency: many sessions, random think times and chunk sizes, each on its
own stream; every session's outputs must equal running it alone, and batches must really form."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, tiny_expected

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.tensors import from_proto, to_proto

SESSIONS, STEPS = 200, 24


async def _drive(address: str, model: str, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RnnServeStub(channel)

        async def one(i: int) -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng([seed, i])
            xs = rng.standard_normal((STEPS, TINY_INPUT)).astype(np.float32)
            sid = (await stub.OpenSession(pb.OpenSessionRequest(model=model))).session_id
            call = stub.StreamStep()
            outputs: list[np.ndarray] = []
            t = 0
            while t < STEPS:
                size = int(rng.integers(1, 6))
                chunk = xs[t : t + size]
                if rng.random() < 0.5:
                    request = pb.StepRequest(session_id=sid, inputs={"x": to_proto(chunk)}, num_steps=len(chunk))
                else:  # single steps, one message each
                    request = pb.StepRequest(session_id=sid, inputs={"x": to_proto(chunk[0])})
                    chunk = chunk[:1]
                await call.write(pb.StreamStepRequest(steps=[request]))
                response = await call.read()
                result = response.results[0]
                assert result.code == 0, result.message
                y = from_proto(result.outputs["y"])
                outputs.extend(y if request.num_steps else [y])
                assert result.steps == t + len(chunk)
                t += len(chunk)
                await asyncio.sleep(float(rng.exponential(0.004)))  # think time
            await call.done_writing()
            return xs, np.stack(outputs)

        results = await asyncio.gather(*(one(i) for i in range(SESSIONS)))
        return dict(enumerate(results))


@pytest.mark.parametrize("model", ["gru", "gru_ts"])
def test_random_concurrent_streams_equal_each_session_alone(server_factory, tiny_repository, model):
    server = server_factory(tiny_repository, max_queue_delay_us=2000)
    results = asyncio.run(_drive(server.address, model, seed=11))
    worst = 0.0
    for xs, ys in results.values():
        expected, _ = tiny_expected(xs)
        worst = max(worst, float(np.abs(ys - expected).max()))
    assert worst <= 1e-5

    with grpc.insecure_channel(server.address) as channel:
        stats = pb_grpc.RnnServeStub(channel).GetStats(pb.StatsRequest(model=model)).models[0]
    assert stats.steps == SESSIONS * STEPS
    # Batches really formed: far fewer model calls than steps, and some large ones.
    assert stats.batches < stats.steps / 4, (stats.batches, stats.steps)
    assert stats.max_batch >= 16
    assert sum(stats.batch_histogram) == stats.batches
    assert stats.inline_batches < stats.batches  # the large batches went to worker threads


def test_a_lone_session_steps_on_the_event_loop(server_factory, tiny_repository):
    # A lone session's batches of one run on the event loop once the first (on a worker thread) showed them
    # quick; a single-step stream and unary steps still equal eager, and a refused step changes nothing.
    # (A budget far above the tiny model's time, so a slow moment of a busy host does not count as slow.)
    server = server_factory(tiny_repository, inline_budget_us=1_000_000)
    xs = np.random.default_rng(5).standard_normal((30, TINY_INPUT)).astype(np.float32)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sid = stub.OpenSession(pb.OpenSessionRequest(model="gru")).session_id

        def request(x: np.ndarray) -> pb.StepRequest:
            return pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)})

        ys = [from_proto(stub.Step(request(x)).outputs["y"]) for x in xs[:10]]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Step(request(np.full(TINY_INPUT, np.nan, np.float32)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for response in stub.StreamStep(pb.StreamStepRequest(steps=[request(x)]) for x in xs[10:]):
            assert response.results[0].code == 0, response.results[0].message
            ys.append(from_proto(response.results[0].outputs["y"]))
        stats = stub.GetStats(pb.StatsRequest(model="gru")).models[0]
    assert np.abs(np.stack(ys) - tiny_expected(xs)[0]).max() <= 1e-5
    assert stats.steps == stats.batches == 30
    assert 25 <= stats.inline_batches < 30, stats.inline_batches


def test_inline_budget_zero_keeps_every_batch_on_worker_threads(server_factory, tiny_repository):
    server = server_factory(tiny_repository, inline_budget_us=0)
    xs = np.random.default_rng(6).standard_normal((12, TINY_INPUT)).astype(np.float32)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sid = stub.OpenSession(pb.OpenSessionRequest(model="gru")).session_id
        ys = [from_proto(stub.Step(pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)})).outputs["y"]) for x in xs]
        stats = stub.GetStats(pb.StatsRequest(model="gru")).models[0]
    assert np.abs(np.stack(ys) - tiny_expected(xs)[0]).max() <= 1e-5
    assert stats.batches == 12 and stats.inline_batches == 0
