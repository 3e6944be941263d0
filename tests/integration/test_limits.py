"""Limits and backpressure over the wire: each bound answers RESOURCE_EXHAUSTED naming its flag, changes
nothing, and the server keeps serving; a unary Step whose deadline passes while queued never applies."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, ServerHandle, tiny_expected

from rnnserve.proto import kserve_grpc_service_pb2 as kpb
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.server.limits import peer_host
from rnnserve.tensors import from_proto, to_proto

X = np.ones(TINY_INPUT, np.float32)


@pytest.fixture
def channel_to():
    channels: list[grpc.Channel] = []

    def connect(server: ServerHandle) -> pb_grpc.RnnServeStub:
        channel = grpc.insecure_channel(server.address)
        channels.append(channel)
        return pb_grpc.RnnServeStub(channel)

    yield connect
    for channel in channels:
        channel.close()


def open_session(stub, model: str = "gru") -> str:
    return stub.OpenSession(pb.OpenSessionRequest(model=model)).session_id


def step_request(sid: str, x: np.ndarray, num_steps: int = 0) -> pb.StepRequest:
    return pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)}, num_steps=num_steps)


def steps_of(stub, sid: str) -> int:
    return stub.GetState(pb.SessionRequest(session_id=sid)).steps


def refused(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def test_tensor_elements_limit(server_factory, tiny_repository, channel_to):
    stub = channel_to(server_factory(tiny_repository, max_tensor_elements=3 * TINY_INPUT))
    sid = open_session(stub)
    stub.Step(step_request(sid, np.ones((3, TINY_INPUT), np.float32), 3))  # exactly at the limit
    err = refused(stub.Step, step_request(sid, np.ones((4, TINY_INPUT), np.float32), 4))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-tensor-elements" in err.details() and "'x'" in err.details()
    # Checked from the shape alone, before the bytes are looked at: a huge claimed shape is refused the same way.
    huge = pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 40, 1 << 20], data=b"")
    err = refused(stub.Step, pb.StepRequest(session_id=sid, inputs={"x": huge}, num_steps=1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    err = refused(
        stub.OpenSession, pb.OpenSessionRequest(model="gru", initial_state={"h": to_proto(np.zeros(100, np.float32))})
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert steps_of(stub, sid) == 3  # the refused step changed nothing


def test_tensor_elements_limit_on_kserve(server_factory, tiny_repository):
    server = server_factory(tiny_repository, max_tensor_elements=3 * TINY_INPUT)
    infer = "/inference.GRPCInferenceService/ModelInfer"

    def request(rows: int, sequence_id: int = 0) -> bytes:
        data = np.ones((rows, TINY_INPUT), np.float32)
        tensor = kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(data.shape))
        message = kpb.ModelInferRequest(model_name="gru", inputs=[tensor], raw_input_contents=[data.tobytes()])
        if sequence_id:
            message.parameters["sequence_id"].int64_param = sequence_id
            message.parameters["sequence_start"].bool_param = True
        return message.SerializeToString()

    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(infer, response_deserializer=kpb.ModelInferResponse.FromString)
        assert len(call(request(3)).outputs) == 1  # exactly at the limit
        for message in (request(4), request(4, sequence_id=7)):
            err = refused(call, message)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-tensor-elements" in err.details() and "'x'" in err.details()


def test_message_over_max_message_bytes_names_the_flag(server_factory, tiny_repository, channel_to):
    # The default limit, 16 MiB, and a real 17 MiB request on each API: refused naming the flag and the limit
    # (grpc's own refusal, "Received message larger than max", names neither), and nothing changes.
    server = server_factory(tiny_repository)
    stub = channel_to(server)
    sid = open_session(stub)
    limit = 16 * 1024 * 1024
    data = np.ones(17 * 1024 * 1024 // 4, np.float32)
    step = pb.StepRequest(session_id=sid, inputs={"x": to_proto(data)})
    infer = kpb.ModelInferRequest(
        model_name="gru",
        inputs=[kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, data.size])],
        raw_input_contents=[data.tobytes()],
    )
    with grpc.insecure_channel(server.address) as channel:
        calls = [
            lambda: stub.Step(step),
            lambda: list(stub.StreamStep(iter([pb.StreamStepRequest(steps=[step])]))),
            lambda: channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(infer.SerializeToString()),
        ]
        for call in calls:
            err = refused(call)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-message-bytes" in err.details() and f"the limit is {limit} bytes" in err.details()
    assert steps_of(stub, sid) == 0
    y = from_proto(stub.Step(step_request(sid, X)).outputs["y"])
    np.testing.assert_allclose(y, tiny_expected(X[None])[0][0], rtol=1e-5, atol=1e-6)


def test_steps_per_message_limit_unary_and_stream(server_factory, tiny_repository, channel_to):
    stub = channel_to(server_factory(tiny_repository, max_steps_per_message=4))
    a, b = open_session(stub), open_session(stub)
    stub.Step(step_request(a, np.ones((4, TINY_INPUT), np.float32), 4))
    err = refused(stub.Step, step_request(a, np.ones((5, TINY_INPUT), np.float32), 5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-steps-per-message" in err.details()

    chunk = np.ones((2, TINY_INPUT), np.float32)
    too_many = pb.StreamStepRequest(
        steps=[step_request(a, chunk, 2), step_request(b, chunk, 2)],  # 4 steps...
        batch=pb.StepBatch(session_ids=[b], inputs={"x": to_proto(X[None])}),  # ...plus one row: 5
    )
    fine = pb.StreamStepRequest(steps=[step_request(a, chunk, 2), step_request(b, chunk, 2)])
    responses = list(stub.StreamStep(iter([too_many, fine]), timeout=30))
    assert len(responses) == 2  # the refused message is answered, the stream goes on
    first, second = responses
    assert [r.code for r in first.results] == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]] * 2
    assert "--max-steps-per-message" in first.results[0].message
    assert list(first.batch.codes) == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert [r.code for r in second.results] == [0, 0]
    assert [r.steps for r in second.results] == [6, 2]  # a: 4 + 2; b: the refused message applied nothing


def test_queued_steps_limit_per_model(server_factory, tiny_repository, channel_to):
    # The batcher waits up to 0.5 s for a batch to fill, so steps sent meanwhile stay queued.
    server = server_factory(tiny_repository, max_queued_steps=2, max_queue_delay_us=500_000)
    stub = channel_to(server)
    sids = [open_session(stub) for _ in range(3)]
    first = stub.Step.future(step_request(sids[0], X))
    second = stub.Step.future(step_request(sids[1], X))
    time.sleep(0.1)
    err = refused(stub.Step, step_request(sids[2], X))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queued-steps" in err.details() and "gru:1" in err.details()
    assert first.result(10).steps == 1 and second.result(10).steps == 1
    assert stub.Step(step_request(sids[2], X)).steps == 1  # room again once the queue drained
    assert server.server.repository.models[("gru", 1)].batcher.queued_steps == 0
    # Other models have their own bound.
    other = open_session(stub, "gru_ts")
    assert stub.Step(step_request(other, X)).steps == 1


def test_sessions_per_client_without_auth_counts_the_peer_host(server_factory, tiny_repository, channel_to):
    server = server_factory(tiny_repository, max_sessions_per_client=2)
    stub, again = channel_to(server), channel_to(server)  # two connections from one host: one client
    a = open_session(stub)
    open_session(again)
    err = refused(open_session, stub)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-sessions-per-client" in err.details()
    stub.CloseSession(pb.SessionRequest(session_id=a))
    open_session(again)  # a closed session frees its place


def test_peer_host():
    assert peer_host("ipv4:10.0.0.1:5123") == "ipv4:10.0.0.1"
    assert peer_host("ipv6:[::1]:5123") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/sock") == "unix:/tmp/sock"


def test_unary_deadline_while_queued_never_applies(server_factory, tiny_repository, channel_to):
    # A batch waits 1 s to fill; the call gives up after 0.2 s, while its step is still queued.
    server = server_factory(tiny_repository, max_queue_delay_us=1_000_000)
    stub = channel_to(server)
    sid = open_session(stub)
    err = refused(stub.Step, step_request(sid, X), timeout=0.2)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.3)  # the batch that would have held it has formed
    assert steps_of(stub, sid) == 0  # dropped, not applied: the session is as before the call
    assert server.server.repository.models[("gru", 1)].batcher.queued_steps == 0
    y = from_proto(stub.Step(step_request(sid, X)).outputs["y"])
    np.testing.assert_allclose(y, tiny_expected(X[None])[0][0], rtol=1e-5, atol=1e-6)


@pytest.fixture
def busy_server(server_factory, tiny_repository) -> Iterator[ServerHandle]:
    yield server_factory(tiny_repository, max_pending_steps=2, max_queue_delay_us=300_000)


def test_pending_steps_per_session_still_bounded(busy_server, channel_to):
    stub = channel_to(busy_server)
    sid = open_session(stub)
    futures = [stub.Step.future(step_request(sid, X)) for _ in range(2)]
    time.sleep(0.1)
    assert refused(stub.Step, step_request(sid, X)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(f.result(10).steps for f in futures) == [1, 2]
