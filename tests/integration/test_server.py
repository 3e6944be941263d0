"""The session server over the wire (raw gRPC stubs, a real server on port 0, real ONNX/TorchScript files)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_HIDDEN, TINY_INPUT, ServerHandle, tiny_expected

from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.tensors import from_proto, to_proto

MODELS = ["gru", "gru_ts"]


@pytest.fixture
def server(server_factory, tiny_repository) -> ServerHandle:
    return server_factory(tiny_repository)


@pytest.fixture
def stub(server: ServerHandle) -> Iterator[pb_grpc.RnnServeStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RnnServeStub(channel)


def xs_for(seed: int, steps: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, TINY_INPUT)).astype(np.float32)


def step(stub, sid: str, x: np.ndarray) -> np.ndarray:
    return from_proto(stub.Step(pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)})).outputs["y"])


def state_of(stub, sid: str) -> np.ndarray:
    return from_proto(stub.GetState(pb.SessionRequest(session_id=sid)).state["h"]).copy()


def open_session(stub, model: str = "gru", **kw) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(model=model, **kw)).session_id


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("model", MODELS)
def test_unary_steps_equal_eager(stub, model):
    xs = xs_for(1, 30)
    sid = open_session(stub, model)
    ys = np.stack([step(stub, sid, x) for x in xs])
    expected, h = tiny_expected(xs)
    assert np.abs(ys - expected).max() <= 1e-5
    assert np.abs(state_of(stub, sid)[0] - h).max() <= 1e-5


@pytest.mark.parametrize("model", MODELS)
def test_chunk_equals_single_steps(stub, model):
    xs = xs_for(2, 12)
    sid = open_session(stub, model)
    first = from_proto(
        stub.Step(pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs[:5])}, num_steps=5)).outputs["y"]
    )
    rest = [step(stub, sid, x) for x in xs[5:]]
    expected, _ = tiny_expected(xs)
    assert first.shape == (5, 2)
    assert np.abs(np.concatenate([first, np.stack(rest)]) - expected).max() <= 1e-5


def test_initial_state_reset_and_set_state(stub):
    xs = xs_for(3, 6)
    h0 = np.linspace(-1, 1, TINY_HIDDEN, dtype=np.float32).reshape(1, TINY_HIDDEN)
    sid = open_session(stub, initial_state={"h": to_proto(h0)})
    ys = np.stack([step(stub, sid, x) for x in xs])
    assert np.abs(ys - tiny_expected(xs, h0)[0]).max() <= 1e-5
    stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
    assert np.all(state_of(stub, sid) == 0)
    assert np.abs(np.stack([step(stub, sid, x) for x in xs]) - tiny_expected(xs)[0]).max() <= 1e-5
    stub.SetState(pb.SetStateRequest(session_id=sid, state={"h": to_proto(h0)}))
    assert np.array_equal(state_of(stub, sid), h0)
    stub.ResetSession(pb.ResetSessionRequest(session_id=sid, state={"h": to_proto(h0 * 2)}))
    assert np.array_equal(state_of(stub, sid), h0 * 2)


def test_snapshot_restores_into_new_session_and_continues_identically(stub):
    xs = xs_for(4, 20)
    sid = open_session(stub)
    for x in xs[:8]:
        step(stub, sid, x)
    snap = stub.GetState(pb.SessionRequest(session_id=sid))
    assert snap.steps == 8 and snap.model == "gru" and snap.version == 1
    restored = stub.OpenSession(pb.OpenSessionRequest(snapshot=snap.snapshot))
    assert restored.steps == 8 and restored.model.name == "gru"
    a = np.stack([step(stub, sid, x) for x in xs[8:]])
    b = np.stack([step(stub, restored.session_id, x) for x in xs[8:]])
    assert np.array_equal(a, b)
    assert np.abs(b - tiny_expected(xs)[0][8:]).max() <= 1e-5
    # SetState from a snapshot rewinds a session, step counter included.
    stub.SetState(pb.SetStateRequest(session_id=sid, snapshot=snap.snapshot))
    assert stub.GetState(pb.SessionRequest(session_id=sid)).steps == 8
    assert np.array_equal(np.stack([step(stub, sid, x) for x in xs[8:]]), a)


def test_snapshot_moves_between_servers(server_factory, tiny_repository):
    xs = xs_for(5, 10)
    one, two = server_factory(tiny_repository), server_factory(tiny_repository)
    with grpc.insecure_channel(one.address) as c1, grpc.insecure_channel(two.address) as c2:
        s1, s2 = pb_grpc.RnnServeStub(c1), pb_grpc.RnnServeStub(c2)
        sid = open_session(s1)
        for x in xs[:4]:
            step(s1, sid, x)
        snap = s1.GetState(pb.SessionRequest(session_id=sid)).snapshot
        moved = open_session(s2, model="", snapshot=snap)
        ys = np.stack([step(s2, moved, x) for x in xs[4:]])
    assert np.abs(ys - tiny_expected(xs)[0][4:]).max() <= 1e-5


def test_many_sessions_interleaved_on_few_streams_do_not_leak(stub, server):
    n_sessions, n_streams, steps = 100, 4, 12
    sids = [open_session(stub, MODELS[i % 2]) for i in range(n_sessions)]
    inputs = {sid: xs_for(100 + i, steps) for i, sid in enumerate(sids)}
    outputs: dict[str, list[np.ndarray]] = {sid: [] for sid in sids}
    groups = [sids[i::n_streams] for i in range(n_streams)]

    def run_stream(group: list[str]) -> None:
        rng = np.random.default_rng(len(group))

        def requests():
            for t in range(steps):
                order = rng.permutation(len(group))
                # Several sessions per message, and a message per pair of sessions: both shapes of multiplexing.
                for start in range(0, len(group), 2):
                    chosen = [group[k] for k in order[start : start + 2]]
                    yield pb.StreamStepRequest(
                        steps=[
                            pb.StepRequest(session_id=s, request_id=f"{s}:{t}", inputs={"x": to_proto(inputs[s][t])})
                            for s in chosen
                        ]
                    )

        for response in stub.StreamStep(requests()):
            for result in response.results:
                assert result.code == 0, result.message
                sid, t = result.request_id.split(":")
                assert len(outputs[sid]) == int(t)  # strictly in order per session
                outputs[sid].append(from_proto(result.outputs["y"]))

    threads = [threading.Thread(target=run_stream, args=(g,)) for g in groups]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    for sid in sids:
        expected = tiny_expected(inputs[sid])[0]
        assert np.abs(np.stack(outputs[sid]) - expected).max() <= 1e-5
    stats = stub.GetStats(pb.StatsRequest())
    assert sum(m.steps for m in stats.models) >= n_sessions * steps
    assert max(m.max_batch for m in stats.models) > 1, "steps of different sessions must share model calls"
    assert stats.open_sessions == n_sessions


def test_concurrent_unary_steps_batch_together(server_factory, tiny_repository):
    # A queue delay lets concurrent sessions meet in one batch even on a busy 2-core machine.
    server = server_factory(tiny_repository, max_queue_delay_us=20_000)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sids = [open_session(stub) for _ in range(16)]
        futures = [
            stub.Step.future(pb.StepRequest(session_id=s, inputs={"x": to_proto(xs_for(i, 1)[0])}))
            for i, s in enumerate(sids)
        ]
        results = [f.result() for f in futures]
        stats = stub.GetStats(pb.StatsRequest(model="gru")).models[0]
    for i, r in enumerate(results):
        assert np.abs(from_proto(r.outputs["y"]) - tiny_expected(xs_for(i, 1))[0][0]).max() <= 1e-5
    assert stats.max_batch > 1
    assert stats.batches < 16


# ---- bad input: the right status, a message naming what was expected, and no state change -----------------
BAD_STEPS = {
    "wrong dtype": ({"x": to_proto(np.zeros(TINY_INPUT, np.float64))}, 0, "expected dtype float32, got float64"),
    "wrong shape": ({"x": to_proto(np.zeros(TINY_INPUT + 1, np.float32))}, 0, "expected shape [3]"),
    "batch axis sent": ({"x": to_proto(np.zeros((1, TINY_INPUT), np.float32))}, 0, "expected shape [3]"),
    "missing tensor": ({}, 0, "takes 1 input tensor(s): 'x' float32[3]"),
    "extra tensor": (
        {"x": to_proto(np.zeros(TINY_INPUT, np.float32)), "z": to_proto(np.zeros(1, np.float32))},
        0,
        "takes 1 input tensor(s)",
    ),
    "wrong name": ({"input": to_proto(np.zeros(TINY_INPUT, np.float32))}, 0, "got ['input']"),
    "nan": ({"x": to_proto(np.array([0, np.nan, 0], np.float32))}, 0, "NaN or Inf"),
    "inf": ({"x": to_proto(np.array([0, np.inf, 0], np.float32))}, 0, "NaN or Inf"),
    "chunk without time axis": ({"x": to_proto(np.zeros(TINY_INPUT, np.float32))}, 4, "[num_steps"),
    "chunk of wrong length": ({"x": to_proto(np.zeros((3, TINY_INPUT), np.float32))}, 4, "expected shape [4, 3]"),
    "garbage tensor bytes": (
        {"x": pb.Tensor(dtype=pb.FLOAT32, shape=[TINY_INPUT], data=b"\x00" * 5)},
        0,
        "5 bytes of data do not hold shape [3] of float32",
    ),
    "unknown dtype enum": ({"x": pb.Tensor(dtype=99, shape=[TINY_INPUT], data=b"")}, 0, "unknown dtype enum 99"),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
@pytest.mark.parametrize("model", MODELS)
def test_bad_step_is_rejected_and_changes_nothing(stub, model, case):
    inputs, num_steps, needle = BAD_STEPS[case]
    xs = xs_for(7, 6)
    sid = open_session(stub, model)
    other = open_session(stub, model)
    for x in xs[:3]:
        step(stub, sid, x)
        step(stub, other, x)
    before = state_of(stub, sid)
    err = rpc_error(stub.Step, pb.StepRequest(session_id=sid, inputs=inputs, num_steps=num_steps))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()
    assert np.array_equal(state_of(stub, sid), before)
    assert stub.GetState(pb.SessionRequest(session_id=sid)).steps == 3
    # The same bad step inside a stream: a per-step error, the stream and the other session go on.
    responses = list(
        stub.StreamStep(
            iter(
                [
                    pb.StreamStepRequest(
                        steps=[
                            pb.StepRequest(session_id=sid, inputs=inputs, num_steps=num_steps),
                            pb.StepRequest(session_id=other, inputs={"x": to_proto(xs[3])}),
                        ]
                    )
                ]
            )
        )
    )
    bad, good = responses[0].results
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and needle in bad.message
    assert good.code == 0
    assert np.array_equal(state_of(stub, sid), before)
    # Both sessions continue exactly as if nothing happened.
    ys = np.stack([step(stub, sid, x) for x in xs[3:]])
    assert np.abs(ys - tiny_expected(xs)[0][3:]).max() <= 1e-5
    assert np.abs(np.stack([step(stub, other, x) for x in xs[4:]]) - tiny_expected(xs)[0][4:]).max() <= 1e-5


def test_unknown_model_and_session(stub):
    err = rpc_error(stub.OpenSession, pb.OpenSessionRequest(model="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'nope' not found" in err.details() and "gru" in err.details()
    err = rpc_error(stub.OpenSession, pb.OpenSessionRequest(model="gru", version=7))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no version 7" in err.details()
    for call, request in [
        (stub.Step, pb.StepRequest(session_id="deadbeef", inputs={"x": to_proto(np.zeros(3, np.float32))})),
        (stub.GetState, pb.SessionRequest(session_id="deadbeef")),
        (stub.CloseSession, pb.SessionRequest(session_id="deadbeef")),
        (stub.ResetSession, pb.ResetSessionRequest(session_id="deadbeef")),
        (stub.SetState, pb.SetStateRequest(session_id="deadbeef")),
    ]:
        err = rpc_error(call, request)
        assert err.code() == grpc.StatusCode.NOT_FOUND and "deadbeef" in err.details()


def test_bad_state_and_snapshot_are_rejected(stub):
    sid = open_session(stub)
    step(stub, sid, xs_for(8, 1)[0])
    before = state_of(stub, sid)
    cases = [
        (
            stub.OpenSession,
            pb.OpenSessionRequest(model="gru", initial_state={"h": to_proto(np.zeros(5, np.float32))}),
            "expected shape [1, 5]",
        ),
        (
            stub.OpenSession,
            pb.OpenSessionRequest(model="gru", initial_state={"c": to_proto(np.zeros(5, np.float32))}),
            "no state named ['c']",
        ),
        (stub.OpenSession, pb.OpenSessionRequest(snapshot=b"not a snapshot"), "not an rnnserve snapshot"),
        (
            stub.SetState,
            pb.SetStateRequest(session_id=sid, state={"h": to_proto(np.zeros((1, 5), np.int64))}),
            "expected dtype float32",
        ),
        (
            stub.ResetSession,
            pb.ResetSessionRequest(session_id=sid, state={"h": to_proto(np.full((1, 5), np.nan, np.float32))}),
            "NaN or Inf",
        ),
    ]
    snap = stub.GetState(pb.SessionRequest(session_id=sid)).snapshot
    corrupted = snap[:-1] + bytes([snap[-1] ^ 1])
    cases.append((stub.SetState, pb.SetStateRequest(session_id=sid, snapshot=corrupted), "checksum mismatch"))
    cases.append((stub.OpenSession, pb.OpenSessionRequest(snapshot=snap[:-3]), "checksum mismatch"))
    for call, request, needle in cases:
        err = rpc_error(call, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (needle, err.details())
        assert needle in err.details()
    assert np.array_equal(state_of(stub, sid), before)
    assert stub.GetStats(pb.StatsRequest()).open_sessions == 1


def test_unknown_requested_output(stub):
    # Refused before the step is queued, in every form of step: the session does not advance.
    sid = open_session(stub)
    x = to_proto(np.ones(3, np.float32))
    err = rpc_error(stub.Step, pb.StepRequest(session_id=sid, inputs={"x": x}, outputs=["q"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no output ['q']" in err.details()
    (reply,) = stub.StreamStep(
        iter([pb.StreamStepRequest(steps=[pb.StepRequest(session_id=sid, inputs={"x": x}, outputs=["q"])])])
    )
    assert reply.results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no output ['q']" in reply.results[0].message
    batch = pb.StepBatch(session_ids=[sid], inputs={"x": to_proto(np.ones((1, 3), np.float32))}, outputs=["q"])
    (reply,) = stub.StreamStep(iter([pb.StreamStepRequest(batch=batch)]))
    assert list(reply.batch.codes) == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    state = stub.GetState(pb.SessionRequest(session_id=sid))
    assert state.steps == 0 and not from_proto(state.state["h"]).any()


def test_garbage_request_bytes(server, stub):
    with grpc.insecure_channel(server.address) as channel:
        for method in ("Step", "OpenSession", "GetState"):
            raw = channel.unary_unary(f"/rnnserve.v1.RnnServe/{method}")
            err = rpc_error(raw, b"\xff\xff\xff\xff garbage")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid rnnserve.v1." in err.details()
        stream = channel.stream_stream("/rnnserve.v1.RnnServe/StreamStep")
        err = rpc_error(lambda: list(stream(iter([b"\xff\xff\xff garbage"]))))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "StreamStepRequest" in err.details()
    sid = open_session(stub)  # the server is fine
    assert step(stub, sid, xs_for(9, 1)[0]).shape == (2,)


def test_oversized_message(server_factory, tiny_repository):
    server = server_factory(tiny_repository, max_message_bytes=4096)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sid = open_session(stub)
        big = np.zeros((2000, TINY_INPUT), np.float32)
        err = rpc_error(stub.Step, pb.StepRequest(session_id=sid, inputs={"x": to_proto(big)}, num_steps=2000))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.GetState(pb.SessionRequest(session_id=sid)).steps == 0
        assert step(stub, sid, xs_for(1, 1)[0]).shape == (2,)


def test_max_sessions(server_factory, tiny_repository):
    server = server_factory(tiny_repository, max_sessions=3)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sids = [open_session(stub) for _ in range(3)]
        err = rpc_error(stub.OpenSession, pb.OpenSessionRequest(model="gru"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 3 sessions" in err.details()
        stub.CloseSession(pb.SessionRequest(session_id=sids[0]))
        open_session(stub)


def test_idle_sessions_expire(server_factory, tiny_repository):
    server = server_factory(tiny_repository, session_ttl=0.3)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        idle, busy = open_session(stub), open_session(stub)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            step(stub, busy, xs_for(1, 1)[0])
            time.sleep(0.05)
        err = rpc_error(stub.GetState, pb.SessionRequest(session_id=idle))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "expired" in err.details()
        assert stub.GetState(pb.SessionRequest(session_id=busy)).steps > 0
        assert stub.GetStats(pb.StatsRequest()).expired_sessions >= 1


def test_session_ids_are_unguessable(stub):
    ids = {open_session(stub) for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_closed_session_frees_its_slot(stub):
    sids = [open_session(stub) for _ in range(5)]
    for s in sids:
        stub.CloseSession(pb.SessionRequest(session_id=s))
    assert stub.GetModel(pb.GetModelRequest(name="gru")).open_sessions == 0
    err = rpc_error(stub.Step, pb.StepRequest(session_id=sids[0], inputs={"x": to_proto(np.zeros(3, np.float32))}))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_list_models_and_signatures(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"gru", "gru_ts"}
    gru = models["gru"]
    assert gru.state == "READY" and gru.format == "onnx" and gru.version == 1
    assert [(t.name, list(t.shape), t.dtype) for t in gru.inputs] == [("x", [3], pb.FLOAT32)]
    assert [(s.name, s.output_name, list(s.shape), s.batch_axis) for s in gru.states] == [("h", "h_out", [1, 5], 1)]
    assert gru.state_bytes == TINY_HIDDEN * 4
    assert models["gru_ts"].format == "torchscript"


def test_broken_model_does_not_stop_the_others(server_factory, tiny_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    (repo / "gru_ts" / "1" / "model.pt").unlink()
    bad = repo / "bad" / "1"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text(
        '{"name": "bad", "version": 1, "format": "onnx", "artifact": "m.onnx", "inputs": [], "outputs": [], "bogus": 1}'
    )
    server = server_factory(repo)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert models["gru"].state == "READY"
        assert models["gru_ts"].state == "FAILED" and "model.pt is missing" in models["gru_ts"].error
        assert models["bad"].state == "FAILED" and "bogus" in models["bad"].error
        err = rpc_error(stub.OpenSession, pb.OpenSessionRequest(model="gru_ts"))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "failed to load" in err.details()
        sid = open_session(stub)
        assert step(stub, sid, xs_for(1, 1)[0]).shape == (2,)


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnserve.v1.RnnServe"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"rnnserve.v1.RnnServe", "grpc.health.v1.Health"} <= names


def test_repository_must_exist(tmp_path: Path):
    from rnnserve.server.app import RnnServer
    from rnnserve.server.settings import ServerSettings

    server = RnnServer(ServerSettings(repository=tmp_path / "missing", port=0))
    with pytest.raises(FileNotFoundError, match="export a model into it first"):
        server.repository.load_all()
