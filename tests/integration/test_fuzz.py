"""Fuzzing and malformed input: raw bytes and structurally valid but wrong messages on every RPC of both APIs
(native and KServe), unary and streamed, against a real server. Every call ends within its deadline with a
well-formed status a client mistake may get (never INTERNAL or UNKNOWN, never a hang), its message bounded
(it travels in a header: a long one would be lost to the client's header limit), and afterwards the server
is healthy and still steps correctly."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, ServerHandle, tiny_expected

from rnnserve.client import Client
from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.server.transport.status import MAX_STATUS_MESSAGE_BYTES
from rnnserve.tensors import from_proto, to_proto

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SERVICE = "/rnnserve.v1.RnnServe/"
KSERVE = "/inference.GRPCInferenceService/"
KSERVE_UNARY = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
]
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


def check_message(message: str) -> None:
    """A status message is bounded and is the server's own (never a transport's stand-in for one lost)."""
    assert len(message.encode()) <= MAX_STATUS_MESSAGE_BYTES, len(message.encode())
    assert not message.startswith("internal error"), message


def check_status(code: C, message: str) -> None:
    """A well-formed status for a client's mistake: a client code and a bounded message of the server's. The
    server's RESOURCE_EXHAUSTED names its limit; the transport's (a message or header too large) does not."""
    assert code in CLIENT_CODES, (code, message)
    check_message(message)
    assert code != C.RESOURCE_EXHAUSTED or "limit" in message or "maximum" in message, message


def call_unary(channel: grpc.Channel, method: str, payload: bytes, service: str = SERVICE) -> tuple[C, bytes | None]:
    try:
        return C.OK, channel.unary_unary(service + method)(payload, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        check_status(err.code(), err.details() or "")
        return err.code(), None


def call_stream(
    channel: grpc.Channel, payloads: list[bytes], method: str = SERVICE + "StreamStep"
) -> tuple[C, list[bytes]]:
    call = channel.stream_stream(method)(iter(payloads), timeout=CALL_TIMEOUT)
    responses: list[bytes] = []
    try:
        for r in call:
            responses.append(r)
        return C.OK, responses
    except grpc.RpcError as err:
        check_status(err.code(), err.details() or "")
        return err.code(), responses


def check_stream_results(responses: list[bytes], requests: list[pb.StreamStepRequest] | None = None) -> None:
    for i, raw in enumerate(responses):
        response = pb.StreamStepResponse.FromString(raw)
        for result in response.results:
            assert C.OK.value[0] == 0
            assert result.code in {c.value[0] for c in CLIENT_CODES}, (result.code, result.message)
            check_message(result.message)
        batch = response.batch
        if requests is not None and requests[i].HasField("batch"):
            assert len(batch.codes) == len(batch.messages) == len(requests[i].batch.session_ids) > 0
        for code, message in zip(batch.codes, batch.messages, strict=True):
            assert code in {c.value[0] for c in CLIENT_CODES}, (code, message)
            check_message(message)


# ---- strategies ----------------------------------------------------------------------------------------------
LONG = 100_000  # characters: an id or name far past anything a message should quote in full
names = st.sampled_from(["x", "h", "y", "", "lengths", "h_out", "x\x00", "é", "n" * LONG]) | st.text(max_size=8)
# Zero and huge dimensions together ([0, 2**62] is empty, yet too large for any array), and too many of them.
huge_dims = st.sampled_from([0, 1 << 31, 1 << 40, 1 << 62, (1 << 63) - 1])
dims = st.lists(st.integers(min_value=-2, max_value=6) | huge_dims, max_size=4) | st.lists(
    st.integers(min_value=0, max_value=2), min_size=33, max_size=40
)


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
    return (
        st.sampled_from(pool)
        | st.sampled_from(["", "0" * 32, "x" * 1000, "x" * LONG, "é" * LONG])
        | st.text(max_size=40)
    )


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


# KServe: the same garbage in Triton's shapes. Sequence ids come from a small set, so the sequences the fuzzer
# starts (each a session) stay few.
datatypes = st.sampled_from(["FP32", "FP64", "FP16", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "", "fp32"])
versions_text = st.sampled_from(["", "1", "2", "01", "\u00b2", "\u0661", "-1", " 1", "9" * 30, "9" * 5000])
versions_text |= st.text(max_size=4)
parameters = st.dictionaries(
    st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "priority", "é"]),
    st.builds(kpb.InferParameter, bool_param=st.booleans())
    | st.builds(kpb.InferParameter, int64_param=st.integers(min_value=-2, max_value=3))
    | st.builds(kpb.InferParameter, string_param=st.sampled_from(["", "a", "b" * LONG])),
    max_size=3,
)


@st.composite
def infer_inputs(draw) -> kpb.ModelInferRequest.InferInputTensor:
    tensor = kpb.ModelInferRequest.InferInputTensor(name=draw(names), datatype=draw(datatypes), shape=draw(dims))
    if draw(st.booleans()):
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=6)))
        tensor.contents.int_contents.extend(draw(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=3)))
    return tensor


def infer_requests():
    return st.builds(
        kpb.ModelInferRequest,
        model_name=model_names,
        model_version=versions_text,
        id=st.text(max_size=4),
        parameters=parameters,
        inputs=st.lists(infer_inputs(), max_size=3),
        outputs=st.lists(st.builds(kpb.ModelInferRequest.InferRequestedOutputTensor, name=names), max_size=2),
        raw_input_contents=st.lists(st.binary(max_size=16) | st.sampled_from([b"\x00" * 12]), max_size=3),
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
    check_stream_results(responses, messages)


@FUZZ
@given(method=st.sampled_from(KSERVE_UNARY), payload=st.binary(max_size=256))
def test_raw_bytes_on_every_kserve_rpc(channel, method, payload):
    code, _ = call_unary(channel, method, payload, KSERVE)
    assert code in CLIENT_CODES, (method, payload, code)


@FUZZ
@given(request=infer_requests())
def test_wrong_but_well_formed_kserve_infer(channel, request):
    code, _ = call_unary(channel, "ModelInfer", request.SerializeToString(), KSERVE)
    assert code in CLIENT_CODES, (request, code)


@FUZZ
@given(requests=st.lists(infer_requests(), max_size=3), garbage=st.binary(max_size=32))
def test_wrong_but_well_formed_kserve_stream(channel, requests, garbage):
    payloads = [r.SerializeToString() for r in requests] + [garbage]
    code, responses = call_stream(channel, payloads, KSERVE + "ModelStreamInfer")
    assert code == C.OK, code  # each request is answered in the stream, which goes on
    assert len(responses) == len(payloads)
    for raw in responses:
        check_message(kpb.ModelStreamInferResponse.FromString(raw).error_message)


def test_server_is_healthy_and_correct_afterwards(server, channel):
    # Runs after the fuzzing above (same module, same server).
    ready = channel.unary_unary(KSERVE + "ServerReady")(kpb.ServerReadyRequest().SerializeToString())
    assert kpb.ServerReadyResponse.FromString(ready).ready
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


def refusal(channel: grpc.Channel, method: str, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(request.SerializeToString(), timeout=CALL_TIMEOUT)
    check_status(info.value.code(), info.value.details() or "")
    return info.value


def infer(shape: list[int], data: bytes = b"", **fields) -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=shape)
    return kpb.ModelInferRequest(inputs=[tensor], raw_input_contents=[data], **{"model_name": "gru", **fields})


@pytest.mark.parametrize("shape", [[0, 1 << 62], [1 << 40, 0, 1 << 40], [1] * 70])
def test_impossible_shapes_are_invalid_arguments_naming_the_tensor(channel, sessions, shape):
    # Empty, yet no array can have these shapes (or this many dimensions): the client's mistake, on every path.
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b"")
    one = to_proto(np.ones(1, np.int64))
    native = [
        ("Step", pb.StepRequest(session_id=sessions[2], inputs={"x": tensor}), "tensor 'x'"),
        ("Predict", pb.PredictRequest(model="gru", inputs={"x": tensor}, lengths=one), "tensor 'x'"),
        ("OpenSession", pb.OpenSessionRequest(model="gru", initial_state={"h": tensor}), "tensor 'h'"),
    ]
    for method, request, named in native:
        err = refusal(channel, SERVICE + method, request)
        assert err.code() == C.INVALID_ARGUMENT and named in err.details(), (method, err.details())
    err = refusal(channel, KSERVE + "ModelInfer", infer(shape))
    assert err.code() == C.INVALID_ARGUMENT and "input 'x'" in err.details(), err.details()


@pytest.mark.parametrize("version", ["\u00b2", "\u0661", "9" * 5000])
def test_kserve_model_version_must_be_ascii_digits(channel, version):
    requests = [
        ("ModelInfer", infer([1, TINY_INPUT], b"\x00" * 12, model_version=version)),
        ("ModelMetadata", kpb.ModelMetadataRequest(name="gru", version=version)),
        ("ModelReady", kpb.ModelReadyRequest(name="gru", version=version)),
    ]
    for method, request in requests:
        err = refusal(channel, KSERVE + method, request)
        assert err.code() == C.INVALID_ARGUMENT and "model version" in err.details(), (method, err.details())


def test_echoed_client_values_are_bounded(channel, sessions):
    # Quoted in full, each of these would make a status message of ~100 kB: past the client's header limit,
    # which turns the real status into RESOURCE_EXHAUSTED.
    x = to_proto(np.zeros(TINY_INPUT, np.float32))
    many = {f"input{i}": x for i in range(10_000)}
    one = to_proto(np.ones(1, np.int64))
    many_infer = infer([1, TINY_INPUT], b"\x00" * 12)
    for i in range(10_000):
        many_infer.inputs.add(name=f"input{i}", datatype="FP32", shape=[1, TINY_INPUT])
        many_infer.raw_input_contents.append(b"\x00" * 12)
    unstarted = infer([1, TINY_INPUT], b"\x00" * 12)
    unstarted.parameters["sequence_id"].string_param = "s" * LONG
    cases = [
        (SERVICE + "Step", pb.StepRequest(session_id=sessions[2], inputs=many), C.INVALID_ARGUMENT),
        (SERVICE + "Step", pb.StepRequest(session_id="x" * LONG, inputs={"x": x}), C.NOT_FOUND),
        (SERVICE + "Step", pb.StepRequest(session_id="\u00e9" * LONG, inputs={"x": x}), C.NOT_FOUND),
        (SERVICE + "GetModel", pb.GetModelRequest(name="m" * LONG), C.NOT_FOUND),
        (SERVICE + "Predict", pb.PredictRequest(model="gru", inputs=many, lengths=one), C.INVALID_ARGUMENT),
        (KSERVE + "ModelInfer", many_infer, C.INVALID_ARGUMENT),
        (KSERVE + "ModelInfer", infer([1, TINY_INPUT], model_name="m" * LONG), C.NOT_FOUND),
        (KSERVE + "ModelInfer", unstarted, C.INVALID_ARGUMENT),
    ]
    for method, request, expected in cases:
        err = refusal(channel, method, request)
        assert err.code() == expected, (method, err.code(), err.details()[:300])
        if request is not many_infer:  # (that one quotes one name only)
            assert "chars)" in err.details() or "in all" in err.details(), err.details()  # the cut is marked


def test_step_batch_without_session_ids_is_refused(channel):
    message = pb.StreamStepRequest(batch=pb.StepBatch(inputs={"x": to_proto(np.zeros((0, TINY_INPUT), np.float32))}))
    code, responses = call_stream(channel, [message.SerializeToString()])
    assert code == C.INVALID_ARGUMENT and responses == []
