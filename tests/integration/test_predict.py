"""Whole-sequence Predict against a real server: the notebook's bidirectional LSTM classifier (exported to ONNX
and TorchScript) equals the eager model with pack_padded_sequence, and step models run each sequence's steps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import TINY_HIDDEN, TINY_INPUT, ServerHandle, build_tiny_repository, tiny_expected

from rnnserve.client import AsyncClient, Client, PredictResult, RnnServeError
from rnnserve.examples import EXAMPLES, SEQUENCE_EXAMPLES
from rnnserve.export import export
from rnnserve.export.sequence import random_batch

SEQUENCE_MODELS = ["bilstm", "bilstm_ts"]
# Under every batch size used below, so each Predict is split into several model calls.
MAX_BATCH = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    repo = build_tiny_repository(tmp_path_factory.mktemp("predict-repo"))  # gru (ONNX), gru_ts (TorchScript)
    bilstm = SEQUENCE_EXAMPLES["bilstm_classifier"]()
    export(bilstm, name="bilstm", repository=repo, format="onnx", progress=False)
    export(bilstm, name="bilstm_ts", repository=repo, format="torchscript", progress=False)
    export(EXAMPLES["gru2"](), name="gru2", repository=repo, format="onnx", steps=5, progress=False)
    handle = ServerHandle(repo, max_batch_size=MAX_BATCH)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[Client]:
    with Client(server.address, timeout=60) as c:
        yield c


def eager_bilstm(tokens: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    model = SEQUENCE_EXAMPLES["bilstm_classifier"]().model  # the notebook model, pack_padded_sequence and all
    with torch.no_grad():
        return model(tokens, lengths).numpy()


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_bilstm_predict_equals_eager_model(client: Client, name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    # Max lengths 1 and 40 are far from the T traced at export (6): the artifact loops over any T.
    for batch, max_length in [(1, 1), (2, 3), (5, 9), (8, 40)]:
        tokens, lengths = random_batch(batch, max_length, 100, generator)  # unsorted, holds 1 and max_length
        result = client.predict(name, tokens.numpy(), lengths.numpy())
        assert isinstance(result, PredictResult) and result.final_state == {}
        assert result.outputs.shape == (batch, 1)
        assert np.abs(result.outputs - eager_bilstm(tokens, lengths)).max() <= 1e-5


def test_sequence_model_description_and_refused_sessions(client: Client) -> None:
    info = client.model("bilstm")
    assert info.kind == "sequence"
    # The lengths travel in their own field, so a bare token array names the only input.
    assert [(t.name, t.dtype) for t in info.inputs] == [("tokens", "int64")]
    with pytest.raises(RnnServeError) as err:
        client.open_session("bilstm")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.message == "model bilstm:1 takes whole sequences: use Predict"


def _tiny_inputs(seed: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((len(lengths), max(lengths), TINY_INPUT)).astype(np.float32)
    return xs, np.array(lengths)


@pytest.mark.parametrize("name", ["gru", "gru_ts"])
def test_step_model_runs_each_sequence_from_its_initial_state(client: Client, name: str) -> None:
    lengths = [6, 1, 3, 6, 4]
    xs, lens = _tiny_inputs(0, lengths)
    h0 = np.random.default_rng(1).standard_normal((len(lengths), 1, TINY_HIDDEN)).astype(np.float32)
    for initial in (None, h0):
        result = client.predict(name, xs, lens, initial_state=None if initial is None else {"h": initial})
        assert result.outputs.shape == (len(lengths), 6, 2) and result.final_state["h"].shape == (len(lengths), 1, 5)
        for b, n in enumerate(lengths):
            want_y, want_h = tiny_expected(xs[b, :n], None if initial is None else initial[b])
            assert np.abs(result.outputs[b, :n] - want_y).max() <= 1e-5
            assert not result.outputs[b, n:].any()  # zeros past the length
            assert np.abs(result.final_state["h"][b, 0] - want_h).max() <= 1e-5


def test_step_example_matches_its_eager_reference(client: Client) -> None:
    ex = EXAMPLES["gru2"]()
    lengths = [2, 7, 1, 5]
    xs = torch.randn(len(lengths), 7, 16, generator=torch.Generator().manual_seed(2))
    result = client.predict("gru2", xs.numpy(), lengths)
    for b, n in enumerate(lengths):
        ref = ex.reference(xs[b : b + 1, :n])
        assert np.abs(result.outputs[b, :n] - ref.outputs[0].detach().numpy()).max() <= 1e-5
        assert not result.outputs[b, n:].any()
        # gru2's state h is (layers, batch, hidden); the result stacks it per sequence: (batch, layers, hidden).
        assert np.abs(result.final_state["h"][b] - ref.states[0][:, 0].detach().numpy()).max() <= 1e-5


@pytest.fixture(scope="module")
def vendor_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The model-config tests' hand-written ONNX graph: a per-session parameter (with a default), a constant,
    a file initial state with its batch on axis 1; at a dynamic batch and at a batch fixed at 1."""
    from test_model_config import H0, vendor_config, vendor_onnx, write_model

    root = tmp_path_factory.mktemp("vendor-predict")
    for name, batch in (("vendor", "batch"), ("vendor_b1", 1)):
        files = {"vendor.onnx": lambda p, b=batch: vendor_onnx(p, b), "h0.npy": lambda p: np.save(p, H0)}
        write_model(root, vendor_config(name, fixed=batch == 1), files)
    handle = ServerHandle(root)
    yield handle.address
    handle.stop()


@pytest.mark.parametrize("name", ["vendor", "vendor_b1"])
def test_step_model_with_parameters_constants_and_a_file_initial_state(vendor_address: str, name: str) -> None:
    from test_model_config import H0, vendor_step

    rng = np.random.default_rng(5)
    lengths = [3, 1, 4]
    xs = rng.standard_normal((3, 4, 4)).astype(np.float32)
    speakers = rng.standard_normal((3, 2)).astype(np.float32)
    with Client(vendor_address, timeout=60) as client:
        given = client.predict(name, xs, lengths, parameters={"speaker": speakers})
        default = client.predict(name, xs, lengths)  # the parameter's default, [0.5, -0.5]
    for result, per_sequence in ((given, speakers), (default, np.array([[0.5, -0.5]] * 3, np.float32))):
        for b, n in enumerate(lengths):
            h = H0
            for t in range(n):
                y, h = vendor_step(xs[b, t], h, per_sequence[b])
                assert np.abs(result.outputs[b, t] - y).max() <= 1e-5
            assert not result.outputs[b, n:].any()
            assert np.abs(result.final_state["hidden_state"][b] - h).max() <= 1e-5


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(RnnServeError) as err:
        call()
    return err.value.code, err.value.message


def test_refused_requests(client: Client) -> None:
    tokens, lengths = random_batch(4, 5, 100, torch.Generator().manual_seed(0))
    tok, lens = tokens.numpy(), lengths.numpy()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    code, message = _status(lambda: client.predict("bilstm", tok.astype(np.float32), lens))
    assert code == invalid and "'tokens'" in message and "int64" in message
    code, message = _status(lambda: client.predict("bilstm", tok, np.array([5, 6, 1, 2])))
    assert code == invalid and "lengths[1] = 6" in message and "[1, 5]" in message
    code, message = _status(lambda: client.predict("bilstm", tok, np.array([5, 0, 1, 2])))
    assert code == invalid and "lengths[1] = 0" in message
    code, message = _status(lambda: client.predict("bilstm", tok, lens[:3]))
    assert code == invalid and "'tokens'" in message and "[3, *]" in message
    code, message = _status(lambda: client.predict("bilstm", tok, lens, outputs=["nope"]))
    assert code == invalid and "nope" in message
    code, message = _status(lambda: client.predict("bilstm", tok, lens, initial_state={"h": np.zeros(3)}))
    assert code == invalid and "no state" in message
    xs, tiny_lens = _tiny_inputs(0, [2, 3])
    code, message = _status(lambda: client.predict("gru", xs[:, :, :2], tiny_lens))
    assert code == invalid and "'x'" in message and "[batch, time" in message
    code, message = _status(lambda: client.predict("gru", xs, tiny_lens, initial_state={"h": np.zeros((3, 1, 5))}))
    assert code == invalid and "'h'" in message
    code, message = _status(lambda: client.predict("nope", tok, lens))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in message


def test_predict_without_lengths_is_refused(server: ServerHandle) -> None:
    from rnnserve.proto import rnnserve_pb2 as pb
    from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
    from rnnserve.tensors import to_proto

    with grpc.insecure_channel(server.address) as channel:
        request = pb.PredictRequest(model="bilstm")
        to_proto(np.ones((2, 3), np.int64), request.inputs["tokens"])
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RnnServeStub(channel).Predict(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lengths" in err.value.details()


def test_async_client_predict(server: ServerHandle) -> None:
    tokens, lengths = random_batch(5, 11, 100, torch.Generator().manual_seed(4))
    xs, lens = _tiny_inputs(3, [4, 2, 4])

    async def main() -> tuple[PredictResult, PredictResult]:
        async with AsyncClient(server.address, timeout=60) as c:
            return await asyncio.gather(
                c.predict("bilstm_ts", tokens.numpy(), lengths), c.predict("gru", {"x": xs}, lens)
            )

    seq, steps = asyncio.run(main())
    assert np.abs(seq.outputs - eager_bilstm(tokens, lengths)).max() <= 1e-5
    want_y, want_h = tiny_expected(xs[1, :2])
    assert np.abs(steps.outputs[1, :2] - want_y).max() <= 1e-5 and not steps.outputs[1, 2:].any()
    assert np.abs(steps.final_state["h"][1, 0] - want_h).max() <= 1e-5


def test_server_repository_layout(server: ServerHandle) -> None:
    # Guards the fixture: the sequence models were written with their kind and lengths input.
    from rnnserve.manifest import ModelManifest

    manifest = ModelManifest.read(Path(server.settings.repository) / "bilstm" / "1")
    assert manifest.kind == "sequence" and manifest.lengths_input == "lengths"
