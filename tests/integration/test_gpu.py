"""The CUDA path: state slab on the GPU, IOBinding (ONNX) and CUDA tensors (TorchScript). Skipped without a
CUDA device; run on a GPU machine with `pytest tests/integration/test_gpu.py` (onnxruntime-gpu and a CUDA torch)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_INPUT, tiny_expected

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from rnnserve.client import Client  # noqa: E402
from rnnserve.server.models.slab import DeviceStateSlab  # noqa: E402


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["gru", "gru_ts"])
def test_cuda_sessions_equal_eager_and_state_stays_on_device(server_factory, tiny_repository, model):
    if model == "gru":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    server = server_factory(tiny_repository, device="cuda", max_queue_delay_us=2000)
    loaded = server.server.repository.get(model)
    assert isinstance(loaded.slab, DeviceStateSlab)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((30, TINY_INPUT)).astype(np.float32) for _ in range(8)]
    with Client(server.address) as client:
        sessions = [client.open_session(model) for _ in inputs]
        outputs = [[] for _ in inputs]
        for t in range(30):
            with client.multi_stream() as ms:
                results = ms.step({s: {"x": xs[t]} for s, xs in zip(sessions, inputs, strict=True)})
            for i, s in enumerate(sessions):
                outputs[i].append(results[s])
        for i, s in enumerate(sessions):
            expected, h = tiny_expected(inputs[i])
            assert np.abs(np.stack(outputs[i]) - expected).max() <= 1e-5
            assert np.abs(s.get_state()["h"][0] - h).max() <= 1e-5
        assert client.stats(model).models[0].steps == 30 * len(inputs)


@pytest.mark.gpu
def test_cuda_onnx_feeds_parameters_and_constants(server_factory, tmp_path):
    """A vendor graph with a per-session parameter (a slab column, on the device) and a constant (a host
    array): both are bound on the CUDA path, and sessions stream as the graph's math says."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    from test_model_config import H0, vendor_config, vendor_onnx, vendor_step, write_model

    files = {"vendor.onnx": lambda p: vendor_onnx(p, "batch"), "h0.npy": lambda p: np.save(p, H0)}
    write_model(tmp_path, vendor_config("vendor", False), files)
    server = server_factory(tmp_path, device="cuda", max_queue_delay_us=2000)
    assert isinstance(server.server.repository.get("vendor").slab, DeviceStateSlab)
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((3, 12, 4)).astype(np.float32)
    speakers = [np.array([1.0, 2.0], np.float32), np.array([-1.0, 0.0], np.float32), np.array([0.5, -0.5], np.float32)]
    with Client(server.address) as client:
        sessions = [client.open_session("vendor", parameters={"speaker": sp}) for sp in speakers]
        with client.multi_stream() as ms:
            outputs = [ms.step({s: xs[i, t] for i, s in enumerate(sessions)}) for t in range(xs.shape[1])]
    for i, s in enumerate(sessions):
        h = H0.copy()
        for t in range(xs.shape[1]):
            y, h = vendor_step(xs[i, t], h, speakers[i])
            assert np.abs(outputs[t][s] - y).max() <= 1e-5
