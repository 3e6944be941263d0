"""The native API's stream codec (server/transport/native/codec.py) without sockets: each StreamStep wire form
(a lone list-form step, a list-form chunk, eight or more list-form steps, a StepBatch, a refused message)
becomes the data plane's work and its response, checked against the eager model."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import numpy as np
import pytest
from codec_support import serving
from conftest import TINY_INPUT, tiny_expected

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.errors import InvalidArgument, ResourceExhausted
from rnnserve.server.transport.native import codec
from rnnserve.tensors import from_proto, to_proto

OK = 0
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


async def through(stream: codec.StepStream, message: pb.StreamStepRequest):
    """One message through the codec as the pump takes it: receive, (restore), submit, answer."""
    decoded, before = stream.receive(message.SerializeToString())
    if before is not None:
        await before
    item = stream.submit(decoded)
    return item, await stream.answer(item)


def xs_for(n: int, steps: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, steps, TINY_INPUT)).astype(np.float32)


def test_lone_steps_and_chunks_equal_eager(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            stream = codec.StepStream(server.dataplane, server.limits, Counter())
            a = server.dataplane.open_session("gru", 0, {}, b"").id
            xs = xs_for(1, 6)[0]
            ys = []
            for t in range(3):  # one step a message
                message = pb.StreamStepRequest(
                    steps=[pb.StepRequest(session_id=a, inputs={"x": to_proto(xs[t])}, request_id=str(t))]
                )
                item, response = await through(stream, message)
                assert isinstance(item.steps[0], codec.PendingStep)
                (result,) = response.results
                assert (result.code, result.request_id, result.steps) == (OK, str(t), t + 1)
                ys.append(from_proto(result.outputs["y"]))
            chunk = pb.StreamStepRequest(
                steps=[pb.StepRequest(session_id=a, inputs={"x": to_proto(xs[3:])}, num_steps=3)]
            )
            _, response = await through(stream, chunk)
            assert response.results[0].steps == 6
            ys.extend(from_proto(response.results[0].outputs["y"]))
            np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], atol=1e-5)

    asyncio.run(main())


def test_eight_list_form_steps_become_one_group_answered_step_by_step(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            stream = codec.StepStream(server.dataplane, server.limits, Counter())
            n, steps = 8, 2  # eight single steps of distinct sessions: one group
            ids = [server.dataplane.open_session("gru", 0, {}, b"").id for _ in range(n)]
            xs = xs_for(n, steps)
            bad = xs[3, 1].copy()
            bad[0] = np.nan
            ys = np.zeros((n, steps, 2), np.float32)
            for t in range(steps):
                message = pb.StreamStepRequest()
                for i, sid in enumerate(ids):
                    x = bad if (i, t) == (3, 1) else xs[i, t]
                    message.steps.add(session_id=sid, inputs={"x": to_proto(x)}, request_id=f"{i}-{t}")
                item, response = await through(stream, message)
                assert isinstance(item.steps, codec.PendingGroup)  # one group for the message's steps
                assert [r.request_id for r in response.results] == [f"{i}-{t}" for i in range(n)]
                for i, r in enumerate(response.results):
                    if (i, t) == (3, 1):
                        assert r.code == INVALID and "NaN or Inf" in r.message
                        continue
                    assert (r.code, r.steps) == (OK, t + 1)
                    ys[i, t] = from_proto(r.outputs["y"])
            for i in (0, 7):
                np.testing.assert_allclose(ys[i], tiny_expected(xs[i])[0], atol=1e-5)
            # Seven steps are fewer than a group: each is its own.
            item, _ = await through(stream, pb.StreamStepRequest(steps=list(message.steps)[:7]))
            assert isinstance(item.steps, list) and len(item.steps) == 7

    asyncio.run(main())


def test_a_step_batch_is_one_group_with_a_status_per_row(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            stream = codec.StepStream(server.dataplane, server.limits, Counter())
            ids = [server.dataplane.open_session("gru", 0, {}, b"").id for _ in range(3)]
            ids.insert(1, "0" * 32)  # a session that is not there fails its row alone
            x = xs_for(4, 1)[:, 0]
            batch = pb.StepBatch(session_ids=ids, inputs={"x": to_proto(x)}, request_id="b")
            item, response = await through(stream, pb.StreamStepRequest(batch=batch))
            assert isinstance(item.batch, codec.PendingBatch) and item.steps == []
            result = response.batch
            assert list(result.session_ids) == ids and result.request_id == "b"
            assert list(result.codes) == [OK, NOT_FOUND, OK, OK] and list(result.steps) == [1, 0, 1, 1]
            y = from_proto(result.outputs["y"])
            for row in (0, 2, 3):
                np.testing.assert_allclose(y[row], tiny_expected(x[row : row + 1])[0][0], atol=1e-5)

    asyncio.run(main())


def test_refusals_are_answered_in_the_results_and_change_nothing(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository, max_steps_per_message=4) as server:
            rejected: Counter[tuple[str, str]] = Counter()
            stream = codec.StepStream(server.dataplane, server.limits, rejected)
            sid = server.dataplane.open_session("gru", 0, {}, b"").id
            x = to_proto(np.zeros(TINY_INPUT, np.float32))
            # Past --max-steps-per-message: every step and batch row answers the refusal.
            message = pb.StreamStepRequest(
                steps=[pb.StepRequest(session_id=sid, inputs={"x": x})] * 3,
                batch=pb.StepBatch(session_ids=[sid, sid], inputs={"x": to_proto(np.zeros((2, 3), np.float32))}),
            )
            decoded, before = stream.receive(message.SerializeToString())
            assert isinstance(decoded, codec.RefusedMessage) and before is None
            _, response = await through(stream, message)
            assert [r.code for r in response.results] == [EXHAUSTED] * 3
            assert (
                list(response.batch.codes) == [EXHAUSTED] * 2
                and "--max-steps-per-message" in response.batch.messages[0]
            )
            # A wrong shape and an unknown output fail their own step only.
            wrong = pb.StepRequest(session_id=sid, inputs={"x": to_proto(np.zeros(4, np.float32))})
            unknown = pb.StepRequest(session_id=sid, inputs={"x": x}, outputs=["q"])
            _, response = await through(stream, pb.StreamStepRequest(steps=[wrong, unknown]))
            assert [r.code for r in response.results] == [INVALID, INVALID]
            assert (
                "expected shape [3]" in response.results[0].message and "no output ['q']" in response.results[1].message
            )
            assert server.dataplane.sessions.get(sid).steps == 0
            assert rejected == {("StreamStep", "RESOURCE_EXHAUSTED"): 5, ("StreamStep", "INVALID_ARGUMENT"): 2}

    asyncio.run(main())


def test_messages_that_end_the_stream_raise_on_receive(tiny_repository) -> None:
    async def main() -> None:
        async with serving(tiny_repository) as server:
            stream = codec.StepStream(server.dataplane, server.limits, Counter())
            with pytest.raises(InvalidArgument, match=r"not a valid rnnserve\.v1\.StreamStepRequest"):
                stream.receive(b"\xff\xff\xff")
            empty = pb.StreamStepRequest(batch=pb.StepBatch(request_id="r"))
            with pytest.raises(InvalidArgument, match="StepBatch has no session_ids"):
                stream.receive(empty.SerializeToString())
            huge = b"\x00" * (server.limits.max_message_bytes + 1)
            with pytest.raises(ResourceExhausted, match="--max-message-bytes"):
                stream.receive(huge)

    asyncio.run(main())
