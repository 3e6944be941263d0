"""The client against a real grpc server running a small test double of the RnnServe service.

The double (FakeRnnServe) only stands in for the server so that the client's conversions, error mapping
and stream handling are checked on the wire; end-to-end tests against rnnserve.server live in
test_client_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client, ModelInfo, RnnServeError, Session
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.tensors import decode_map, encode_map


def _spec(name: str) -> pb.TensorSpec:
    return pb.TensorSpec(name=name, dtype=pb.FLOAT32, shape=[2])


_STATE = pb.StateSpec(name="h", output_name="h_out", dtype=pb.FLOAT32, shape=[2], initial="zeros")
MODELS = {
    # acc: y = h + x; h <- y (a running sum, so any reordering of steps shows in the outputs)
    "acc": pb.ModelInfo(
        name="acc", version=1, format="onnx", state="READY", inputs=[_spec("x")], outputs=[_spec("y")],
        states=[_STATE], state_bytes=8, max_batch_size=4,
    ),
    # pair: sum = h + a + b; diff = a - b; h <- sum
    "pair": pb.ModelInfo(
        name="pair", version=3, format="torchscript", state="READY", inputs=[_spec("a"), _spec("b")],
        outputs=[_spec("sum"), _spec("diff")], states=[_STATE], state_bytes=8,
    ),
}  # fmt: skip


class Fail(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeRnnServe(pb_grpc.RnnServeServicer):
    """A test double of the server: real RPCs, two toy models, sessions in a dict."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.step_requests: list[pb.StepRequest] = []
        self.metadata: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    # -- helpers -------------------------------------------------------------------------------------
    def _session(self, sid: str) -> dict[str, Any]:
        if sid not in self.sessions:
            raise Fail(grpc.StatusCode.NOT_FOUND, f"session '{sid}' not found")
        return self.sessions[sid]

    def _apply(self, req: pb.StepRequest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self.step_requests.append(req)
        sess = self._session(req.session_id)
        info = MODELS[sess["model"]]
        inputs = decode_map(req.inputs)
        for spec in info.inputs:
            if spec.name not in inputs:
                raise Fail(grpc.StatusCode.INVALID_ARGUMENT, f"missing input '{spec.name}'")
            want = (req.num_steps, 2) if req.num_steps else (2,)
            arr = inputs[spec.name]
            if arr.shape != want or arr.dtype != np.float32:
                raise Fail(grpc.StatusCode.INVALID_ARGUMENT, f"input '{spec.name}': {arr.dtype}{list(arr.shape)}")
        steps = [{k: v[t] for k, v in inputs.items()} for t in range(req.num_steps)] if req.num_steps else [inputs]
        outs = []
        for x in steps:
            if sess["model"] == "acc":
                sess["h"] = sess["h"] + x["x"]
                outs.append({"y": sess["h"]})
            else:
                sess["h"] = sess["h"] + x["a"] + x["b"]
                outs.append({"sum": sess["h"], "diff": x["a"] - x["b"]})
            sess["steps"] += 1
        merged = {k: np.stack([o[k] for o in outs]) for k in outs[0]} if req.num_steps else outs[0]
        if req.outputs:
            merged = {k: merged[k] for k in req.outputs}
        return sess, merged

    def _open(self, model: str, state: dict[str, np.ndarray], steps: int = 0) -> pb.OpenSessionResponse:
        if model not in MODELS:
            raise Fail(grpc.StatusCode.NOT_FOUND, f"model '{model}' not found")
        sid = f"s{next(self.ids)}"
        h = state.get("h", np.zeros(2, np.float32))
        self.sessions[sid] = {"model": model, "h": h, "steps": steps}
        return pb.OpenSessionResponse(session_id=sid, model=MODELS[model], steps=steps)

    def _state(self, sid: str) -> pb.SessionState:
        sess = self._session(sid)
        msg = pb.SessionState(session_id=sid, model=sess["model"], version=1, steps=sess["steps"])
        encode_map({"h": sess["h"]}, msg.state)
        msg.snapshot = b"SNAP" + msg.SerializeToString()
        return msg

    # -- RPCs ----------------------------------------------------------------------------------------
    def __getattribute__(self, name: str) -> Any:
        # Turn Fail into an aborted call in every unary RPC, and record the metadata clients send.
        attr = super().__getattribute__(name)
        if name[:1].isupper() and name != "StreamStep":

            def rpc(request: Any, context: grpc.ServicerContext) -> Any:
                self.metadata = list(context.invocation_metadata())
                try:
                    with self.lock:
                        return attr(request, context)
                except Fail as f:
                    context.abort(f.code, str(f))

            return rpc
        return attr

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[m for m in MODELS.values() if request.name in ("", m.name)])

    def GetModel(self, request, context):
        if request.name not in MODELS:
            raise Fail(grpc.StatusCode.NOT_FOUND, f"model '{request.name}' not found")
        return MODELS[request.name]

    def OpenSession(self, request, context):
        if request.snapshot:
            snap = pb.SessionState.FromString(request.snapshot[4:])
            return self._open(snap.model, decode_map(snap.state), snap.steps)
        return self._open(request.model, decode_map(request.initial_state))

    def CloseSession(self, request, context):
        self._session(request.session_id)
        del self.sessions[request.session_id]
        return pb.CloseSessionResponse()

    def ResetSession(self, request, context):
        sess = self._session(request.session_id)
        sess["h"] = decode_map(request.state).get("h", np.zeros(2, np.float32))
        return pb.ResetSessionResponse()

    def GetState(self, request, context):
        return self._state(request.session_id)

    def SetState(self, request, context):
        sess = self._session(request.session_id)
        if request.snapshot:
            snap = pb.SessionState.FromString(request.snapshot[4:])
            sess["h"], sess["steps"] = decode_map(snap.state)["h"], snap.steps
        else:
            sess["h"] = decode_map(request.state)["h"]
        return pb.SetStateResponse()

    def Step(self, request, context):
        sess, outs = self._apply(request)
        resp = pb.StepResponse(session_id=request.session_id, steps=sess["steps"], request_id=request.request_id)
        encode_map(outs, resp.outputs)
        return resp

    def StreamStep(self, request_iterator, context):
        for message in request_iterator:
            results = []
            for req in message.steps:
                result = pb.StepResult(session_id=req.session_id, request_id=req.request_id)
                try:
                    with self.lock:
                        sess, outs = self._apply(req)
                except Fail as f:
                    result.code, result.message = f.code.value[0], str(f)
                else:
                    result.steps = sess["steps"]
                    encode_map(outs, result.outputs)
                results.append(result)
            yield pb.StreamStepResponse(results=results)

    def GetStats(self, request, context):
        stats = pb.ModelStats(name="acc", version=1, steps=10, batches=4, batch_histogram=[1, 3], open_sessions=1)
        return pb.StatsResponse(models=[stats], open_sessions=len(self.sessions), expired_sessions=2)


@pytest.fixture
def fake() -> Iterator[tuple[FakeRnnServe, str]]:
    servicer = FakeRnnServe()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_RnnServeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def client(fake: tuple[FakeRnnServe, str]) -> Iterator[Client]:
    with Client(fake[1], timeout=10) as c:
        yield c


def running_sums(xs: list[np.ndarray]) -> list[np.ndarray]:
    return list(np.cumsum(np.stack(xs), axis=0))


XS = [np.array([i, 10 * i], np.float32) for i in range(1, 21)]


# -- models, stats, errors -------------------------------------------------------------------------------


def test_models_become_dataclasses(client: Client) -> None:
    models = client.list_models()
    assert [m.name for m in models] == ["acc", "pair"]
    acc = client.model("acc")
    assert isinstance(acc, ModelInfo) and acc.ready
    assert acc.input("x").dtype == "float32" and acc.input("x").shape == (2,)
    assert acc.states[0].name == "h" and acc.states[0].output_name == "h_out" and acc.state_bytes == 8
    assert [o.name for o in client.model("pair").outputs] == ["sum", "diff"]
    stats = client.stats()
    assert stats.expired_sessions == 2 and stats.models[0].mean_batch == 2.5
    assert stats.models[0].batch_histogram == (1, 3)


def test_rpc_errors_become_rnnserve_error(client: Client) -> None:
    with pytest.raises(RnnServeError) as info:
        client.open_session("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == "model 'nope' not found"
    assert str(info.value) == "NOT_FOUND: model 'nope' not found"
    with client.session("acc") as s, pytest.raises(RnnServeError) as info:
        s.step(np.zeros(3, np.float32))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == "input 'x': float32[3]"


def _closed_port() -> str:
    """A loopback address with nothing listening: a port the kernel handed out, then closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_unreachable_server_is_rnnserve_error_naming_the_address() -> None:
    address = _closed_port()
    with Client(address, timeout=5, retries=1) as c, pytest.raises(RnnServeError) as info:
        c.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.message.startswith(f"no server answered at {address}: ")

    async def unreachable() -> RnnServeError:
        async with AsyncClient(address, timeout=5, retries=1) as c:
            with pytest.raises(RnnServeError) as info:
                await c.model("acc")
            return info.value

    err = asyncio.run(unreachable())
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.message.startswith(f"no server answered at {address}: ")


def test_metadata_is_sent(fake: tuple[FakeRnnServe, str]) -> None:
    servicer, address = fake
    with Client(address, metadata={"Authorization": "Bearer t"}) as c:
        c.list_models()
    assert ("authorization", "Bearer t") in servicer.metadata


# -- sessions and steps ----------------------------------------------------------------------------------


def test_session_steps_single_input(fake: tuple[FakeRnnServe, str], client: Client) -> None:
    servicer, _ = fake
    with client.session("acc") as s:
        assert isinstance(s, Session) and s.model.name == "acc" and s.steps == 0
        ys = [s.step(x) for x in XS[:3]]
        assert s.steps == 3
        sid = s.id
        assert sid in servicer.sessions
    assert sid not in servicer.sessions and s.closed
    np.testing.assert_array_equal(np.stack(ys), np.stack(running_sums(XS[:3])))
    assert ys[0].dtype == np.float32


def test_python_values_are_cast_to_the_model_dtype(client: Client) -> None:
    with client.session("acc") as s:
        np.testing.assert_array_equal(s.step([1.0, 2.0]), [1.0, 2.0])  # float64 list -> float32
        np.testing.assert_array_equal(s.step(np.array([1, 1])), [2.0, 3.0])  # int64 -> float32


def test_dict_inputs_and_outputs(client: Client) -> None:
    a, b = np.ones(2, np.float32), np.full(2, 2, np.float32)
    with client.session("pair") as s:
        out = s.step({"a": a, "b": b})
        assert set(out) == {"sum", "diff"}
        np.testing.assert_array_equal(out["sum"], [3, 3])
        np.testing.assert_array_equal(out["diff"], [-1, -1])
        only = s.step({"a": a, "b": b}, outputs=["sum"])  # one output requested: the bare array
        np.testing.assert_array_equal(only, [6, 6])
        with pytest.raises(TypeError, match="pass a dict"):
            s.step(a)


def test_chunk_encoding(fake: tuple[FakeRnnServe, str], client: Client) -> None:
    servicer, _ = fake
    with client.session("acc") as s:
        ys = s.step_chunk(np.stack(XS[:4]))
        req = servicer.step_requests[-1]
        assert req.num_steps == 4 and list(req.inputs["x"].shape) == [4, 2]
        assert ys.shape == (4, 2) and s.steps == 4
        ys2 = s.step(XS[4:7], chunk=True)  # a list of steps is stacked
        assert servicer.step_requests[-1].num_steps == 3
        np.testing.assert_array_equal(np.concatenate([ys, ys2]), np.stack(running_sums(XS[:7])))
    with client.session("pair") as s:
        out = s.step_chunk([{"a": x, "b": x} for x in XS[:2]])
        assert out["sum"].shape == (2, 2) and out["diff"].shape == (2, 2)
        with pytest.raises(ValueError, match="leading time axis"):
            s.step_chunk({"a": np.zeros((2, 2)), "b": np.zeros((3, 2))})


def test_state_reset_snapshot_restore(client: Client) -> None:
    with client.session("acc", initial_state={"h": [1.0, 1.0]}) as s:
        np.testing.assert_array_equal(s.step(np.ones(2, np.float32)), [2, 2])
        state = s.get_state()
        np.testing.assert_array_equal(state["h"], [2, 2])
        snap = s.snapshot()
        assert isinstance(snap, bytes)
        s.step(np.ones(2, np.float32))
        s.set_state({"h": [5, 5]})
        np.testing.assert_array_equal(s.get_state()["h"], [5, 5])
        s.reset()
        np.testing.assert_array_equal(s.get_state()["h"], [0, 0])
        s.reset({"h": np.array([7, 7], np.float32)})
        np.testing.assert_array_equal(s.get_state()["h"], [7, 7])
        s.restore(snap)
        assert s.steps == 1
        np.testing.assert_array_equal(s.get_state()["h"], [2, 2])
    with client.restore(snap) as copy:
        assert copy.model.name == "acc" and copy.steps == 1
        np.testing.assert_array_equal(copy.step(np.ones(2, np.float32)), [3, 3])


def test_close_ignores_a_session_already_gone(fake: tuple[FakeRnnServe, str], client: Client) -> None:
    servicer, _ = fake
    s = client.open_session("acc")
    del servicer.sessions[s.id]  # expired on the server
    s.close()
    s.close()  # idempotent
    with pytest.raises(RnnServeError) as info:
        s.step(XS[0])
    assert info.value.code == grpc.StatusCode.NOT_FOUND


# -- streams ---------------------------------------------------------------------------------------------


def test_stream_yields_outputs_in_order(client: Client) -> None:
    with client.session("acc") as s:
        ys = list(s.stream(iter(XS)))
        assert s.steps == len(XS)
    np.testing.assert_array_equal(np.stack(ys), np.stack(running_sums(XS)))


@pytest.mark.parametrize("window", [1, 3])
def test_stream_window_bounds_steps_in_flight(client: Client, window: int) -> None:
    pulled = 0

    def source() -> Iterator[np.ndarray]:
        nonlocal pulled
        for x in XS:
            pulled += 1
            yield x

    with client.session("acc") as s:
        for consumed, _ in enumerate(s.stream(source(), window=window), start=1):
            assert consumed <= pulled <= consumed + window - 1
    assert pulled == len(XS)


def test_stream_window_one_feeds_outputs_back(client: Client) -> None:
    # Lock-step: the next input is only pulled after the caller saw the previous output.
    last = np.ones(2, np.float32)

    def feedback() -> Iterator[np.ndarray]:
        for _ in range(5):
            yield last

    with client.session("acc") as s:
        for y in s.stream(feedback(), window=1):
            last = y
    np.testing.assert_array_equal(last, [16, 16])  # h doubles each step: 1, 2, 4, 8, 16


def test_stream_step_error_raises_after_earlier_outputs(client: Client) -> None:
    xs = [*XS[:3], np.zeros(5, np.float32), *XS[3:]]
    seen = []
    with client.session("acc") as s:
        with pytest.raises(RnnServeError) as info:
            for y in s.stream(xs, window=1):
                seen.append(y)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message == "input 'x': float32[5]" and info.value.session_id == s.id
        assert len(seen) == 3 and s.steps == 3
        np.testing.assert_array_equal(s.step(XS[3]), running_sums(XS[:4])[-1])  # the session goes on


def test_stream_reraises_the_iterables_error_after_its_steps(client: Client) -> None:
    def broken() -> Iterator[np.ndarray]:
        yield from XS[:4]
        raise KeyError("sensor gone")

    with client.session("acc") as s:
        seen = []
        with pytest.raises(KeyError, match="sensor gone"):
            seen.extend(s.stream(broken()))
        assert s.steps == 4


def test_stream_stops_early_without_hanging(client: Client) -> None:
    with client.session("acc") as s:
        stream = s.stream(itertools.repeat(np.ones(2, np.float32)), window=4)
        first = list(itertools.islice(stream, 3))
        stream.close()  # what a `break` does; cancels the call
        assert len(first) == 3
        np.testing.assert_array_equal(s.step_chunk(np.ones((1, 2), np.float32)).shape, (1, 2))
    with pytest.raises(ValueError, match="window"):
        s.stream(XS, window=0)


def test_multi_stream_steps_many_sessions_per_message(client: Client) -> None:
    sessions = [client.open_session(name) for name in ("acc", "pair", "acc")]
    s1, s2, s3 = sessions
    with client.multi_stream() as ms:
        for i in range(3):
            out = ms.step({s1: XS[i], s2: {"a": XS[i], "b": XS[i]}, s3.id: {"x": 2 * XS[i]}})
            assert set(out) == {s1, s2, s3.id}  # keyed like the request
            np.testing.assert_array_equal(out[s2]["diff"], [0, 0])
        assert s1.steps == 3 and s2.steps == 3
        np.testing.assert_array_equal(out[s1], running_sums(XS[:3])[-1])
        np.testing.assert_array_equal(out[s3.id], 2 * running_sums(XS[:3])[-1])
        with pytest.raises(RnnServeError) as info:
            ms.step({s1: XS[0], "missing": {"x": XS[0]}})
        assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.session_id == "missing"
        out = ms.step({"missing": {"x": XS[0]}, s1: XS[0]}, return_exceptions=True)
        assert isinstance(out["missing"], RnnServeError) and isinstance(out[s1], np.ndarray)
        with pytest.raises(TypeError, match="input name"):
            ms.step({s1.id: XS[0]})  # a bare id says nothing about the model's inputs
    for session in sessions:
        session.close()


# -- asyncio ---------------------------------------------------------------------------------------------


def test_async_client_mirrors_the_sync_one(fake: tuple[FakeRnnServe, str]) -> None:
    servicer, address = fake

    async def main() -> None:
        async with AsyncClient(address, timeout=10) as c:
            assert [m.name for m in await c.list_models()] == ["acc", "pair"]
            assert (await c.model("pair")).version == 3
            with pytest.raises(RnnServeError) as info:
                await c.model("nope")
            assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.message == "model 'nope' not found"

            async with c.session("acc") as s:
                np.testing.assert_array_equal(await s.step(XS[0]), XS[0])
                ys = await s.step_chunk(XS[1:3])
                assert ys.shape == (2, 2) and s.steps == 3
                with pytest.raises(RnnServeError) as info:
                    await s.step(np.zeros(3, np.float32))
                assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
                snap = await s.snapshot()
                await s.reset()
                np.testing.assert_array_equal((await s.get_state())["h"], [0, 0])
                await s.restore(snap)
                assert s.steps == 3
                sid = s.id
            assert sid not in servicer.sessions

            s = await c.session("pair")  # awaitable too, closed by hand
            out = await s.step({"a": XS[0], "b": XS[1]})
            assert set(out) == {"sum", "diff"}
            await s.close()

            copy = await c.restore(snap)
            assert copy.steps == 3
            await copy.close()

    asyncio.run(main())


def test_async_stream_order_window_and_errors(fake: tuple[FakeRnnServe, str]) -> None:
    _, address = fake

    async def agen() -> Any:
        for x in XS:
            await asyncio.sleep(0)
            yield x

    async def main() -> None:
        async with AsyncClient(address) as c, c.session("acc") as s:
            ys = [y async for y in s.stream(agen())]  # an async iterable
            np.testing.assert_array_equal(np.stack(ys), np.stack(running_sums(XS)))
            await s.reset()

            last = np.ones(2, np.float32)

            def feedback() -> Iterator[np.ndarray]:
                for _ in range(5):
                    yield last

            async for y in s.stream(feedback(), window=1):  # a plain iterable, lock-step
                last = y
            np.testing.assert_array_equal(last, [16, 16])

            seen = []
            with pytest.raises(RnnServeError) as info:
                async for y in s.stream([XS[0], np.zeros(4, np.float32), XS[1]], window=1):
                    seen.append(y)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(seen) == 1

            async with contextlib.aclosing(s.stream(itertools.repeat(XS[0]))) as endless:
                async for _ in endless:
                    break
            await s.step(XS[0])  # the session is still usable

    asyncio.run(main())


def test_async_multi_stream(fake: tuple[FakeRnnServe, str]) -> None:
    _, address = fake

    async def main() -> None:
        async with AsyncClient(address) as c:
            s1, s2 = await c.open_session("acc"), await c.open_session("acc")
            async with c.multi_stream() as ms:
                out = await ms.step({s1: XS[0], s2: XS[1]})
                np.testing.assert_array_equal(out[s2], XS[1])
                out = await ms.step({s1: XS[0], "gone": {"x": XS[0]}}, return_exceptions=True)
                np.testing.assert_array_equal(out[s1], 2 * XS[0])
                assert out["gone"].code == grpc.StatusCode.NOT_FOUND
            assert s1.steps == 2 and s2.steps == 1
            await s1.close()
            await s2.close()

    asyncio.run(main())
