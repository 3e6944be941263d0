"""One client's requests never change another's: KServe sequences per principal, refused STARTs, per-client
session limits on every API, sessions with different free dimensions batching side by side, snapshots that
restore only into their own model, a metrics port that stays on this host, and session ids per principal."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT, ServerHandle, build_tiny_repository, tiny_expected

from rnnserve.client import Client, RnnServeError
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc
from rnnserve.tensors import from_proto, to_proto

tritonclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice\n{BOB} bob\n")
    return path


def _xs(seed: int, steps: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, TINY_INPUT)).astype(np.float32)


class Triton:
    """tritonclient with one principal's token (or none)."""

    def __init__(self, address: str, token: str | None = None):
        self.client = tritonclient.InferenceServerClient(address)
        self.headers = {"authorization": f"Bearer {token}"} if token else None

    def step(self, seq, x: np.ndarray, **flags) -> np.ndarray:
        inp = tritonclient.InferInput("x", [1, TINY_INPUT], "FP32")
        inp.set_data_from_numpy(np.asarray(x, np.float32).reshape(1, TINY_INPUT))
        return self.client.infer("gru", [inp], sequence_id=seq, headers=self.headers, **flags).as_numpy("y")[0]

    def close(self) -> None:
        self.client.close()


def _refused(fn, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    return info.value


# ---- KServe sequences ------------------------------------------------------------------------------------------
def test_kserve_sequence_ids_are_per_principal_with_tokens(server_factory, tiny_repository, tokens_file) -> None:
    server = server_factory(tiny_repository, auth_tokens=tokens_file)
    alice, bob = Triton(server.address, ALICE), Triton(server.address, BOB)
    xa, xb = _xs(1), _xs(2)
    try:
        ya = [alice.step(5, xa[0], sequence_start=True), alice.step(5, xa[1])]
        # bob's START of the same id is bob's own sequence: it neither ends alice's nor reaches it.
        yb = [bob.step(5, xb[0], sequence_start=True)]
        ya += [alice.step(5, x) for x in xa[2:]]
        yb += [bob.step(5, x) for x in xb[1:]]
    finally:
        alice.close()
        bob.close()
    np.testing.assert_allclose(np.stack(ya), tiny_expected(xa)[0], **TOL)
    np.testing.assert_allclose(np.stack(yb), tiny_expected(xb)[0], **TOL)


def test_a_refused_start_leaves_the_live_sequence_going_on(server_factory, tiny_repository) -> None:
    server = server_factory(tiny_repository)
    triton = Triton(server.address)
    xs = _xs(3)
    bad = xs[0].copy()
    bad[1] = np.nan
    try:
        ys = [triton.step(5, xs[0], sequence_start=True), triton.step(5, xs[1])]
        error = _refused(triton.step, 5, bad, sequence_start=True)
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "NaN" in error.message(), error
        ys += [triton.step(5, x) for x in xs[2:]]  # no START needed: the sequence is as it was
    finally:
        triton.close()
    np.testing.assert_allclose(np.stack(ys), tiny_expected(xs)[0], **TOL)
    with Client(server.address) as native:
        assert native.stats().open_sessions == 1


def test_kserve_starts_count_against_the_per_client_session_limit(server_factory, tiny_repository) -> None:
    server = server_factory(tiny_repository, max_sessions_per_client=5)
    triton = Triton(server.address)
    x = _xs(4)[0]
    try:
        with Client(server.address) as native:
            opened = [native.session("gru") for _ in range(2)]
            for seq in range(1, 4):
                triton.step(seq, x, sequence_start=True)
            # 2 native sessions + 3 sequences: the host's 5. A sixth, through either API, is refused.
            error = _refused(triton.step, 4, x, sequence_start=True)
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error
            assert "--max-sessions-per-client" in error.message()
            with pytest.raises(RnnServeError) as info:
                native.session("gru")
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # START again on a live sequence replaces its session: still 5, allowed.
            np.testing.assert_allclose(triton.step(2, x, sequence_start=True), tiny_expected(x[None])[0][0], **TOL)
            triton.step(3, x, sequence_end=True)  # an ended sequence frees its place
            triton.step(4, x, sequence_start=True)
            assert native.stats().open_sessions == 5
            for s in opened:
                s.close()
    finally:
        triton.close()


# ---- free dimensions ---------------------------------------------------------------------------------------------
FEAT, HIDDEN, OUT = 3, 5, 2


def _pooled_step():
    """``(x: [B, L, 3], h: [B, 5]) -> (y: [B, 2], h')``: each step a set of L vectors, L picked per step."""
    import torch

    torch.manual_seed(11)

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.head = torch.nn.GRUCell(FEAT, HIDDEN), torch.nn.Linear(HIDDEN, OUT)

        def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h2 = self.cell(x.mean(dim=1), h)
            return self.head(h2), h2

    return Pooled().eval()


def _pooled_expected(xs: list[np.ndarray]) -> np.ndarray:
    import torch

    step, h, ys = _pooled_step(), torch.zeros(1, HIDDEN), []
    with torch.no_grad():
        for x in xs:
            y, h = step(torch.as_tensor(x)[None], h)
            ys.append(y[0].numpy())
    return np.stack(ys)


@pytest.fixture(scope="module")
def pooled_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import warnings

    import torch

    from rnnserve.manifest import ModelManifest

    root = tmp_path_factory.mktemp("pooled-repo")
    folder = root / "pooled" / "1"
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _pooled_step(),
            (torch.randn(2, 4, FEAT), torch.zeros(2, HIDDEN)),
            str(folder / "model.onnx"),
            input_names=["x", "h"],
            output_names=["y", "h_out"],
            dynamic_axes={"x": {0: "b", 1: "n"}, "h": {0: "b"}, "y": {0: "b"}, "h_out": {0: "b"}},
            dynamo=False,
        )
    ModelManifest(
        name="pooled",
        version=1,
        format="onnx",
        artifact="model.onnx",
        inputs=[{"name": "x", "shape": [-1, -1, FEAT]}],
        outputs=[{"name": "y", "shape": [-1, OUT]}],
        states=[{"name": "h", "output": "h_out", "shape": [-1, HIDDEN]}],
    ).write(folder)
    return root


def test_sessions_stepping_different_free_lengths_at_once_all_equal_eager(server_factory, pooled_repository) -> None:
    # A long queue delay and room for every session: each batch waits for all of them, so steps of different
    # lengths are ready together at (nearly) every batch.
    server = server_factory(pooled_repository, max_batch_size=4, max_queue_delay_us=200_000)
    lengths, steps = [2, 5, 2, 7], 12
    rng = np.random.default_rng(5)
    inputs = [[rng.standard_normal((n, FEAT)).astype(np.float32) for _ in range(steps)] for n in lengths]
    outputs: list[list[np.ndarray]] = [[] for _ in lengths]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with Client(server.address, timeout=30) as client, client.session("pooled") as session:
                outputs[i] = [session.step(x) for x in inputs[i]]
        except BaseException as exc:  # reported below, with the others'
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(lengths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(len(lengths)):
        np.testing.assert_allclose(np.stack(outputs[i]), _pooled_expected(inputs[i]), **TOL)
    with Client(server.address) as client:
        stats = client.stats().models[0]
    assert stats.steps == steps * len(lengths)
    assert stats.max_batch >= 2  # the two sessions of each length still batched together


# ---- snapshots -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``gru`` versions 1 and 2 (the same weights) beside ``gru_ts``, whose state has the same shape."""
    from rnnserve.manifest import ModelManifest

    root = build_tiny_repository(tmp_path_factory.mktemp("versions-repo"))
    shutil.copytree(root / "gru" / "1", root / "gru" / "2")
    manifest = ModelManifest.read(root / "gru" / "2").model_dump(mode="json")
    manifest["version"] = 2
    ModelManifest.model_validate(manifest).write(root / "gru" / "2")
    return root


def _failed_precondition(call, *fragments: str) -> None:
    with pytest.raises(RnnServeError) as info:
        call()
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message


def test_a_snapshot_restores_only_into_its_own_model_and_version(server_factory, two_versions) -> None:
    server = server_factory(two_versions)
    xs = _xs(6, 6)
    with Client(server.address, timeout=10) as client:
        v1 = client.session("gru", version=1)
        for x in xs[:3]:
            v1.step(x)
        snap = v1.snapshot()
        v2, other = client.session("gru", version=2), client.session("gru_ts")
        other_before = other.get_state()["h"]
        _failed_precondition(lambda: other.restore(snap), "gru:1", "gru_ts:1", "its own model")
        _failed_precondition(lambda: other.restore(snap, allow_other_version=True), "gru:1", "gru_ts:1")
        _failed_precondition(lambda: v2.restore(snap), "gru:1", "gru:2", "allow_other_version")
        _failed_precondition(lambda: client.restore(snap, model="gru_ts"), "gru:1", "gru_ts")
        np.testing.assert_array_equal(other.get_state()["h"], other_before)  # refused: nothing changed
        assert v2.get_state()["h"].any() == np.False_
        # Opening from a snapshot: its own version, not the newest, unless another is allowed.
        same = client.restore(snap, model="gru")
        assert (same.model.version, same.steps) == (1, 3)
        newest = client.restore(snap, allow_other_version=True)
        assert newest.model.version == 2
        v2.restore(snap, allow_other_version=True)  # opted in: the same weights continue alike
        expected = tiny_expected(xs)[0][3:]
        for session in (v1, same, newest, v2):
            np.testing.assert_allclose(np.stack([session.step(x) for x in xs[3:]]), expected, **TOL)


# ---- metrics -------------------------------------------------------------------------------------------------
def _metrics_reachable_at(address: str, **settings) -> bool:
    """Start a server listening on every address, with a metrics port, and try /metrics at ``address``."""
    import asyncio
    import urllib.error
    import urllib.request

    from rnnserve.server.app import RnnServer
    from rnnserve.server.settings import ServerSettings

    server = RnnServer(ServerSettings(host="0.0.0.0", port=0, metrics_port=0, **settings))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(server.start())
        assert server.metrics is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=10) as response:
            assert b"rnnserve_sessions" in response.read()  # this host can always scrape it
        try:
            with urllib.request.urlopen(f"http://{address}:{server.metrics.port}/metrics", timeout=10):
                return True
        except urllib.error.URLError:
            return False
    finally:
        loop.run_until_complete(server.stop(grace=0.1))
        loop.close()


def test_the_metrics_port_stays_on_this_host_when_tls_or_tokens_are_on(tiny_repository, tokens_file) -> None:
    # 127.0.0.2 is this host too, but not the address 127.0.0.1: a port bound to 127.0.0.1 alone refuses it,
    # as it refuses every other machine.
    elsewhere = "127.0.0.2"
    assert not _metrics_reachable_at(elsewhere, repository=tiny_repository, auth_tokens=tokens_file)
    assert not _metrics_reachable_at(elsewhere, repository=tiny_repository, tokens=f"{ALICE} alice")
    # Opening it up is explicit; without TLS or tokens nothing is protected, so it follows --host.
    assert _metrics_reachable_at(elsewhere, repository=tiny_repository, auth_tokens=tokens_file, metrics_host="0.0.0.0")
    assert _metrics_reachable_at(elsewhere, repository=tiny_repository)


# ---- proposed session ids -----------------------------------------------------------------------------------------
@pytest.fixture
def redis_url() -> Iterator[str]:
    """A throwaway redis-server (requested before server_factory, so it outlives the servers)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    from redis_server import RedisServer

    store = RedisServer().start()
    yield store.url
    store.stop()


class Principal:
    """Raw native calls with one principal's token: what the server answers, without the SDK's retries."""

    def __init__(self, address: str, token: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.RnnServeStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def call(self, method: str, request):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=10)

    def refused(self, method: str, request) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            self.call(method, request)
        return info.value.code(), info.value.details()

    def open(self, sid: str) -> str:
        return self.call("OpenSession", pb.OpenSessionRequest(model="gru", session_id=sid)).session_id

    def step(self, sid: str, x: np.ndarray) -> np.ndarray:
        response = self.call("Step", pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)}))
        assert response.session_id == sid
        return from_proto(response.outputs["y"])

    def stream_step(self, sid: str, x: np.ndarray, *, batch: bool) -> np.ndarray:
        """One step on a StreamStep: as a one-row StepBatch, or in the list form."""
        if batch:
            message = pb.StreamStepRequest(batch=pb.StepBatch(session_ids=[sid], inputs={"x": to_proto(x[None])}))
        else:
            message = pb.StreamStepRequest(steps=[pb.StepRequest(session_id=sid, inputs={"x": to_proto(x)})])
        (response,) = self.stub.StreamStep(iter([message]), metadata=self.metadata, timeout=10)
        if batch:
            assert list(response.batch.session_ids) == [sid] and list(response.batch.codes) == [0]
            return from_proto(response.batch.outputs["y"])[0]
        (result,) = response.results
        assert result.session_id == sid and result.code == 0, result.message
        return from_proto(result.outputs["y"])

    def state(self, sid: str) -> pb.SessionState:
        return self.call("GetState", pb.SessionRequest(session_id=sid))

    def close(self) -> None:
        self.channel.close()


SID = "a-guessable-session-id-0001"
TAKEN = (grpc.StatusCode.ALREADY_EXISTS, f"session id '{SID}' is not available: choose another id")


def test_an_id_another_principal_holds_opens_the_callers_own_session(
    server_factory, tiny_repository, tokens_file
) -> None:
    server = server_factory(tiny_repository, auth_tokens=tokens_file)
    alice, bob = Principal(server.address, ALICE), Principal(server.address, BOB)
    xa, xb = _xs(11, 5), _xs(12, 4)
    try:
        assert alice.open(SID) == SID
        ya = [alice.step(SID, xa[0])]
        # bob learned alice's id: proposing it opens bob's own session, exactly as if alice's were not there.
        assert bob.open(SID) == SID
        yb = [bob.step(SID, xb[0])]
        for t in (1, 2, 3):  # interleaved, over Step, a StreamStep list and a StreamStep StepBatch
            if t == 1:
                ya.append(alice.step(SID, xa[t]))
                yb.append(bob.step(SID, xb[t]))
            else:
                ya.append(alice.stream_step(SID, xa[t], batch=t == 3))
                yb.append(bob.stream_step(SID, xb[t], batch=t == 3))
        for who, xs in ((alice, xa[:4]), (bob, xb)):
            view = who.state(SID)
            assert (view.session_id, view.steps) == (SID, 4)
            np.testing.assert_allclose(from_proto(view.state["h"])[0], tiny_expected(xs)[1], **TOL)
        # Each one's own live id is taken, for that one only; reading it works (the SDK's adopt of its own id).
        request = pb.OpenSessionRequest(model="gru", session_id=SID)
        assert alice.refused("OpenSession", request) == TAKEN and bob.refused("OpenSession", request) == TAKEN
        bob.call("CloseSession", pb.SessionRequest(session_id=SID))
        ya.append(alice.step(SID, xa[4]))  # bob's close ended bob's session only
        # Now bob holds no session of that id: alice's answers exactly as one that never existed.
        never = "never-opened-session-id-0001"
        for method, make in (
            ("Step", lambda sid: pb.StepRequest(session_id=sid, inputs={"x": to_proto(xb[0])})),
            ("GetState", lambda sid: pb.SessionRequest(session_id=sid)),
            ("CloseSession", lambda sid: pb.SessionRequest(session_id=sid)),
        ):
            code, message = bob.refused(method, make(SID))
            assert (code, message.replace(SID, never)) == bob.refused(method, make(never))
            assert code == grpc.StatusCode.NOT_FOUND
        assert alice.state(SID).steps == 5
    finally:
        alice.close()
        bob.close()
    np.testing.assert_allclose(np.stack(ya), tiny_expected(xa)[0], **TOL)
    np.testing.assert_allclose(np.stack(yb), tiny_expected(xb)[0], **TOL)


def test_one_id_of_two_principals_is_two_sessions_in_the_session_store(redis_url, tiny_repository, tokens_file) -> None:
    from rnnserve.server.durability.store import open_store

    settings = {"auth_tokens": tokens_file, "session_store": redis_url, "durability": "every-step"}
    xa, xb = _xs(21, 3), _xs(22, 3)
    running: list[ServerHandle] = []  # stopped by the test itself: the restart is part of it

    def start() -> ServerHandle:
        running.append(ServerHandle(tiny_repository, **settings))
        return running[-1]

    def stop(server: ServerHandle) -> None:
        running.remove(server)
        server.stop()

    try:
        here, there = start(), start()
        alice, bob = Principal(here.address, ALICE), Principal(there.address, BOB)
        assert alice.open(SID) == SID
        ya = [alice.step(SID, xa[0])]
        # Another replica, which knows alice's session only through the store: bob's own session all the same.
        assert bob.open(SID) == SID
        yb = [bob.step(SID, xb[0])]
        alice.close()
        bob.close()
        # Each moves to the replica holding the other one's session of that id, and finds its own in the store.
        alice, bob = Principal(there.address, ALICE), Principal(here.address, BOB)
        ya.append(alice.step(SID, xa[1]))
        yb.append(bob.step(SID, xb[1]))
        alice.close()
        bob.close()
        store = open_store(redis_url, ttl=60)
        try:
            assert len(store.keys()) == 2
        finally:
            store.close()
        stop(here)
        stop(there)
        # A restart: each principal's session comes back apart from the other's, with its owner.
        fresh = start()
        alice, bob = Principal(fresh.address, ALICE), Principal(fresh.address, BOB)
        try:
            # bob's own id, held only by the store: still taken for bob.
            assert bob.refused("OpenSession", pb.OpenSessionRequest(model="gru", session_id=SID)) == TAKEN
            ya.append(alice.step(SID, xa[2]))
            yb.append(bob.step(SID, xb[2]))
            assert sorted((s.id, s.owner) for s in fresh.server.sessions) == [(SID, "alice"), (SID, "bob")]
            assert (alice.state(SID).steps, bob.state(SID).steps) == (3, 3)
        finally:
            alice.close()
            bob.close()
    finally:
        for server in list(running):
            stop(server)
    np.testing.assert_allclose(np.stack(ya), tiny_expected(xa)[0], **TOL)
    np.testing.assert_allclose(np.stack(yb), tiny_expected(xb)[0], **TOL)
