"""The KServe v2 / Triton gRPC API, driven by the real ``tritonclient[grpc]`` against a real server."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, TINY_OUTPUT, ServerHandle, build_tiny_repository, tiny_expected

tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from rnnserve.client import Client  # noqa: E402
from rnnserve.proto import kserve_grpc_service_pb2, kserve_model_config_pb2  # noqa: E402

T = 6


# ---- fixtures ------------------------------------------------------------------------------------------------
def _onnx_model(path: Path, nodes, inputs, outputs) -> None:
    import onnx
    from onnx import TensorProto, helper

    def vi(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, dims)

    types = {"int64": TensorProto.INT64, "bool": TensorProto.BOOL, "float16": TensorProto.FLOAT16}
    graph = helper.make_graph(
        nodes,
        path.parent.parent.name,
        [vi(n, types[t], d) for n, t, d in inputs],
        [vi(n, types[t], d) for n, t, d in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


def build_dtype_models(root: Path) -> None:
    """``counter``: int64 ``a`` and bool ``f`` in, a running int64 sum (state ``s``) and ``not f`` out.
    ``half``: a running float16 sum of ``v``. Both stateful, built straight with onnx.helper."""
    from onnx import helper

    from rnnserve.manifest import ModelManifest

    _onnx_model(
        root / "counter" / "1" / "model.onnx",
        [
            helper.make_node("Add", ["s", "a"], ["total"]),
            helper.make_node("Identity", ["total"], ["s_out"]),
            helper.make_node("Not", ["f"], ["neg"]),
        ],
        [("a", "int64", ["b", 2]), ("f", "bool", ["b", 1]), ("s", "int64", ["b", 2])],
        [("total", "int64", ["b", 2]), ("neg", "bool", ["b", 1]), ("s_out", "int64", ["b", 2])],
    )
    ModelManifest(
        name="counter",
        version=1,
        format="onnx",
        artifact="model.onnx",
        inputs=[{"name": "a", "dtype": "int64", "shape": [-1, 2]}, {"name": "f", "dtype": "bool", "shape": [-1, 1]}],
        outputs=[
            {"name": "total", "dtype": "int64", "shape": [-1, 2]},
            {"name": "neg", "dtype": "bool", "shape": [-1, 1]},
        ],
        states=[{"name": "s", "output": "s_out", "dtype": "int64", "shape": [-1, 2]}],
    ).write(root / "counter" / "1")
    _onnx_model(
        root / "half" / "1" / "model.onnx",
        [helper.make_node("Add", ["s", "v"], ["y"]), helper.make_node("Identity", ["y"], ["s_out"])],
        [("v", "float16", ["b", 2]), ("s", "float16", ["b", 2])],
        [("y", "float16", ["b", 2]), ("s_out", "float16", ["b", 2])],
    )
    ModelManifest(
        name="half",
        version=1,
        format="onnx",
        artifact="model.onnx",
        inputs=[{"name": "v", "dtype": "float16", "shape": [-1, 2]}],
        outputs=[{"name": "y", "dtype": "float16", "shape": [-1, 2]}],
        states=[{"name": "s", "output": "s_out", "dtype": "float16", "shape": [-1, 2]}],
    ).write(root / "half" / "1")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_tiny_repository(tmp_path_factory.mktemp("kserve-repo"))
    build_dtype_models(root)
    return root


@pytest.fixture
def server(server_factory, repository: Path) -> ServerHandle:
    return server_factory(repository)


@pytest.fixture
def triton(server: ServerHandle) -> Iterator:
    client = tritonclient.InferenceServerClient(server.address)
    yield client
    client.close()


def x_input(x: np.ndarray, name: str = "x", datatype: str = "FP32"):
    inp = tritonclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def inputs_for(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((T, TINY_INPUT)).astype(np.float32)


def assert_raises_status(status: str, fragment: str, fn, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    assert info.value.status() == f"StatusCode.{status}", info.value
    assert fragment in info.value.message(), info.value.message()
    return info.value


# ---- the proto matches Triton's, field for field -------------------------------------------------------------
def _fields(message) -> dict[str, tuple]:
    return {
        f.name: (f.number, f.type, f.is_repeated, f.message_type.name if f.message_type else None)
        for f in message.fields
    }


def _compare(ours, theirs) -> None:
    mine = _fields(ours)
    triton = _fields(theirs)
    for name, spec in mine.items():
        assert triton.get(name) == spec, f"{ours.full_name}.{name}: ours {spec}, Triton's {triton.get(name)}"
    for nested in ours.nested_types:
        if not nested.GetOptions().map_entry:
            _compare(nested, theirs.nested_types_by_name[nested.name])
    for enum in ours.enum_types:
        assert {v.name: v.number for v in enum.values}.items() <= {
            v.name: v.number for v in theirs.enum_types_by_name[enum.name].values
        }.items()


def test_proto_agrees_with_tritonclients_generated_code() -> None:
    from tritonclient.grpc import model_config_pb2

    for ours_file, theirs_file in (
        (kserve_grpc_service_pb2.DESCRIPTOR, service_pb2.DESCRIPTOR),
        (kserve_model_config_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR),
    ):
        for name, message in ours_file.message_types_by_name.items():
            _compare(message, theirs_file.message_types_by_name[name])
        for name, enum in ours_file.enum_types_by_name.items():
            theirs = {v.name: v.number for v in theirs_file.enum_types_by_name[name].values}
            assert {v.name: v.number for v in enum.values} == theirs
    triton_service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in kserve_grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        theirs = triton_service.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name, method.client_streaming) == (
            theirs.input_type.name,
            theirs.output_type.name,
            theirs.client_streaming,
        )


# ---- sequences -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["gru", "gru_ts"])
def test_sync_infer_int_and_string_sequences_interleaved_equal_eager(triton, model: str) -> None:
    rng = np.random.default_rng(1)
    seqs = {42: inputs_for(rng), "user-7": inputs_for(rng)}
    got: dict = {s: [] for s in seqs}
    for t in range(T):
        for seq, xs in seqs.items():
            result = triton.infer(
                model,
                [x_input(xs[t][None])],
                request_id=f"{seq}/{t}",
                sequence_id=seq,
                sequence_start=t == 0,
                sequence_end=t == T - 1,
            )
            assert result.get_response().id == f"{seq}/{t}"
            assert result.get_response().model_name == model
            y = result.as_numpy("y")
            assert y.shape == (1, TINY_OUTPUT) and y.dtype == np.float32
            got[seq].append(y[0])
    for seq, xs in seqs.items():
        np.testing.assert_allclose(np.stack(got[seq]), tiny_expected(xs)[0], rtol=1e-5, atol=1e-6)


def test_stream_many_sequences_interleaved_on_one_stream_equal_eager(triton) -> None:
    rng = np.random.default_rng(2)
    seqs = {1: inputs_for(rng), 2: inputs_for(rng), "a": inputs_for(rng), "b": inputs_for(rng)}
    responses: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: responses.put((result, error)))
    # Everything is sent before anything is read: the server has every sequence's steps in flight at once.
    for t in range(T):
        for seq, xs in seqs.items():
            triton.async_stream_infer(
                "gru",
                [x_input(xs[t][None])],
                request_id=f"{seq}/{t}",
                sequence_id=seq,
                sequence_start=t == 0,
                sequence_end=t == T - 1,
            )
    triton.stop_stream()  # waits for every response
    got: dict = {}
    while not responses.empty():
        result, error = responses.get_nowait()
        assert error is None, error
        got[result.get_response().id] = result.as_numpy("y")[0]
    assert len(got) == T * len(seqs)
    for seq, xs in seqs.items():
        ys = np.stack([got[f"{seq}/{t}"] for t in range(T)])
        np.testing.assert_allclose(ys, tiny_expected(xs)[0], rtol=1e-5, atol=1e-6)


def test_stream_error_is_answered_in_place_and_the_stream_goes_on(triton) -> None:
    x = np.ones((1, TINY_INPUT), np.float32)
    responses: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: responses.put((result, error)))
    triton.async_stream_infer("gru", [x_input(x)], request_id="no-start", sequence_id=5)
    triton.async_stream_infer("gru", [x_input(x)], request_id="ok", sequence_id=5, sequence_start=True)
    triton.async_stream_infer("nope", [x_input(x)], request_id="unknown", sequence_id=6, sequence_start=True)
    triton.async_stream_infer("gru", [x_input(x)], request_id="ok2", sequence_id=5, sequence_end=True)
    triton.stop_stream()
    answers = [responses.get_nowait() for _ in range(4)]
    assert responses.empty()
    (r0, e0), (r1, e1), (r2, e2), (r3, e3) = answers
    assert r0 is None and "must specify the START flag" in e0.message()
    assert e1 is None and r1.get_response().id == "ok"
    assert r2 is None and "'nope'" in e2.message()
    assert e3 is None and r3.get_response().id == "ok2"
    np.testing.assert_allclose(
        np.concatenate([r1.as_numpy("y"), r3.as_numpy("y")]), tiny_expected(np.ones((2, 3), np.float32))[0], rtol=1e-5
    )


def test_start_restarts_end_closes_and_a_step_without_start_is_refused(server: ServerHandle, triton) -> None:
    x = np.full((1, TINY_INPUT), 0.5, np.float32)
    first = tiny_expected(x)[0][0]
    assert_raises_status(
        "INVALID_ARGUMENT",
        "inference request for sequence 9 to model 'gru' must specify the START flag on the first request of the "
        "sequence",
        triton.infer,
        "gru",
        [x_input(x)],
        sequence_id=9,
    )
    triton.infer("gru", [x_input(x)], sequence_id=9, sequence_start=True)
    triton.infer("gru", [x_input(x)], sequence_id=9)
    # START on a live sequence begins it again from the initial state.
    again = triton.infer("gru", [x_input(x)], sequence_id=9, sequence_start=True).as_numpy("y")[0]
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)
    with Client(server.address) as native:
        assert native.stats().open_sessions == 1  # the restart closed the first session
        triton.infer("gru", [x_input(x)], sequence_id=9, sequence_end=True)
        assert native.stats().open_sessions == 0
    assert_raises_status("INVALID_ARGUMENT", "START flag", triton.infer, "gru", [x_input(x)], sequence_id=9)


def test_sequence_ids_are_per_model_and_apart_from_native_sessions(server: ServerHandle, triton) -> None:
    rng = np.random.default_rng(3)
    xa, xb = inputs_for(rng), inputs_for(rng)
    ya, yb = [], []
    for t in range(T):  # sequence 1 on two models: two sequences
        ya.append(triton.infer("gru", [x_input(xa[t][None])], sequence_id=1, sequence_start=t == 0).as_numpy("y"))
        yb.append(triton.infer("gru_ts", [x_input(xb[t][None])], sequence_id=1, sequence_start=t == 0).as_numpy("y"))
    np.testing.assert_allclose(np.concatenate(ya), tiny_expected(xa)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(yb), tiny_expected(xb)[0], rtol=1e-5, atol=1e-6)
    with Client(server.address) as native, native.session("gru") as session:
        # A native session's id is not a sequence id: it reaches nothing without START...
        assert_raises_status(
            "INVALID_ARGUMENT", "START flag", triton.infer, "gru", [x_input(xa[0][None])], sequence_id=session.id
        )
        # ...and a START under that id is a new sequence, leaving the native session as it was.
        triton.infer("gru", [x_input(xa[0][None])], sequence_id=session.id, sequence_start=True)
        np.testing.assert_allclose(session.step(xb[0]), tiny_expected(xb[:1])[0][0], rtol=1e-5, atol=1e-6)


def test_a_sequence_continues_from_another_connection_as_on_triton(server: ServerHandle, triton) -> None:
    xs = inputs_for(np.random.default_rng(7))
    # Separate channel options: a connection of its own (grpc would share one between identical channels).
    other = tritonclient.InferenceServerClient(server.address, channel_args=[("grpc.primary_user_agent", "other")])
    try:
        ys = [triton.infer("gru", [x_input(xs[0][None])], sequence_id="shared", sequence_start=True).as_numpy("y")]
        ys += [other.infer("gru", [x_input(x[None])], sequence_id="shared").as_numpy("y") for x in xs[1:]]
    finally:
        other.close()
    np.testing.assert_allclose(np.concatenate(ys), tiny_expected(xs)[0], rtol=1e-5, atol=1e-6)


def test_an_idle_sequence_expires_with_the_session_ttl(server_factory, repository: Path) -> None:
    server = server_factory(repository, session_ttl=0.2)
    client = tritonclient.InferenceServerClient(server.address)
    x = np.ones((1, TINY_INPUT), np.float32)
    try:
        client.infer("gru", [x_input(x)], sequence_id="idle", sequence_start=True)
        with Client(server.address) as native:
            deadline = time.monotonic() + 30
            while native.stats().expired_sessions == 0:
                assert time.monotonic() < deadline, "the sequence's session never expired"
                time.sleep(0.05)
        assert_raises_status("INVALID_ARGUMENT", "START flag", client.infer, "gru", [x_input(x)], sequence_id="idle")
        config = client.get_model_config("gru").config
        assert config.sequence_batching.max_sequence_idle_microseconds == 200_000
    finally:
        client.close()


# ---- without a sequence ----------------------------------------------------------------------------------------
def test_a_request_without_sequence_is_one_step_from_the_initial_state_and_may_batch(triton) -> None:
    xs = np.random.default_rng(4).standard_normal((3, TINY_INPUT)).astype(np.float32)
    y = triton.infer("gru_ts", [x_input(xs)]).as_numpy("y")
    expected = np.stack([tiny_expected(x[None])[0][0] for x in xs])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


# ---- datatypes -------------------------------------------------------------------------------------------------
def test_int64_and_bool_raw_with_requested_outputs(triton) -> None:
    a = np.array([[1, -2]], np.int64)
    f = np.array([[True]])
    outs = [tritonclient.InferRequestedOutput("neg")]
    r = triton.infer("counter", [x_input(a, "a", "INT64"), x_input(f, "f", "BOOL")], sequence_id=3, sequence_start=True)
    np.testing.assert_array_equal(r.as_numpy("total"), a)
    r = triton.infer("counter", [x_input(a * 10, "a", "INT64"), x_input(~f, "f", "BOOL")], sequence_id=3, outputs=outs)
    assert r.as_numpy("total") is None  # only what was asked for
    np.testing.assert_array_equal(r.as_numpy("neg"), f)
    r = triton.infer("counter", [x_input(a, "a", "INT64"), x_input(f, "f", "BOOL")], sequence_id=3, sequence_end=True)
    np.testing.assert_array_equal(r.as_numpy("total"), a * 12)


def test_typed_contents_with_tritonclients_own_messages(server: ServerHandle) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def step(a: list[int], f: bool, **params) -> service_pb2.ModelInferResponse:
        request = service_pb2.ModelInferRequest(model_name="counter", id="typed")
        request.parameters["sequence_id"].string_param = "typed-seq"
        for name, value in params.items():
            request.parameters[name].bool_param = value
        ta = request.inputs.add(name="a", datatype="INT64", shape=[1, 2])
        ta.contents.int64_contents.extend(a)
        tf = request.inputs.add(name="f", datatype="BOOL", shape=[1, 1])
        tf.contents.bool_contents.append(f)
        return stub.ModelInfer(request)

    try:
        step([2, 3], True, sequence_start=True)
        response = step([5, 7], False, sequence_end=True)
        assert response.id == "typed"
        totals = {
            o.name: (o.datatype, list(o.shape), raw)
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        assert totals["total"][:2] == ("INT64", [1, 2])
        np.testing.assert_array_equal(np.frombuffer(totals["total"][2], "<i8"), [7, 10])
        assert totals["neg"][:2] == ("BOOL", [1, 1]) and totals["neg"][2] == b"\x01"
        with pytest.raises(grpc.RpcError) as info:
            request = service_pb2.ModelInferRequest(model_name="counter")
            request.inputs.add(name="a", datatype="INT64", shape=[1, 2]).contents.int64_contents.append(1)
            request.inputs.add(name="f", datatype="BOOL", shape=[1, 1]).contents.bool_contents.append(True)
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs 2 values in contents.int64_contents, got 1" in info.value.details()
    finally:
        channel.close()


def test_fp16_sequence(triton) -> None:
    vs = np.random.default_rng(5).standard_normal((T, 1, 2)).astype(np.float16)
    total = np.zeros((1, 2), np.float16)
    for t, v in enumerate(vs):
        y = triton.infer("half", [x_input(v, "v", "FP16")], sequence_id=8, sequence_start=t == 0).as_numpy("y")
        total = total + v
        assert y.dtype == np.float16
        np.testing.assert_array_equal(y, total)


# ---- errors ----------------------------------------------------------------------------------------------------
ONE = np.ones((1, TINY_INPUT), np.float32)
SEQ = {"sequence_id": 1, "sequence_start": True}
ERRORS = [  # (model, input, datatype, infer keywords, status, message)
    ("nope", ONE, "FP32", {}, "NOT_FOUND", "'nope' not found"),
    (
        "gru",
        np.ones((1, 4), np.float32),
        "FP32",
        SEQ,
        "INVALID_ARGUMENT",
        "unexpected shape for input 'x' for model 'gru'. Expected [-1,3], got [1,4]",
    ),
    (
        "gru",
        ONE.astype(np.float64),
        "FP64",
        {},
        "INVALID_ARGUMENT",
        "data-type is 'FP64', but model 'gru' expects 'FP32'",
    ),
    ("gru", np.ones((2, 3), np.float32), "FP32", SEQ, "INVALID_ARGUMENT", "needs batch dimension 1, got [2,3]"),
    ("gru", ONE * np.nan, "FP32", SEQ, "INVALID_ARGUMENT", "NaN or Inf"),
]


@pytest.mark.parametrize(("model", "x", "datatype", "kwargs", "status", "message"), ERRORS)
def test_errors_arrive_as_inference_server_exceptions(triton, model, x, datatype, kwargs, status, message) -> None:
    assert_raises_status(status, message, triton.infer, model, [x_input(x, datatype=datatype)], **kwargs)
    # A refused request opened no sequence.
    assert_raises_status("INVALID_ARGUMENT", "START flag", triton.infer, "gru", [x_input(ONE)], sequence_id=1)


def test_unknown_requested_output(triton) -> None:
    outputs = [tritonclient.InferRequestedOutput("z")]
    assert_raises_status(
        "INVALID_ARGUMENT", "unexpected inference output 'z'", triton.infer, "gru", [x_input(ONE)], outputs=outputs
    )


# ---- metadata, readiness, config, statistics, repository -------------------------------------------------------
def test_health_and_metadata(triton) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("gru") and triton.is_model_ready("gru_ts", "1")
    assert not triton.is_model_ready("nope")
    server = triton.get_server_metadata()
    assert server.name == "rnnserve" and "sequence" in server.extensions
    meta = triton.get_model_metadata("gru", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "2"]}]
    assert_raises_status("NOT_FOUND", "'nope' not found", triton.get_model_metadata, "nope")


@pytest.mark.parametrize(("model", "platform"), [("gru", "onnxruntime_onnx"), ("gru_ts", "pytorch_libtorch")])
def test_model_config(triton, model: str, platform: str) -> None:
    config = triton.get_model_config(model).config
    assert (config.name, config.platform, config.max_batch_size) == (model, platform, 256)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", 11, [3])]  # 11: TYPE_FP32
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [2])]
    assert config.HasField("sequence_batching")
    assert [(s.input_name, s.output_name, list(s.dims)) for s in config.sequence_batching.state] == [
        ("h", "h_out", [1, 5])
    ]


def test_statistics_count_the_batchers_steps(triton) -> None:
    x = np.ones((1, TINY_INPUT), np.float32)
    for t in range(3):
        triton.infer("gru", [x_input(x)], sequence_id=1, sequence_start=t == 0)
    stats = triton.get_inference_statistics("gru").model_stats
    assert [(s.name, s.version, s.inference_count) for s in stats] == [("gru", "1", 3)]
    assert 1 <= stats[0].execution_count <= 3
    assert stats[0].inference_stats.success.count == 3
    everything = triton.get_inference_statistics().model_stats
    assert {s.name for s in everything} == {"gru", "gru_ts", "counter", "half"}


def test_repository_index_load_and_unload(triton) -> None:
    index = {(m.name, m.version): m.state for m in triton.get_model_repository_index().models}
    assert index == {(n, "1"): "READY" for n in ("gru", "gru_ts", "counter", "half")}
    triton.unload_model("gru_ts")
    assert not triton.is_model_ready("gru_ts")
    index = {m.name: (m.state, m.reason) for m in triton.get_model_repository_index().models}
    assert index["gru_ts"] == ("UNAVAILABLE", "unloaded")
    triton.load_model("gru_ts")
    assert triton.is_model_ready("gru_ts")
    assert_raises_status("NOT_FOUND", "", triton.load_model, "nope")
    # An open sequence keeps its model loaded: unload is refused, not forced.
    triton.infer("gru", [x_input(np.ones((1, 3), np.float32))], sequence_id=2, sequence_start=True)
    assert_raises_status("FAILED_PRECONDITION", "open session", triton.unload_model, "gru")


# ---- one port, both APIs ---------------------------------------------------------------------------------------
def test_native_api_and_reflection_on_the_same_port(server: ServerHandle, triton) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    xs = inputs_for(np.random.default_rng(6))
    with Client(server.address) as native, native.session("gru") as session:
        ys = [session.step(x) for x in xs[:3]]
        triton.infer("gru", [x_input(xs[0][None])], sequence_id=1, sequence_start=True)
        ys += [session.step(x) for x in xs[3:]]
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], rtol=1e-5, atol=1e-6)
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "rnnserve.v1.RnnServe"} <= names


def test_a_malformed_request_gets_invalid_argument(server: ServerHandle) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
