"""The versioned repository at runtime: LoadModel/UnloadModel over a real server, through the SDK and the CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY_HIDDEN, TINY_INPUT, TINY_OUTPUT, ServerHandle, tiny_expected, tiny_step

from rnnserve.client import AsyncClient, Client, RnnServeError


# ---- helpers ------------------------------------------------------------------------------------------------
def write_ts_version(repo: Path, name: str, version: int, seed: int) -> Path:
    """A TorchScript version of the tiny GRU model with the weights of ``seed`` (replaces what is there)."""
    import torch

    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(tiny_step(seed)).save(str(folder / "model.pt"))
    if folder != repo / "gru_ts" / "1":
        shutil.copy(repo / "gru_ts" / "1" / "manifest.json", folder)
    edit_manifest(folder, name=name, version=version)
    return folder


def expected(xs: np.ndarray, seed: int = 0) -> np.ndarray:
    """Eager outputs of the tiny model with the weights of ``seed`` for one session's inputs (T, IN)."""
    return tiny_expected(xs, seed=seed)[0]


def xs_for(seed: int, steps: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, TINY_INPUT)).astype(np.float32)


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll until ``predicate()`` is true; a generous deadline, never a timing assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def error_of(fn: Callable[[], object]) -> RnnServeError:
    with pytest.raises(RnnServeError) as info:
        fn()
    return info.value


@pytest.fixture
def repo(tiny_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny repository (gru: ONNX, gru_ts: TorchScript), free to mutate."""
    return Path(shutil.copytree(tiny_repository, tmp_path / "repo"))


@pytest.fixture
def server(server_factory, repo: Path) -> ServerHandle:
    return server_factory(repo)


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Client]:
    with Client(server.address, timeout=60) as c:
        yield c


def listing(client: Client) -> dict[str, object]:
    return {f"{m.name}:{m.version}": m for m in client.list_models()}


# ---- loading new versions and reloading ---------------------------------------------------------------------
def test_new_version_serves_new_sessions_while_open_sessions_keep_theirs(client: Client, repo: Path):
    xs = xs_for(1)
    old = client.open_session("gru_ts")
    first = np.stack([old.step(x) for x in xs[:4]])

    write_ts_version(repo, "gru_ts", 2, seed=1)
    loaded = client.load_model("gru_ts")  # every version folder: 1 reloads, 2 is new
    assert [(m.version, m.state) for m in loaded] == [(1, "READY"), (2, "READY")]
    assert sorted(v for k, v in ((m.name, m.version) for m in client.list_models()) if k == "gru_ts") == [1, 2]

    new = client.open_session("gru_ts")  # no version: the newest ready one
    assert new.model.version == 2
    np.testing.assert_allclose(np.stack([new.step(x) for x in xs]), expected(xs, seed=1), rtol=1e-5, atol=1e-6)
    rest = np.stack([old.step(x) for x in xs[4:]])
    assert old.model.version == 1 and old.steps == len(xs)
    np.testing.assert_allclose(np.concatenate([first, rest]), expected(xs, seed=0), rtol=1e-5, atol=1e-6)
    assert client.open_session("gru_ts", version=1).model.version == 1


def test_reload_keeps_open_sessions_on_the_previous_load(client: Client, repo: Path, server: ServerHandle):
    xs = xs_for(2)
    old = client.open_session("gru_ts")
    first = np.stack([old.step(x) for x in xs[:3]])

    write_ts_version(repo, "gru_ts", 1, seed=1)  # the same version folder, new weights
    (reloaded,) = client.load_model("gru_ts", 1)
    assert reloaded.state == "READY" and reloaded.open_sessions == 0

    new = client.open_session("gru_ts")
    np.testing.assert_allclose(np.stack([new.step(x) for x in xs]), expected(xs, seed=1), rtol=1e-5, atol=1e-6)
    # The open session computes on the artifact it opened with, state and step count intact.
    rest = np.stack([old.step(x) for x in xs[3:]])
    np.testing.assert_allclose(np.concatenate([first, rest]), expected(xs, seed=0), rtol=1e-5, atol=1e-6)
    assert old.get_state()["h"].shape == (1, TINY_HIDDEN) and old.steps == len(xs)

    admin = server.server.dataplane.admin
    assert len(admin.draining) == 1  # the previous load runs on for its session...
    old.close()
    wait_for(lambda: not admin.draining, "the previous load's batcher to stop")  # ...and stops after it


def test_failed_reload_keeps_the_loaded_version_serving(client: Client, repo: Path):
    xs = xs_for(3)
    session = client.open_session("gru")
    first = session.step(xs[0])
    artifact = repo / "gru" / "1" / "model.onnx"
    good = artifact.read_bytes()
    artifact.write_bytes(b"not an onnx graph")

    (result,) = client.load_model("gru", 1)
    assert result.state == "FAILED" and "keeps serving" in result.error
    listed = listing(client)["gru:1"]
    assert listed.state == "READY" and "reload failed" in listed.error
    rest = [session.step(x) for x in xs[1:]]
    np.testing.assert_allclose(np.stack([first, *rest]), expected(xs), rtol=1e-5, atol=1e-6)
    fresh = client.open_session("gru")
    np.testing.assert_allclose(fresh.step(xs[0]), expected(xs[:1])[0], rtol=1e-5, atol=1e-6)

    artifact.write_bytes(good)
    assert [m.state for m in client.load_model("gru", 1)] == ["READY"]
    assert listing(client)["gru:1"].error == ""


# ---- unloading ---------------------------------------------------------------------------------------------
def test_unload_is_refused_with_open_sessions_unless_forced(client: Client):
    xs = xs_for(4)
    session = client.open_session("gru")
    other = client.open_session("gru_ts")
    before = session.step(xs[0])

    err = error_of(lambda: client.unload_model("gru"))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "gru:1 has 1 open session(s)" in err.message and "force" in err.message
    np.testing.assert_allclose(np.stack([before, session.step(xs[1])]), expected(xs[:2]), rtol=1e-5, atol=1e-6)

    result = client.unload_model("gru", force=True)
    assert result.closed_sessions == 1 and [(m.name, m.version, m.state) for m in result.models] == [
        ("gru", 1, "UNLOADED")
    ]
    err = error_of(lambda: session.step(xs[2]))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model gru:1 was unloaded (forced); open a new session" in err.message
    assert error_of(session.get_state).code == grpc.StatusCode.FAILED_PRECONDITION
    session.close()  # acknowledging an ended session is fine

    other.step(xs[0])  # other models are untouched
    assert set(listing(client)) == {"gru_ts:1"}
    assert error_of(lambda: client.open_session("gru")).code == grpc.StatusCode.NOT_FOUND
    assert error_of(lambda: client.unload_model("gru")).code == grpc.StatusCode.NOT_FOUND

    assert [m.state for m in client.load_model("gru")] == ["READY"]
    with client.session("gru") as again:
        np.testing.assert_allclose(again.step(xs[0]), expected(xs[:1])[0], rtol=1e-5, atol=1e-6)
    other.close()
    assert client.unload_model("gru_ts", 1).closed_sessions == 0
    assert set(listing(client)) == {"gru:1"}


def test_forced_unload_fails_steps_queued_on_a_stream(client: Client):
    session = client.open_session("gru")
    xs = np.zeros((200, TINY_INPUT), np.float32)
    outputs = session.stream(xs, window=64)
    next(outputs)
    client.unload_model("gru", force=True)
    # Steps already computed may still arrive; then the stream ends with the session's end.
    with pytest.raises(RnnServeError) as info:
        for _ in outputs:
            pass
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


# ---- models that fail to load ------------------------------------------------------------------------------
def test_models_that_fail_to_load_are_listed_with_their_error(server_factory, repo: Path):
    bad = repo / "bad_manifest" / "1"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text('{"name": "bad_manifest", "version": 1, "format": "onnx", "bogus": 1}')
    server = server_factory(repo)  # a broken model at startup does not stop the server
    onnx = repo / "gru" / "1"
    cases = {
        "no_artifact": ("is missing", lambda d: None),
        "wrong_graph": (
            "graph lacks inputs ['z']",
            lambda d: edit_manifest(d, inputs=[{"name": "z", "shape": [-1, 3]}]),
        ),
        "wrong_shape": (
            "the manifest says",
            lambda d: edit_manifest(d, outputs=[{"name": "y", "shape": [-1, TINY_OUTPUT + 1]}]),
        ),
    }
    with Client(server.address, timeout=60) as client:
        for name, (message, breakage) in cases.items():
            folder = repo / name / "1"
            folder.mkdir(parents=True)
            shutil.copy(onnx / "manifest.json", folder)
            if name != "no_artifact":
                shutil.copy(onnx / "model.onnx", folder)
            edit_manifest(folder, name=name)
            breakage(folder)
            (result,) = client.load_model(name)
            assert result.state == "FAILED" and message in result.error, (name, result.error)
        models = listing(client)
        assert models["bad_manifest:1"].state == "FAILED" and "bogus" in models["bad_manifest:1"].error
        for name, (message, _) in cases.items():
            assert models[f"{name}:1"].state == "FAILED" and message in models[f"{name}:1"].error
        err = error_of(lambda: client.open_session("wrong_shape"))
        assert err.code == grpc.StatusCode.NOT_FOUND and "failed to load" in err.message
        with client.session("gru") as s:  # the others serve
            np.testing.assert_allclose(s.step(xs_for(5)[0]), expected(xs_for(5)[:1])[0], rtol=1e-5, atol=1e-6)
        # A FAILED version can be unloaded (it leaves the listing) and loaded again once fixed.
        assert [m.state for m in client.unload_model("no_artifact").models] == ["UNLOADED"]
        assert "no_artifact:1" not in listing(client)
        shutil.copy(onnx / "model.onnx", repo / "no_artifact" / "1")
        assert [m.state for m in client.load_model("no_artifact")] == ["READY"]
        assert client.health() == "SERVING"


# ---- names and versions from requests stay inside the repository -------------------------------------------
def test_names_and_versions_cannot_escape_the_repository(client: Client, repo: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    shutil.copytree(repo / "gru", outside / "gru")
    edit_manifest(outside / "gru" / "1", name="evil")
    (repo / "evil").symlink_to(outside / "gru", target_is_directory=True)
    (repo / "gru" / "7").symlink_to(outside / "gru" / "1", target_is_directory=True)
    for name in ["..", "../gru", "gru/1", "/etc", "gru\\1", "", ".hidden", "evil"]:
        err = error_of(lambda name=name: client.load_model(name))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
    assert error_of(lambda: client.load_model("gru", 7)).code == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(lambda: client.load_model("gru")).code == grpc.StatusCode.INVALID_ARGUMENT  # 7 is among them
    assert error_of(lambda: client.load_model("gru", -1)).code == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(lambda: client.unload_model("../gru")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(lambda: client.load_model("nope")).code == grpc.StatusCode.NOT_FOUND
    assert error_of(lambda: client.load_model("gru", 3)).code == grpc.StatusCode.NOT_FOUND
    assert set(listing(client)) == {"gru:1", "gru_ts:1"}


# ---- the CLI and the asyncio client ------------------------------------------------------------------------
def rnnserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rnnserve.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_load_and_unload(client: Client, server: ServerHandle, repo: Path):
    address = ["--address", server.address]
    write_ts_version(repo, "gru_ts", 2, seed=1)
    done = rnnserve("load", "gru_ts", "--version", "2", *address)
    assert done.returncode == 0, done.stderr
    assert "gru_ts:2  READY  torchscript" in done.stdout and "state=20B/session" in done.stdout

    session = client.open_session("gru_ts", version=2)
    done = rnnserve("unload", "gru_ts", "--version", "2", *address)
    assert done.returncode == 1 and "1 open session(s)" in done.stderr
    done = rnnserve("unload", "gru_ts", "--version", "2", "--force", *address)
    assert done.returncode == 0, done.stderr
    assert "unloaded gru_ts:2" in done.stdout and "ended 1 open session(s)" in done.stdout
    assert error_of(lambda: session.step(xs_for(6)[0])).code == grpc.StatusCode.FAILED_PRECONDITION

    (repo / "gru_ts" / "2" / "model.pt").write_bytes(b"broken")
    done = rnnserve("load", "gru_ts", "--version", "2", *address)
    assert done.returncode == 1 and "gru_ts:2 failed" in done.stderr
    done = rnnserve("models", *address)
    assert done.returncode == 0 and "gru_ts:2  FAILED" in done.stdout and "error:" in done.stdout
    done = rnnserve("load", "..", *address)
    assert done.returncode == 1 and "not a valid name" in done.stderr


def test_async_client_load_and_unload(server: ServerHandle, repo: Path):
    write_ts_version(repo, "gru_ts", 3, seed=1)

    async def main() -> None:
        async with AsyncClient(server.address, timeout=60) as client:
            loaded = await client.load_model("gru_ts", 3)
            assert [(m.version, m.state) for m in loaded] == [(3, "READY")]
            session = await client.open_session("gru_ts")
            assert session.model.version == 3
            with pytest.raises(RnnServeError) as info:
                await client.unload_model("gru_ts", 3)
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            result = await client.unload_model("gru_ts", force=True)  # every version
            assert result.closed_sessions == 1
            assert sorted(m.version for m in result.models) == [1, 3]
            assert [m.name for m in await client.list_models()] == ["gru"]

    asyncio.run(main())


# ---- --watch ------------------------------------------------------------------------------------------------
def test_watch_loads_new_reloads_changed_and_unloads_removed_versions(server_factory, repo: Path):
    server = server_factory(repo, watch_interval=0.05)
    xs = xs_for(7)
    with Client(server.address, timeout=60) as client:

        def state_of(key: str) -> str:
            m = listing(client).get(key)
            return m.state if m else "absent"

        write_ts_version(repo, "gru_ts", 2, seed=1)
        wait_for(lambda: state_of("gru_ts:2") == "READY", "the watcher to load a new version")
        session = client.open_session("gru_ts", version=2)
        np.testing.assert_allclose(session.step(xs[0]), expected(xs[:1], seed=1)[0], rtol=1e-5, atol=1e-6)

        write_ts_version(repo, "gru_ts", 2, seed=2)  # changed in place: reloaded; the session stays on its load
        wait_for(lambda: listing(client)["gru_ts:2"].open_sessions == 0, "the watcher to reload a changed version")
        with client.session("gru_ts", version=2) as fresh:
            np.testing.assert_allclose(fresh.step(xs[0]), expected(xs[:1], seed=2)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(session.step(xs[1]), expected(xs[:2], seed=1)[1], rtol=1e-5, atol=1e-6)

        shutil.rmtree(repo / "gru_ts" / "2")  # removed with a session open: not forced...
        watcher = server.server.watcher
        wait_for(lambda: ("gru_ts", 2) in watcher._blocked, "the watcher to find the session in the way")
        assert state_of("gru_ts:2") == "READY"
        session.close()  # ...unloaded once it closes
        wait_for(lambda: state_of("gru_ts:2") == "absent", "the watcher to unload a removed version")

        (repo / "gru" / "1" / "model.onnx").write_bytes(b"broken")  # a bad push keeps the loaded one serving
        wait_for(lambda: "reload failed" in listing(client)["gru:1"].error, "the watcher to try the broken push")
        assert state_of("gru:1") == "READY"
        with client.session("gru") as s:
            np.testing.assert_allclose(s.step(xs[0]), expected(xs[:1])[0], rtol=1e-5, atol=1e-6)
