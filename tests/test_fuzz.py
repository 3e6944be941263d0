"""Fuzzing and malformed input: raw bytes and structurally valid but wrong messages on every RPC, unary and
streamed, against a real server. Every call ends within its deadline with a status a client mistake may get
(never INTERNAL, never a hang), and afterwards the server is healthy and still steps correctly."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, ServerHandle, tiny_expected

from rnnserve.client import Client
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.tensors import from_proto, to_proto

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SERVICE = "/rnnserve.v1.RnnServe/"
UNARY = [
    "ListModels",
    "GetModel",
    "LoadModel",
    "UnloadModel",
    "OpenSession",
    "CloseSession",
    "ResetSession",
    "GetState",
    "SetState",
    "Step",
    "Predict",
    "GetStats",
]
C = grpc.StatusCode
# What a client's mistake may get. INTERNAL (a server bug) and DEADLINE_EXCEEDED (a hang) are not here.
CLIENT_CODES = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION}
CALL_TIMEOUT = 10.0
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)


@pytest.fixture(scope="module")
def server(tiny_repository) -> Iterator[ServerHandle]:
    # Small limits, so the fuzzer reaches them too.
    handle = ServerHandle(tiny_repository, max_tensor_elements=4096, max_steps_per_message=64, max_sessions=200)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def sessions(channel) -> list[str]:
    """Real sessions for the fuzzer to aim at, on both models."""
    raw = channel.unary_unary(SERVICE + "OpenSession")
    ids = []
    for model in ("gru", "gru_ts", "gru"):
        response = pb.OpenSessionResponse.FromString(raw(pb.OpenSessionRequest(model=model).SerializeToString()))
        ids.append(response.session_id)
    return ids


def call_unary(channel: grpc.Channel, method: str, payload: bytes) -> tuple[C, bytes | None]:
    try:
        return C.OK, channel.unary_unary(SERVICE + method)(payload, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        return err.code(), None


def call_stream(channel: grpc.Channel, payloads: list[bytes]) -> tuple[C, list[bytes]]:
    call = channel.stream_stream(SERVICE + "StreamStep")(iter(payloads), timeout=CALL_TIMEOUT)
    responses: list[bytes] = []
    try:
        for r in call:
            responses.append(r)
        return C.OK, responses
    except grpc.RpcError as err:
        return err.code(), responses


def check_stream_results(responses: list[bytes]) -> None:
    for raw in responses:
        response = pb.StreamStepResponse.FromString(raw)
        for result in response.results:
            assert C.OK.value[0] == 0
            assert result.code in {c.value[0] for c in CLIENT_CODES}, (result.code, result.message)
        for code, message in zip(response.batch.codes, response.batch.messages, strict=False):
            assert code in {c.value[0] for c in CLIENT_CODES}, (code, message)


# ---- strategies ----------------------------------------------------------------------------------------------
names = st.sampled_from(["x", "h", "y", "", "lengths", "h_out", "x\x00", "é"]) | st.text(max_size=8)
dims = st.lists(st.integers(min_value=-2, max_value=6) | st.sampled_from([1 << 31, 1 << 62]), max_size=4)


@st.composite
def tensors(draw) -> pb.Tensor:
    dtype = draw(st.integers(min_value=0, max_value=12))
    shape = draw(dims)
    if draw(st.booleans()):
        # Data that fits the shape (when it can), so the request gets past decoding to the model's checks.
        count = 1
        for d in shape:
            count *= max(d, 0)
        itemsize = {1: 4, 2: 8, 3: 2, 4: 8, 5: 4, 6: 2, 7: 1, 8: 1, 9: 1}.get(dtype, 1)
        size = count * itemsize
        data = draw(st.binary(min_size=size, max_size=size)) if size <= 512 else b""
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


tensor_maps = st.dictionaries(names, tensors(), max_size=3)
model_names = st.sampled_from(["gru", "gru_ts", "", "nope", "../gru", "gru/1", ".", "a" * 300]) | st.text(max_size=10)
# Load/Unload only on names that are not loaded: a fuzzed unload of a real model would end the sessions in use.
admin_names = st.sampled_from(["", "nope", "../gru", "..", "/etc", "gru/../gru", "a" * 300]) | st.text(max_size=10)
versions = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
steps = st.integers(min_value=0, max_value=(1 << 32) - 1) | st.integers(min_value=0, max_value=4)


def session_ids(pool: list[str]):
    return st.sampled_from(pool) | st.sampled_from(["", "0" * 32, "x" * 1000]) | st.text(max_size=40)


def step_requests(pool: list[str]):
    return st.builds(
        pb.StepRequest,
        session_id=session_ids(pool),
        inputs=tensor_maps,
        num_steps=steps,
        request_id=st.text(max_size=5),
        outputs=st.lists(names, max_size=2),
    )


def step_batches(pool: list[str]):
    return st.builds(
        pb.StepBatch,
        session_ids=st.lists(session_ids(pool), max_size=5),
        inputs=tensor_maps,
        outputs=st.lists(names, max_size=2),
    )


def requests(pool: list[str]):
    """(method, message) for every unary RPC."""
    sid = session_ids(pool)
    return st.one_of(
        st.tuples(st.just("ListModels"), st.builds(pb.ListModelsRequest, name=model_names)),
        st.tuples(st.just("GetModel"), st.builds(pb.GetModelRequest, name=model_names, version=versions)),
        st.tuples(st.just("LoadModel"), st.builds(pb.LoadModelRequest, name=admin_names, version=versions)),
        st.tuples(
            st.just("UnloadModel"),
            st.builds(pb.UnloadModelRequest, name=admin_names, version=versions, force=st.booleans()),
        ),
        st.tuples(
            st.just("OpenSession"),
            st.builds(
                pb.OpenSessionRequest,
                model=model_names,
                version=versions,
                initial_state=tensor_maps,
                snapshot=st.binary(max_size=64),
                parameters=tensor_maps,
            ),
        ),
        st.tuples(st.just("CloseSession"), st.builds(pb.SessionRequest, session_id=st.text(max_size=40))),
        st.tuples(st.just("ResetSession"), st.builds(pb.ResetSessionRequest, session_id=sid, state=tensor_maps)),
        st.tuples(st.just("GetState"), st.builds(pb.SessionRequest, session_id=sid)),
        st.tuples(
            st.just("SetState"),
            st.builds(pb.SetStateRequest, session_id=sid, state=tensor_maps, snapshot=st.binary(max_size=64)),
        ),
        st.tuples(st.just("Step"), step_requests(pool)),
        st.tuples(
            st.just("Predict"),
            st.builds(
                pb.PredictRequest,
                model=model_names,
                version=versions,
                inputs=tensor_maps,
                lengths=tensors(),
                initial_state=tensor_maps,
                parameters=tensor_maps,
                outputs=st.lists(names, max_size=2),
            ),
        ),
        st.tuples(st.just("GetStats"), st.builds(pb.StatsRequest, model=model_names)),
    )


# ---- the tests -------------------------------------------------------------------------------------------------
@FUZZ
@given(method=st.sampled_from(UNARY), payload=st.binary(max_size=256))
def test_raw_bytes_on_every_unary_rpc(channel, method, payload):
    code, _ = call_unary(channel, method, payload)
    assert code in CLIENT_CODES, (method, payload, code)


@FUZZ
@given(payloads=st.lists(st.binary(max_size=128), max_size=4))
def test_raw_bytes_on_the_stream(channel, payloads):
    code, responses = call_stream(channel, payloads)
    assert code in CLIENT_CODES
    check_stream_results(responses)


@FUZZ
@given(data=st.data())
def test_wrong_but_well_formed_unary_requests(channel, sessions, data):
    method, request = data.draw(requests(sessions))
    code, _ = call_unary(channel, method, request.SerializeToString())
    assert code in CLIENT_CODES, (method, request, code)


@FUZZ
@given(data=st.data())
def test_wrong_but_well_formed_stream_messages(channel, sessions, data):
    messages = data.draw(
        st.lists(
            st.builds(
                pb.StreamStepRequest,
                steps=st.lists(step_requests(sessions), max_size=3),
                batch=st.none() | step_batches(sessions),
            ),
            max_size=3,
        )
    )
    code, responses = call_stream(channel, [m.SerializeToString() for m in messages])
    assert code in CLIENT_CODES, (messages, code)
    assert code != C.OK or len(responses) == len(messages)  # each message answered, in order
    check_stream_results(responses)


def test_server_is_healthy_and_correct_afterwards(server, channel):
    # Runs after the fuzzing above (same module, same server).
    with Client(server.address, timeout=CALL_TIMEOUT) as client:
        assert client.health() == "SERVING"
        xs = np.random.default_rng(0).standard_normal((5, TINY_INPUT)).astype(np.float32)
        with client.session("gru") as s:
            ys = np.stack([s.step(x) for x in xs])
        np.testing.assert_allclose(ys, tiny_expected(xs)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "tensor",
    [
        pb.Tensor(dtype=pb.FLOAT32, shape=[TINY_INPUT], data=b"\x00" * 3),  # too few bytes
        pb.Tensor(dtype=99, shape=[TINY_INPUT], data=b"\x00" * 12),  # unknown dtype
        pb.Tensor(dtype=pb.FLOAT32, shape=[-1, TINY_INPUT], data=b""),  # negative dimension
        pb.Tensor(dtype=pb.FLOAT64, shape=[TINY_INPUT], data=b"\x00" * 24),  # wrong dtype
        pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 62, 1 << 62], data=b""),  # overflowing shape
        to_proto(np.full(TINY_INPUT, np.nan, np.float32)),  # NaN
        to_proto(np.zeros((0, TINY_INPUT), np.float32)),  # empty
    ],
)
def test_malformed_step_inputs(channel, sessions, tensor):
    before = pb.SessionState.FromString(
        channel.unary_unary(SERVICE + "GetState")(pb.SessionRequest(session_id=sessions[2]).SerializeToString())
    )
    request = pb.StepRequest(session_id=sessions[2], inputs={"x": tensor})
    code, _ = call_unary(channel, "Step", request.SerializeToString())
    assert code in {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED}
    after = pb.SessionState.FromString(
        channel.unary_unary(SERVICE + "GetState")(pb.SessionRequest(session_id=sessions[2]).SerializeToString())
    )
    assert after.steps == before.steps  # refused, so nothing changed
    np.testing.assert_array_equal(from_proto(after.state["h"]), from_proto(before.state["h"]))
