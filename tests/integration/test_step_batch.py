"""The columnar multiplexed form (StreamStepRequest.batch): many sessions' steps as one stacked tensor."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, tiny_expected

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.tensors import from_proto, to_proto

OK = 0
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


@pytest.fixture
def stub(server_factory, tiny_repository):
    server = server_factory(tiny_repository)
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RnnServeStub(channel)


def _open(stub, model: str = "gru") -> str:
    return stub.OpenSession(pb.OpenSessionRequest(model=model)).session_id


def _batch(stub, ids: list[str], x: np.ndarray, request_id: str = "") -> pb.StepBatchResult:
    request = pb.StreamStepRequest(
        batch=pb.StepBatch(session_ids=ids, inputs={"x": to_proto(x)}, request_id=request_id)
    )
    (response,) = list(stub.StreamStep(iter([request])))
    return response.batch


def _steps(stub, sid: str) -> int:
    return stub.GetState(pb.SessionRequest(session_id=sid)).steps


@pytest.mark.parametrize("model", ["gru", "gru_ts"])
def test_batches_equal_each_session_alone(stub, model):
    n, steps = 40, 12
    rng = np.random.default_rng(3)
    ids = [_open(stub, model) for _ in range(n)]
    xs = rng.standard_normal((n, steps, TINY_INPUT)).astype(np.float32)
    ys = np.zeros((n, steps, 2), np.float32)

    def requests():
        for t in range(steps):
            order = rng.permutation(n)  # rows in a different order every step
            yield pb.StreamStepRequest(
                batch=pb.StepBatch(
                    session_ids=[ids[i] for i in order], inputs={"x": to_proto(xs[order, t])}, request_id=str(t)
                )
            )

    for t, response in enumerate(stub.StreamStep(requests())):
        result = response.batch
        assert result.request_id == str(t) and list(result.codes) == [OK] * n
        assert list(result.steps) == [t + 1] * n
        y = from_proto(result.outputs["y"])
        for row, sid in enumerate(result.session_ids):
            ys[ids.index(sid), t] = y[row]
    for i in range(n):
        assert np.abs(ys[i] - tiny_expected(xs[i])[0]).max() <= 1e-5


def test_bad_rows_fail_alone_and_change_nothing(stub):
    a, b, c = _open(stub), _open(stub), _open(stub)
    other_model = _open(stub, "gru_ts")
    x = np.random.default_rng(4).standard_normal((5, TINY_INPUT)).astype(np.float32)
    x[1, 2] = np.nan
    result = _batch(stub, [a, b, "no-such-session", other_model, c], x)
    assert list(result.codes) == [OK, INVALID, NOT_FOUND, INVALID, OK]
    assert "row 1" in result.messages[1] and "NaN or Inf" in result.messages[1]
    assert "not found" in result.messages[2]
    assert "a StepBatch holds sessions of one model" in result.messages[3]
    y = from_proto(result.outputs["y"])
    assert np.all(y[[1, 2, 3]] == 0)
    assert np.abs(y[0] - tiny_expected(x[:1])[0][0]).max() <= 1e-5
    assert np.abs(y[4] - tiny_expected(x[4:5])[0][0]).max() <= 1e-5
    assert [_steps(stub, s) for s in (a, b, c, other_model)] == [1, 0, 1, 0]


def test_malformed_stacked_input_fails_every_row(stub):
    a, b = _open(stub), _open(stub)
    result = _batch(stub, [a, b], np.zeros((3, TINY_INPUT), np.float32))
    assert list(result.codes) == [INVALID, INVALID]
    assert "expected shape [2, 3] ([sessions, ...per-session shape])" in result.messages[0]
    assert _steps(stub, a) == 0 and _steps(stub, b) == 0
    # A batch with no rows has no row to carry its status: the stream ends with it.
    with pytest.raises(grpc.RpcError) as info:
        _batch(stub, [], np.zeros((0, TINY_INPUT), np.float32))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no session_ids" in info.value.details()


def test_steps_and_batch_in_one_message(stub):
    a, b = _open(stub), _open(stub)
    xs = np.random.default_rng(5).standard_normal((2, TINY_INPUT)).astype(np.float32)
    request = pb.StreamStepRequest(
        steps=[pb.StepRequest(session_id=a, inputs={"x": to_proto(xs[0])})],
        # Session a appears in both parts: the list is applied first, then the batch row.
        batch=pb.StepBatch(session_ids=[a, b], inputs={"x": to_proto(xs)}),
    )
    (response,) = list(stub.StreamStep(iter([request])))
    assert response.results[0].steps == 1 and list(response.batch.steps) == [2, 1]
    expected_a = tiny_expected(np.stack([xs[0], xs[0]]))[0][1]
    assert np.abs(from_proto(response.batch.outputs["y"])[0] - expected_a).max() <= 1e-5


@pytest.mark.parametrize(("concurrent", "expected_max"), [(1, 64), (2, 32)])
def test_concurrent_batches_split_ready_sessions(server_factory, tiny_repository, concurrent, expected_max):
    """--concurrent-batches 2 splits 64 ready sessions into two batches of 32 that compute side by side (the
    whole-message fast path does not apply to a half): the outputs equal each session's eager run."""
    server = server_factory(tiny_repository, concurrent_batches=concurrent)
    n, steps = 64, 5
    xs = np.random.default_rng(5).standard_normal((n, steps, TINY_INPUT)).astype(np.float32)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        ids = [_open(stub) for _ in range(n)]
        ys = np.stack([from_proto(_batch(stub, ids, xs[:, t]).outputs["y"]) for t in range(steps)], axis=1)
        (stats,) = [m for m in stub.GetStats(pb.StatsRequest(model="gru")).models if m.steps]
    assert stats.max_batch == expected_max and stats.steps == n * steps
    for i in range(0, n, 9):
        np.testing.assert_allclose(ys[i], tiny_expected(xs[i])[0], atol=1e-5)


def test_list_form_messages_keep_per_step_results(stub):
    """A list-form message of many single steps runs as one columnar group (server/transport/native/) and
    must answer exactly as step by step: per-step codes, request ids, step counts and outputs; a bad step
    fails alone and changes nothing; an unknown session gets NOT_FOUND."""
    n, steps = 16, 3
    ids = [_open(stub) for _ in range(n)]
    xs = np.random.default_rng(9).standard_normal((n, steps, TINY_INPUT)).astype(np.float32)
    bad = xs[5, 1].copy()
    bad[0] = np.nan

    def message(t: int) -> pb.StreamStepRequest:
        out = pb.StreamStepRequest()
        for i, sid in enumerate(ids):
            x = bad if (i == 5 and t == 1) else xs[i, t]
            out.steps.add(session_id=sid, inputs={"x": to_proto(x)}, request_id=f"{i}-{t}")
        out.steps.add(session_id="0" * 32, inputs={"x": to_proto(xs[0, t])}, request_id="ghost")
        return out

    responses = list(stub.StreamStep(iter([message(t) for t in range(steps)])))
    ys = np.zeros((n, steps, 2), np.float32)
    for t, response in enumerate(responses):
        results = list(response.results)
        assert [r.request_id for r in results] == [f"{i}-{t}" for i in range(n)] + ["ghost"]
        assert results[-1].code == grpc.StatusCode.NOT_FOUND.value[0]
        for i, r in enumerate(results[:-1]):
            if i == 5 and t == 1:
                assert r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "NaN or Inf" in r.message
                continue
            assert r.code == 0, r.message
            assert r.steps == t + (0 if i == 5 and t == 2 else 1)
            ys[i, t] = from_proto(r.outputs["y"])
    assert _steps(stub, ids[5]) == steps - 1 and _steps(stub, ids[0]) == steps
    for i in (0, 7, 15):
        np.testing.assert_allclose(ys[i], tiny_expected(xs[i])[0], atol=1e-5)
    applied = np.stack([xs[5, 0], xs[5, 2]])  # the NaN step changed nothing
    np.testing.assert_allclose(ys[5, [0, 2]], tiny_expected(applied)[0], atol=1e-5)
