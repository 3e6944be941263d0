"""The sync and asyncio clients against the real server (rnnserve.server) and the tiny GRU repository."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import TINY_HIDDEN, TINY_INPUT, TINY_OUTPUT, ServerHandle, tiny_expected

from rnnserve.cli import main
from rnnserve.client import AsyncClient, Client, RnnServeError

TOL = 1e-5


@pytest.fixture
def server(server_factory, tiny_repository) -> ServerHandle:
    return server_factory(tiny_repository)


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


def xs_for(seed: int, steps: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, TINY_INPUT)).astype(np.float32)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(np.abs(a - b).max()) <= TOL


def test_models_and_health(client: Client, server: ServerHandle) -> None:
    names = {(m.name, m.version) for m in client.list_models()}
    assert {("gru", 1), ("gru_ts", 1)} <= names
    gru = client.model("gru")
    assert gru.ready and gru.format == "onnx"
    assert gru.input("x").dtype == "float32" and gru.input("x").shape == (TINY_INPUT,)
    assert gru.output("y").shape == (TINY_OUTPUT,)
    assert gru.states[0].shape == (1, TINY_HIDDEN) and gru.states[0].batch_axis == 1
    assert client.health() == "SERVING" and client.health("rnnserve.v1.RnnServe") == "SERVING"
    assert main(["health", "--address", server.address]) == 0
    assert main(["models", "--address", server.address]) == 0


@pytest.mark.parametrize("model", ["gru", "gru_ts"])
def test_steps_chunks_and_streams_equal_eager(client: Client, model: str) -> None:
    xs = xs_for(1, 24)
    expected, h = tiny_expected(xs)
    with client.session(model) as s:
        ys = [s.step(x) for x in xs[:4]]
        ys.append(s.step_chunk(xs[4:10]))
        ys.extend(s.stream(xs[10:17]))
        ys.extend(s.stream(list(xs[17:]), window=1))
        assert s.steps == len(xs)
        out = np.concatenate([np.stack(ys[:4]), ys[4], np.stack(ys[5:])])
        assert close(out, expected)
        assert close(s.get_state()["h"][0], h)


def test_errors_are_rnnserve_errors(client: Client) -> None:
    with pytest.raises(RnnServeError) as info:
        client.open_session("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "nope" in info.value.message
    with client.session("gru") as s:
        with pytest.raises(RnnServeError) as info:
            s.step(np.zeros(TINY_INPUT + 1, np.float32))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.message
        xs = [*xs_for(2, 3), np.zeros(7, np.float32), *xs_for(3, 3)]
        seen = []
        with pytest.raises(RnnServeError) as info:
            for y in s.stream(xs, window=1):
                seen.append(y)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(seen) == 3
        assert s.get_state() and s.steps == 3  # the failed step left the session where it was


def test_state_snapshot_and_restore(client: Client) -> None:
    xs = xs_for(4, 10)
    h0 = np.linspace(-1, 1, TINY_HIDDEN, dtype=np.float32).reshape(1, TINY_HIDDEN)
    with client.session("gru", initial_state={"h": h0}) as s:
        for x in xs[:5]:
            s.step(x)
        snap = s.snapshot()
        rest = s.step_chunk(xs[5:])
        assert close(rest, tiny_expected(xs, h0)[0][5:])
        with client.restore(snap) as copy:
            assert copy.steps == 5 and copy.model.name == "gru"
            assert close(copy.step_chunk(xs[5:]), rest)
        s.restore(snap)
        assert s.steps == 5 and close(s.step_chunk(xs[5:]), rest)
        s.reset()
        assert not s.get_state()["h"].any()
        s.set_state({"h": h0})
        assert np.array_equal(s.get_state()["h"], h0)


def test_concurrent_pipelined_streams_and_multi_stream(client: Client) -> None:
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        with client.session("gru") as s:
            results[i] = np.stack(list(s.stream(xs_for(10 + i, 30), window=8)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(6):
        assert close(results[i], tiny_expected(xs_for(10 + i, 30))[0])

    a, b = xs_for(20, 5), xs_for(21, 5)
    with client.session("gru") as s1, client.session("gru_ts") as s2, client.multi_stream() as ms:
        outs = [ms.step({s1: xa, s2: xb}) for xa, xb in zip(a, b, strict=True)]
        assert close(np.stack([o[s1] for o in outs]), tiny_expected(a)[0])
        assert close(np.stack([o[s2] for o in outs]), tiny_expected(b)[0])
    assert client.stats().open_sessions == 0


def test_async_client(server: ServerHandle) -> None:
    xs = xs_for(30, 16)
    expected, _ = tiny_expected(xs)

    async def one(c: AsyncClient, model: str) -> np.ndarray:
        async with c.session(model) as s:
            ys = [await s.step(xs[0]), *(await s.step_chunk(xs[1:6]))]
            ys += [y async for y in s.stream(xs[6:])]
            assert s.steps == len(xs)
            return np.stack(ys)

    async def main_() -> None:
        async with AsyncClient(server.address, timeout=30) as c:
            assert await c.health() == "SERVING"
            assert (await c.model("gru")).ready
            outs = await asyncio.gather(*(one(c, m) for m in ["gru", "gru_ts"] * 3))
            for out in outs:
                assert close(out, expected)
            with pytest.raises(RnnServeError) as info:
                await c.open_session("nope")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            s1, s2 = await c.open_session("gru"), await c.open_session("gru")
            snap = None
            async with c.multi_stream() as ms:
                for x in xs[:3]:
                    out = await ms.step({s1: x, s2: x})
                    assert np.array_equal(out[s1], out[s2])
                snap = await s1.snapshot()
            copy = await c.restore(snap)
            assert copy.steps == 3
            for s in (s1, s2, copy):
                await s.close()

    asyncio.run(main_())


def test_step_batch_columnar_sync_and_async(server_factory, tiny_repository):
    import asyncio

    from rnnserve.client import AsyncClient, BatchResult, Client, RnnServeError

    server = server_factory(tiny_repository)
    rng = np.random.default_rng(21)
    xs = rng.standard_normal((4, 6, 3)).astype(np.float32)
    with Client(server.address) as client:
        sessions = [client.open_session("gru") for _ in range(4)]
        with client.multi_stream() as ms:
            ys = np.stack([ms.step_batch(sessions, xs[:, t]).outputs for t in range(6)], axis=1)
            bad = xs[:, 0].copy()
            bad[2, 0] = np.inf
            with pytest.raises(RnnServeError) as info:
                ms.step_batch(sessions, bad)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "row 2" in info.value.message
            partial = ms.step_batch([sessions[0], "nope"], xs[:2, 0], return_exceptions=True)
            assert isinstance(partial, BatchResult) and set(partial.errors) == {1}
            assert partial.errors[1].code == grpc.StatusCode.NOT_FOUND
        assert [s.steps for s in sessions] == [8, 7, 6, 7]  # the inf row was not applied
    for i in range(4):
        assert np.abs(ys[i] - tiny_expected(xs[i])[0]).max() <= 1e-5

    async def run_async() -> np.ndarray:
        async with AsyncClient(server.address) as client:
            sessions = [await client.open_session("gru_ts") for _ in range(4)]
            async with client.multi_stream() as ms:
                return np.stack([(await ms.step_batch(sessions, xs[:, t])).outputs for t in range(6)], axis=1)

    ys = asyncio.run(run_async())
    for i in range(4):
        assert np.abs(ys[i] - tiny_expected(xs[i])[0]).max() <= 1e-5
