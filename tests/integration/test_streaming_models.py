"""Streaming models as their authors ship them (tests/streaming_models.py), served from hand-written manifests:
context windows the server keeps per session, per-session scalar settings, free lengths and ONNX's own
time-major bidirectional LSTM. Every result is compared with the artifact called directly, the context window
kept by hand (``HandContext``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from streaming_models import (
    BILSTM_BATCH_MAJOR,
    BILSTM_CONFIG,
    CHUNK,
    CONTEXT,
    FEATURES,
    HandContext,
    build_bilstm_onnx,
    build_padded_onnx,
    padded_reference,
    write_vad,
)

from rnnserve.client import AsyncClient, Client, RnnServeError
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.tensors import from_proto, to_proto

TOL = 1e-6


def chunks(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, CHUNK)).astype(np.float32)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, value in want.items():
        assert np.abs(np.asarray(got[name]) - value).max() <= TOL, name


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("streaming")
    write_vad(root, "vad")
    write_vad(root, "vad_ts", "torchscript")
    write_vad(root, "vad_every", durability={"mode": "every-step"})
    return root


@pytest.fixture(scope="module")
def server(repository: Path):
    from conftest import ServerHandle

    handle = ServerHandle(repository)
    yield handle
    handle.stop()


def batch_sizes(server, name: str) -> dict[int, int]:
    """How many batches of each size the model ran (its batcher's own count)."""
    model = server.server.repository.models[(name, 1)]
    return {size: counts[0] for size, counts in model.batcher.stats.sizes.items()}


# ---- context windows ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["vad", "vad_ts", "vad_every"])
def test_a_session_streams_raw_chunks_as_the_model_with_its_context_kept_by_hand(server, repository, model):
    xs = chunks(1, 16)
    hand = HandContext(repository / model / "1")
    with Client(server.address) as client, client.session(model) as s:
        info = {st.name: st for st in s.model.states}
        assert list(info) == ["h", "x"] and info["x"].shape == (CONTEXT,)  # the window is session state
        for x in xs[:4]:
            assert_same(s.step(x), hand.step(x))
        # A chunk of 4 steps: each advances the window.
        got = s.step_chunk(xs[4:8])
        for t in range(4):
            assert_same({k: v[t] for k, v in got.items()}, hand.step(xs[4 + t]))
        state = s.get_state()
        np.testing.assert_array_equal(state["x"], hand.window[0])
        np.testing.assert_array_equal(state["h"], hand.h[0])
        # A snapshot carries the window: a session restored from it goes on exactly as this one.
        snapshot = s.snapshot()
        with client.restore(snapshot) as copy:
            twin = HandContext(repository / model / "1")
            twin.window, twin.h = hand.window.copy(), hand.h.copy()
            assert_same(copy.step(xs[8]), twin.step(xs[8]))
        # SetState sets the window like any state.
        window = xs[9, :CONTEXT]
        s.set_state({"x": window})
        hand.window = window[None].copy()
        assert_same(s.step(xs[10]), hand.step(xs[10]))
        # Reset: zeros again.
        s.reset()
        hand.reset()
        for x in xs[11:14]:
            assert_same(s.step(x), hand.step(x))
        # The session's own snapshot put back into it (SetState with a snapshot).
        s.restore(snapshot)
        hand.window, hand.h = np.asarray([state["x"]]), np.asarray([state["h"]])
        assert_same(s.step(xs[14]), hand.step(xs[14]))


def test_step_batch_predict_and_exactly_once_keep_the_window(server, repository):
    folder = repository / "vad" / "1"
    xs = np.stack([chunks(seed, 5) for seed in (2, 3, 4)])  # (sessions, T, 512)
    hands = [HandContext(folder) for _ in range(3)]
    with Client(server.address) as client:
        sessions = [client.open_session("vad") for _ in range(3)]
        with client.multi_stream() as multi:
            for t in range(5):
                result = multi.step_batch(sessions, xs[:, t])
                for i, hand in enumerate(hands):
                    assert_same({k: v[i] for k, v in result.outputs.items()}, hand.step(xs[i, t]))
        # Predict runs each sequence's steps from the initial state, window included, as a session would.
        lengths = np.array([5, 3, 4])
        predicted = client.predict("vad", xs, lengths)
        for i, n in enumerate(lengths):
            hand = HandContext(folder)
            for t in range(n):
                assert_same({k: v[i, t] for k, v in predicted.outputs.items()}, hand.step(xs[i, t]))
            np.testing.assert_array_equal(predicted.final_state["x"][i], hand.window[0])
        for s in sessions:
            s.close()
    # A retried step (same step_index) is answered from the replay cache: the window advances once.
    hand = HandContext(folder)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sid = stub.OpenSession(pb.OpenSessionRequest(model="vad")).session_id
        for t in range(3):
            request = pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs[0, t])}, step_index=t + 1)
            first = from_proto(stub.Step(request).outputs["frames"])
            again = from_proto(stub.Step(request).outputs["frames"])
            np.testing.assert_array_equal(first, again)
            assert np.abs(first - hand.step(xs[0, t])["frames"]).max() <= TOL


def test_a_kserve_sequence_sends_raw_chunks(server, repository):
    tritonclient = pytest.importorskip("tritonclient.grpc")
    xs = chunks(5, 4)
    hand = HandContext(repository / "vad" / "1")
    client = tritonclient.InferenceServerClient(server.address)
    try:
        metadata = client.get_model_metadata("vad")
        assert [list(i.shape) for i in metadata.inputs] == [[-1, CHUNK]]  # what a client sends
        for t, x in enumerate(xs):
            inp = tritonclient.InferInput("x", [1, CHUNK], "FP32")
            inp.set_data_from_numpy(x[None])
            result = client.infer("vad", [inp], sequence_id=7, sequence_start=t == 0, sequence_end=t == len(xs) - 1)
            want = hand.step(x)
            assert np.abs(result.as_numpy("frames")[0] - want["frames"]).max() <= TOL
            assert np.abs(result.as_numpy("prob")[0] - want["prob"]).max() <= TOL
    finally:
        client.close()


@pytest.mark.parametrize("model", ["vad", "vad_every"])
def test_the_window_survives_a_move_to_another_replica(repository, server_factory, model):
    """Two replicas share a real redis-server: the session goes on at B from what A wrote (every-step), or
    from what A wrote when it shut down (durability none)."""
    from redis_server import RedisServer, needs_redis

    if needs_redis.args[0]:
        pytest.skip(needs_redis.kwargs["reason"])
    redis = RedisServer().start()
    try:
        xs = chunks(6, 6)
        hand = HandContext(repository / model / "1")
        from conftest import ServerHandle

        # A is stopped here (not by the fixture) when the test shuts it down.
        a = (
            ServerHandle(repository, session_store=redis.url)
            if model == "vad"
            else server_factory(repository, session_store=redis.url)
        )
        b = server_factory(repository, session_store=redis.url)

        def step(address: str, sid: str, t: int) -> np.ndarray:
            with grpc.insecure_channel(address) as channel:
                request = pb.StepRequest(session_id=sid, inputs={"x": to_proto(xs[t])}, step_index=t + 1)
                return from_proto(pb_grpc.RnnServeStub(channel).Step(request, timeout=10).outputs["frames"])

        with grpc.insecure_channel(a.address) as channel:
            sid = pb_grpc.RnnServeStub(channel).OpenSession(pb.OpenSessionRequest(model=model)).session_id
        for t in range(3):
            assert np.abs(step(a.address, sid, t) - hand.step(xs[t])["frames"]).max() <= TOL
        if model == "vad":
            a.stop()  # a graceful shutdown writes every session
        for t in range(3, 6):
            assert np.abs(step(b.address, sid, t) - hand.step(xs[t])["frames"]).max() <= TOL
    finally:
        redis.stop()


def test_a_manifest_that_disagrees_with_the_graph_fails_at_load_naming_what_it_fed(tmp_path, server_factory):
    # The context forgotten: the graph takes 576 samples, the manifest sends 512 without a window.
    write_vad(tmp_path, "forgot", inputs=[{"name": "x", "shape": [-1, CHUNK]}])
    # A window on an input whose graph length is not window + chunk.
    write_vad(tmp_path, "too_long", inputs=[{"name": "x", "shape": [-1, CHUNK], "context": {"length": 128}}])
    server = server_factory(tmp_path)
    with Client(server.address) as client:
        models = {m.name: m for m in client.list_models()}
    assert models["forgot"].state == "FAILED"
    assert f"fed x float32[1, {CHUNK}]: " in models["forgot"].error
    assert "Got: 512 Expected: 576" in models["forgot"].error  # onnxruntime's own words
    assert models["too_long"].state == "FAILED"
    assert f"fed x float32[1, {CHUNK + 128}] (a window of 128 + the new elements)" in models["too_long"].error


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"outputs": [{"name": "frames", "shape": [-1, CHUNK], "context": {"length": 4}}]}, "inputs only"),
        ({"inputs": [{"name": "x", "shape": [-1, CHUNK], "context": {"length": 4, "axis": 0}}]}, "context axis 0"),
        ({"inputs": [{"name": "x", "shape": [-1, CHUNK], "check_shape": [-1, 4]}]}, "check_shape [-1, 4]"),
    ],
)
def test_misplaced_fields_are_refused_with_the_reason(tmp_path, server_factory, change, message):
    write_vad(tmp_path, "bad", **change)
    server = server_factory(tmp_path)
    with Client(server.address) as client:
        (model,) = client.list_models()
    assert model.state == "FAILED" and message in model.error


# ---- per-session settings the graph takes as a scalar --------------------------------------------------------
def test_sessions_with_different_scalar_settings_never_share_a_batch(server, repository):
    folder = repository / "vad" / "1"
    rates = [8000, 16000, 8000, 16000]
    xs = np.stack([chunks(10 + i, 3) for i in range(4)])
    hands = [HandContext(folder, sr) for sr in rates]
    before = batch_sizes(server, "vad")
    with Client(server.address) as client:
        sessions = [client.open_session("vad", parameters={"sr": np.int64(sr)}) for sr in rates]
        with client.multi_stream() as multi:
            for t in range(3):
                result = multi.step_batch(sessions, xs[:, t])
                for i, hand in enumerate(hands):
                    assert_same({k: v[i] for k, v in result.outputs.items()}, hand.step(xs[i, t]))
        # One message of four rows ran as two batches of two: one per rate.
        after = batch_sizes(server, "vad")
        assert after.get(2, 0) - before.get(2, 0) == 6 and after.get(4, 0) == before.get(4, 0)
        # The setting travels in the session's snapshot.
        with client.restore(sessions[0].snapshot()) as copy:
            twin = HandContext(folder, 8000)
            twin.window, twin.h = hands[0].window.copy(), hands[0].h.copy()
            assert_same(copy.step(xs[1, 0]), twin.step(xs[1, 0]))
        # Predict: sequences of either rate, each run with its own.
        predicted = client.predict("vad", xs, np.array([3, 3, 2, 3]), parameters={"sr": np.array(rates)})
        for i, sr in enumerate(rates):
            hand = HandContext(folder, sr)
            for t in range(3 if i != 2 else 2):
                assert_same({k: v[i, t] for k, v in predicted.outputs.items()}, hand.step(xs[i, t]))
        for s in sessions:
            s.close()


# ---- free dimensions -----------------------------------------------------------------------------------------
def _padded(root: Path, name: str, **changes) -> None:
    folder = root / name / "1"
    build_padded_onnx(folder / "padded.onnx")
    config = {
        "name": name,
        "version": 1,
        "format": "onnx",
        "artifact": "padded.onnx",
        "inputs": [{"name": "x", "shape": [-1, -1]}],
        "outputs": [{"name": "y", "shape": [-1, 1]}],
        "states": [{"name": "h", "output": "h_out", "shape": [-1, 1]}],
        **changes,
    }
    (folder / "manifest.json").write_text(json.dumps(config))


def test_the_load_check_feeds_free_dimensions_the_length_the_manifest_sets(tmp_path, server_factory):
    _padded(tmp_path, "unset")
    _padded(tmp_path, "set", inputs=[{"name": "x", "shape": [-1, -1], "check_shape": [-1, 4]}])
    server = server_factory(tmp_path)
    with Client(server.address) as client:
        models = {m.name: m for m in client.list_models()}
        assert models["unset"].state == "FAILED"
        assert "fed x float32[1, 1] (a free dimension was fed length 1: set the input's check_shape" in (
            models["unset"].error
        )
        assert models["set"].state == "READY"
        with client.session("set") as s:
            assert s.step(np.arange(3, dtype=np.float32)) == pytest.approx(padded_reference(np.arange(3)))


def test_free_lengths_batch_by_shape_never_one_by_one(tmp_path, server_factory):
    # A long queue delay with a batch of 4: the 8 concurrent steps form batches by shape, not of one each.
    _padded(
        tmp_path,
        "padded",
        inputs=[{"name": "x", "shape": [-1, -1], "check_shape": [-1, 2]}],
        max_batch_size=4,
        max_queue_delay_us=1_000_000,
    )
    server = server_factory(tmp_path)
    lengths = [3, 5, 3, 5, 3, 5, 3, 5]
    xs = [np.random.default_rng(i).standard_normal(n).astype(np.float32) for i, n in enumerate(lengths)]

    async def run() -> list:
        async with AsyncClient(server.address) as client:
            sessions = [await client.open_session("padded") for _ in lengths]
            ys = await asyncio.gather(*(s.step(x) for s, x in zip(sessions, xs, strict=True)))
            for s in sessions:
                await s.close()
            return list(ys)

    ys = asyncio.run(run())
    for x, y in zip(xs, ys, strict=True):
        assert np.asarray(y).item() == pytest.approx(padded_reference(x), abs=1e-5)
    sizes = batch_sizes(server, "padded")
    assert sum(size * count for size, count in sizes.items()) == len(lengths)
    assert max(sizes) > 1


# ---- whole-sequence models: ONNX's own bidirectional LSTM ---------------------------------------------------
@pytest.mark.parametrize("layout", [0, 1], ids=["time-major", "batch-major"])
def test_onnx_bidirectional_lstm_with_int32_lengths(tmp_path, server_factory, layout):
    import onnxruntime as ort

    folder = tmp_path / "bilstm" / "1"
    build_bilstm_onnx(folder / "bilstm.onnx", layout=layout)
    fields = BILSTM_CONFIG if layout == 0 else BILSTM_BATCH_MAJOR
    config = {"name": "bilstm", "version": 1, "format": "onnx", "artifact": "bilstm.onnx", **fields}
    (folder / "manifest.json").write_text(json.dumps(config))
    server = server_factory(tmp_path)
    lengths = np.array([7, 4, 6])
    x = np.random.default_rng(3).standard_normal((7, 3, FEATURES)).astype(np.float32)  # [T, B, F]
    sent = x if layout == 0 else x.transpose(1, 0, 2)  # as the graph takes it
    reference = ort.InferenceSession(str(folder / "bilstm.onnx"), providers=["CPUExecutionProvider"])
    with Client(server.address) as client:
        result = client.predict("bilstm", {"X": sent}, lengths)
        with pytest.raises(RnnServeError) as info:
            client.predict("bilstm", {"X": sent}, np.array([8, 1, 1]))
    assert "within [1, 7]" in info.value.message  # the padded time axis, not the features'
    for i, n in enumerate(lengths):
        one = x[:n, i : i + 1] if layout == 0 else x[:n, i : i + 1].transpose(1, 0, 2)
        y, y_h = reference.run(None, {"X": one, "sequence_lens": np.array([n], np.int32)})
        if layout == 0:  # outputs come batch first: Y [T, 2, B, H] as [B, T, 2, H]
            y, y_h = y.transpose(2, 0, 1, 3), y_h.transpose(1, 0, 2)
        assert np.abs(result.outputs["Y"][i, :n] - y[0]).max() <= TOL
        assert np.abs(result.outputs["Y_h"][i] - y_h[0]).max() <= TOL
    # Through KServe, whose metadata shows the lengths input as INT32: a Triton client sends that.
    tritonclient = pytest.importorskip("tritonclient.grpc")
    triton = tritonclient.InferenceServerClient(server.address)
    try:
        inputs = [
            tritonclient.InferInput("X", list(sent.shape), "FP32"),
            tritonclient.InferInput("sequence_lens", [3], "INT32"),
        ]
        inputs[0].set_data_from_numpy(sent)
        inputs[1].set_data_from_numpy(lengths.astype(np.int32))
        answer = triton.infer("bilstm", inputs)
        np.testing.assert_allclose(answer.as_numpy("Y_h"), result.outputs["Y_h"], atol=TOL)
    finally:
        triton.close()


# ---- the manifest reference's worked example runs as written -----------------------------------------------
def test_the_manifest_pages_vad_example_runs_as_written(tmp_path, server_factory):
    import re

    page = (Path(__file__).resolve().parents[2] / "docs" / "manifest.md").read_text()
    example = page[page.index("## Worked example: a streaming VAD model") :]
    config = json.loads(re.search(r"```json\n(.*?)```", example, flags=re.S).group(1))
    code = re.search(r"```python\n(.*?)```", example, flags=re.S).group(1)
    folder = write_vad(tmp_path, "vad")
    (folder / "manifest.json").write_text(json.dumps(config))  # the page's manifest, as written
    server = server_factory(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("localhost:50051", server.address), "docs/manifest.md", "exec"), scope)
    audio, hand = scope["audio"], HandContext(folder, 16000)
    want = [hand.step(audio[i : i + CHUNK])["prob"][0] for i in range(0, len(audio) - CHUNK + 1, CHUNK)]
    assert len(scope["probs"]) == len(want) == 31
    assert np.abs(np.array(scope["probs"]) - np.array(want)).max() <= TOL
    np.testing.assert_array_equal(scope["window"], hand.window[0])
