"""Models exported elsewhere, served from a hand-written config: renamed tensors, state batch axis 1, a scalar
constant input, a per-session parameter, outputs in another order, a batch fixed at 1, a TorchScript module
with a tuple state. Streaming through the server must equal calling the model directly, step by step."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from rnnserve.client import Client, RnnServeError

RNG = np.random.default_rng(42)
W = RNG.standard_normal((4, 5)).astype(np.float32)
U = RNG.standard_normal((5, 5)).astype(np.float32) * 0.5
S = RNG.standard_normal((2, 5)).astype(np.float32)
V = RNG.standard_normal((5, 3)).astype(np.float32)
H0 = np.linspace(-0.5, 0.5, 5, dtype=np.float32).reshape(1, 5)
SAMPLE_RATE = 8000


def vendor_step(x: np.ndarray, h: np.ndarray, speaker: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vendor graph's math for one session: x (4,), h (1, 5), speaker (2,)."""
    pre = h @ U + x @ W + (speaker @ S) * (SAMPLE_RATE / 16000.0)
    h2 = np.tanh(pre)
    return (h2 @ V)[0], h2


def vendor_onnx(path: Path, batch: int | str) -> None:
    """A graph as a vendor might ship it: its own tensor names, the state's batch on axis 1, a scalar int64
    sample-rate input, and the next state listed before the data output."""
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("audio_in", f32, [batch, 4]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        helper.make_tensor_value_info("speaker", f32, [batch, 2]),
        helper.make_tensor_value_info("hidden_state", f32, [1, batch, 5]),
    ]
    outputs = [
        helper.make_tensor_value_info("next_hidden", f32, [1, batch, 5]),
        helper.make_tensor_value_info("logits", f32, [batch, 3]),
    ]
    inits = [
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(U, "U"),
        numpy_helper.from_array(S, "S"),
        numpy_helper.from_array(V, "V"),
        numpy_helper.from_array(np.array(16000.0, np.float32), "full_rate"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["audio_in", "W"], ["xw"]),
        helper.make_node("MatMul", ["hidden_state", "U"], ["hu"]),
        helper.make_node("MatMul", ["speaker", "S"], ["sw"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=f32),
        helper.make_node("Div", ["srf", "full_rate"], ["scale"]),
        helper.make_node("Mul", ["sw", "scale"], ["sws"]),
        helper.make_node("Add", ["hu", "xw"], ["a1"]),
        helper.make_node("Add", ["a1", "sws"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["next_hidden"]),
        helper.make_node("MatMul", ["next_hidden", "V"], ["l3"]),
        helper.make_node("Squeeze", ["l3", "axis0"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "vendor_rnn", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def vendor_config(name: str, fixed: bool) -> dict:
    b = 1 if fixed else -1
    return {
        "name": name,
        "version": 1,
        "format": "onnx",
        "artifact": "vendor.onnx",
        "inputs": [{"name": "audio_in", "dtype": "float32", "shape": [b, 4]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [b, 3]}],
        "states": [
            {
                "name": "hidden_state",
                "output": "next_hidden",
                "shape": [1, b, 5],
                "batch_axis": 1,
                "initial": {"kind": "file", "path": "h0.npy"},
            }
        ],
        "parameters": [{"name": "speaker", "shape": [b, 2], "default": [0.5, -0.5]}],
        "constants": [{"name": "sr", "dtype": "int64", "shape": [], "value": SAMPLE_RATE}],
        "max_batch_size": 1 if fixed else 64,
        "max_queue_delay_us": 2000,
    }


class TupleStateCell(torch.nn.Module):
    """A TorchScript module whose state is a tuple: forward(x, (h, c)) -> (y, (h, c))."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.cell = torch.nn.LSTMCell(4, 6)
        self.out = torch.nn.Linear(6, 2)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, c = self.cell(x, state)
        return self.out(h), (h, c)


def write_model(root: Path, config: dict, files: dict) -> Path:
    folder = root / config["name"] / str(config["version"])
    folder.mkdir(parents=True)
    for name, make in files.items():
        make(folder / name)
    (folder / "manifest.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vendor-repo")
    for name, fixed in (("vendor", False), ("vendor_b1", True)):
        write_model(
            root,
            vendor_config(name, fixed),
            {
                "vendor.onnx": lambda p, fixed=fixed: vendor_onnx(p, 1 if fixed else "batch"),
                "h0.npy": lambda p: np.save(p, H0),
            },
        )
    ts_config = {
        "name": "tuple_state",
        "version": 1,
        "format": "torchscript",
        "artifact": "cell.pt",
        "inputs": [{"name": "x", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "shape": [-1, 2]}],
        "states": [
            {"name": "h", "output": "h_next", "shape": [-1, 6]},
            {"name": "c", "output": "c_next", "shape": [-1, 6], "initial": {"kind": "constant", "value": 0.1}},
        ],
        "torchscript": {"inputs": ["x", ["h", "c"]], "outputs": ["y", ["h_next", "c_next"]]},
    }
    write_model(root, ts_config, {"cell.pt": lambda p: torch.jit.script(TupleStateCell().eval()).save(str(p))})
    return root


def test_models_command_lists_parameters_and_constants(address: str, capsys: pytest.CaptureFixture[str]):
    from rnnserve.cli import main

    assert main(["models", "--address", address, "--name", "vendor"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("vendor:1  READY  onnx")
    assert "  parameters: speaker: float32[2]" in listing and "  constants:  sr: int64[]" in listing


@pytest.mark.parametrize("model", ["vendor", "vendor_b1"])
def test_vendor_onnx_streams_like_the_graph(address: str, model: str):
    xs = RNG.standard_normal((4, 20, 4)).astype(np.float32)
    speakers = [None, np.array([1.0, 2.0], np.float32), np.array([-1.0, 0.0], np.float32), None]
    with Client(address) as client:
        info = client.model(model)
        assert [p.name for p in info.parameters] == ["speaker"] and [c.name for c in info.constants] == ["sr"]
        sessions = [client.open_session(model, parameters=None if sp is None else {"speaker": sp}) for sp in speakers]
        outputs = [[] for _ in sessions]
        with client.multi_stream() as ms:
            for t in range(xs.shape[1]):  # every session's step t in one message: they batch (unless fixed at 1)
                results = ms.step({s: xs[i, t] for i, s in enumerate(sessions)})
                for i, s in enumerate(sessions):
                    outputs[i].append(results[s])
        for i, s in enumerate(sessions):
            speaker = speakers[i] if speakers[i] is not None else np.array([0.5, -0.5], np.float32)
            h = H0.copy()
            for t in range(xs.shape[1]):
                y, h = vendor_step(xs[i, t], h, speaker)
                assert np.abs(outputs[i][t] - y).max() <= 1e-5
            assert np.abs(s.get_state()["hidden_state"] - h).max() <= 1e-5
        stats = client.stats(model).models[0]
    if model == "vendor_b1":
        assert stats.max_batch == 1  # a batch fixed at 1: one session per call
    else:
        assert stats.max_batch > 1


def test_parameters_travel_in_snapshots(address: str):
    xs = RNG.standard_normal((10, 4)).astype(np.float32)
    speaker = np.array([2.0, -3.0], np.float32)
    with Client(address) as client:
        s = client.open_session("vendor", parameters={"speaker": speaker})
        for x in xs[:5]:
            s.step(x)
        restored = client.restore(s.snapshot())
        a = np.stack([s.step(x) for x in xs[5:]])
        b = np.stack([restored.step(x) for x in xs[5:]])
    assert np.array_equal(a, b)


def test_tuple_state_torchscript(address: str):
    module = TupleStateCell().eval()
    xs = RNG.standard_normal((15, 4)).astype(np.float32)
    with Client(address) as client, client.session("tuple_state") as s:
        assert np.allclose(s.get_state()["c"], 0.1)
        ys = np.stack(list(s.stream(xs)))
        final = s.get_state()
    h, c = torch.zeros(1, 6), torch.full((1, 6), 0.1)
    with torch.no_grad():
        for t, x in enumerate(xs):
            y, (h, c) = module(torch.from_numpy(x)[None], (h, c))
            assert np.abs(ys[t] - y[0].numpy()).max() <= 1e-5
    assert np.abs(final["h"] - h[0].numpy()).max() <= 1e-5 and np.abs(final["c"] - c[0].numpy()).max() <= 1e-5


def test_parameter_errors(address: str):
    with Client(address) as client:
        cases = [
            ({"speaker": np.zeros(3, np.float32)}, "parameter 'speaker' of model vendor:1: expected shape [2]"),
            ({"speed": np.zeros(2, np.float32)}, "no parameter named ['speed']"),
        ]
        for params, needle in cases:
            with pytest.raises(RnnServeError) as info:
                client.open_session("vendor", parameters=params)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.message
    # The client casts same-kind dtypes; the server itself refuses any other dtype.
    from rnnserve.proto import rnnserve_pb2 as pb
    from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
    from rnnserve.tensors import to_proto

    with grpc.insecure_channel(address) as channel:
        request = pb.OpenSessionRequest(model="vendor", parameters={"speaker": to_proto(np.zeros(2, np.int64))})
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RnnServeStub(channel).OpenSession(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parameter 'speaker' of model vendor:1: expected dtype float32, got int64" in err.value.details()


def test_required_parameter(tmp_path: Path, server_factory):
    config = vendor_config("needs_speaker", fixed=False)
    del config["parameters"][0]["default"]
    write_model(
        tmp_path, config, {"vendor.onnx": lambda p: vendor_onnx(p, "batch"), "h0.npy": lambda p: np.save(p, H0)}
    )
    server = server_factory(tmp_path)
    with Client(server.address) as client:
        with pytest.raises(RnnServeError) as info:
            client.open_session("needs_speaker")
        assert "needs parameter 'speaker' (float32[2]) at session open" in info.value.message
        s = client.open_session("needs_speaker", parameters={"speaker": np.ones(2, np.float32)})
        y = s.step(np.zeros(4, np.float32))
    assert np.abs(y - vendor_step(np.zeros(4, np.float32), H0, np.ones(2, np.float32))[0]).max() <= 1e-5


BROKEN = {
    "output shape disagrees with the graph": (
        lambda c: c["outputs"][0].update(shape=[-1, 4]),
        "output 'logits' at batch 1 is float32[1, 3], the manifest says float32[1, 4]",
    ),
    "state shape disagrees with the graph": (
        lambda c: c["states"][0].update(shape=[1, -1, 6], initial={"kind": "zeros"}),
        "calling the model at batch 1 failed",
    ),
    "a typo in a field": (lambda c: c["states"][0].update(batch_axs=1), "states.0.batch_axs: Extra inputs"),
    "batch axis outside the shape": (lambda c: c["states"][0].update(batch_axis=5), "batch_axis 5 is outside shape"),
    "a graph input the config does not name": (
        lambda c: c["constants"].clear(),
        "Required inputs (['sr']) are missing",
    ),
    "a constant without a value": (lambda c: c["constants"][0].pop("value"), "give exactly one of value or file"),
    "initial file missing": (lambda c: c["states"][0]["initial"].update(path="nope.npy"), "nope.npy"),
    "initial file of the wrong shape": (
        lambda c: c["states"][0].update(shape=[1, -1, 6]),
        "h0.npy has shape [1, 5], expected [1, 6]",
    ),
    "initial file outside the folder": (
        lambda c: c["states"][0]["initial"].update(path="../../escape.npy"),
        "outside the model folder",
    ),
}


def test_bad_configs_fail_alone_with_a_message_naming_the_problem(tmp_path: Path, server_factory):
    for i, (_, (mutate, _)) in enumerate(BROKEN.items()):
        config = vendor_config(f"broken{i}", fixed=False)
        mutate(config)
        write_model(
            tmp_path, config, {"vendor.onnx": lambda p: vendor_onnx(p, "batch"), "h0.npy": lambda p: np.save(p, H0)}
        )
    write_model(
        tmp_path,
        vendor_config("good", fixed=False),
        {"vendor.onnx": lambda p: vendor_onnx(p, "batch"), "h0.npy": lambda p: np.save(p, H0)},
    )
    server = server_factory(tmp_path)
    with Client(server.address) as client:
        models = {m.name: m for m in client.list_models()}
        for i, (case, (_, needle)) in enumerate(BROKEN.items()):
            info = models[f"broken{i}"]
            assert info.state == "FAILED" and needle in info.error, (case, info.error)
        assert models["good"].state == "READY"
        with client.session("good") as s:
            assert s.step(np.zeros(4, np.float32)).shape == (3,)
