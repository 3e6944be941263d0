"""Scale-out (issue 7) with real processes on loopback: Debian's nginx as the session-affinity gateway
(rnnserve/gateway.py), a real redis-server as the shared session store, and three `rnnserve serve` replicas
with ``--durability every-step``.

Each test streams 100 sessions through the gateway with the client SDK over StreamStep, beside 24 sessions
that use unary Steps (each call is routed on its own by ``x-session-id``, so they follow a ring change at
once). It does something unkind to the replicas mid-run and checks every session's outputs against the eager
PyTorch model and its final step count. Once the replicas have shut down and written what they hold, it checks
that the store holds every session at its last step (a stale replica overwriting a newer state would show as
an older step count).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_INPUT, tiny_expected
from redis_server import RedisServer, needs_redis

from rnnserve import gateway
from rnnserve.bench.procs import ServerProcess, rnnserve_server
from rnnserve.client import AsyncClient, Client
from rnnserve.server.durability.store import open_store

needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not os.access("/usr/sbin/nginx", os.X_OK),
    reason="nginx is not installed (scripts/setup.sh --system or `apt-get install nginx` installs it)",
)
pytestmark = [needs_redis, needs_nginx, pytest.mark.timeout(240)]

STREAMING, UNARY, STEPS = 100, 24, 30  # sessions streaming over StreamStep, sessions stepping with unary Step
SESSIONS = STREAMING + UNARY
PACE = 0.02  # seconds between a session's steps: the run lasts long enough for the fault to land mid-stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Replicas on fixed loopback ports (a restarted one comes back on its port, as in the ring) behind nginx."""

    def __init__(self, repository: Path, workdir: Path, redis: RedisServer, replicas: int = 3):
        self.repository = repository
        self.workdir = workdir
        self.redis = redis
        self.ports = [free_port() for _ in range(replicas)]
        self.replicas = [
            rnnserve_server(
                repository,
                workdir,
                tag=f"replica-{i}",
                max_sessions=10_000,
                extra=["--port", str(port), "--session-store", redis.url, "--durability", "every-step"],
            )
            for i, port in enumerate(self.ports)
        ]
        self.gateway_port = free_port()
        self.gateway_dir = workdir / "gateway"
        self.nginx: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def start_replicas(self, indices: list[int]) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(indices)) as pool:  # they load in parallel
            list(pool.map(lambda i: self.replicas[i].start(), indices))

    def _config(self, indices: list[int]) -> Path:
        ring = [f"127.0.0.1:{self.ports[i]}" for i in indices]
        return gateway.write_config(
            self.gateway_dir, ring, port=self.gateway_port, worker_processes="1", fail_timeout_s=1.0
        )

    def start_gateway(self, indices: list[int]) -> None:
        conf = self._config(indices)
        gateway.check_config(conf)
        log = open(self.workdir / "nginx.log", "ab")  # noqa: SIM115 - handed to nginx
        self.nginx = subprocess.Popen(gateway.nginx_command(conf), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.gateway_port), 0.2):
                return
            assert self.nginx.poll() is None, (self.workdir / "nginx.log").read_text()
            assert time.monotonic() < deadline, "nginx did not listen"
            time.sleep(0.05)

    def reload_gateway(self, indices: list[int]) -> None:
        gateway.reload(self._config(indices))

    def stop(self) -> None:
        for r in self.replicas:
            r.stop(grace=10)
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)
            try:
                self.nginx.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()

    def open_sessions(self, i: int) -> int:
        with Client(f"127.0.0.1:{self.ports[i]}") as c:
            return c.stats().open_sessions


@pytest.fixture
def cluster(tiny_repository: Path, tmp_path: Path) -> Iterator[Cluster]:
    redis = RedisServer().start()
    cluster = Cluster(tiny_repository, tmp_path, redis)
    try:
        yield cluster
    finally:
        cluster.stop()
        redis.stop()


@pytest.fixture(scope="module")
def workload() -> tuple[np.ndarray, np.ndarray]:
    """Every session's inputs and its eager outputs (the fault-free answer)."""
    xs = np.random.default_rng(7).standard_normal((SESSIONS, STEPS, TINY_INPUT)).astype(np.float32)
    return xs, np.stack([tiny_expected(x)[0] for x in xs])


def drive(
    address: str, xs: np.ndarray, fault: Callable[[], None], at: float = 0.3, streaming: int = STREAMING
) -> tuple[list[str], np.ndarray]:
    """Run every session through the gateway, the first ``streaming`` over StreamStep and the others with unary
    Steps; ``fault`` runs (on a thread) once ``at`` of all steps are done. Returns the session ids and their
    outputs, (sessions, steps, out)."""

    async def main() -> tuple[list[str], list[np.ndarray]]:
        done = 0
        reached = asyncio.Event()
        total = xs.shape[0] * xs.shape[1]

        def progressed() -> None:
            nonlocal done
            done += 1
            if done >= at * total:
                reached.set()

        async with AsyncClient(address, retries=40, backoff=0.05, max_backoff=0.5, timeout=20) as client:

            async def one(i: int) -> tuple[str, np.ndarray]:
                session = await client.open_session("gru")
                ys = []
                if i < streaming:

                    async def paced():
                        for x in xs[i]:
                            await asyncio.sleep(PACE)
                            yield x

                    async for y in session.stream(paced(), window=4):
                        ys.append(y)
                        progressed()
                else:
                    for x in xs[i]:
                        await asyncio.sleep(PACE)
                        ys.append(await session.step(x))
                        progressed()
                assert session.steps == xs.shape[1], session
                return session.id, np.stack(ys)

            async def inject() -> None:
                await reached.wait()
                await asyncio.to_thread(fault)

            injector = asyncio.create_task(inject())
            results = await asyncio.gather(*(one(i) for i in range(xs.shape[0])))
            await injector  # the fault must have happened mid-run, not after
            return [sid for sid, _ in results], [ys for _, ys in results]

    ids, ys = asyncio.run(main())
    return ids, np.stack(ys)


def check(
    cluster: Cluster, ids: list[str], ys: np.ndarray, expected: np.ndarray, stop_order: tuple[int, ...] = (0, 1, 2)
) -> None:
    np.testing.assert_allclose(ys, expected, atol=1e-5)
    # Every replica shuts down gracefully and writes what it holds; stale copies must be refused by the store.
    for i in stop_order:
        cluster.replicas[i].stop(grace=10)
    store = open_store(cluster.redis.url, ttl=60)
    try:
        records = store.get_many(ids)
    finally:
        store.close()
    assert all(r is not None for r in records)
    assert sorted({r.steps for r in records}) == [STEPS]  # type: ignore[union-attr]


def test_kill_9_one_replica_mid_stream(cluster: Cluster, workload) -> None:
    xs, expected = workload
    cluster.start_replicas([0, 1, 2])
    cluster.start_gateway([0, 1, 2])
    victim = cluster.replicas[1]
    held: list[int] = []

    def kill() -> None:
        held.append(cluster.open_sessions(1))
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.proc is not None
        victim.proc.wait(10)

    ids, ys = drive(cluster.address, xs, kill)
    assert held and held[0] > 0, "the killed replica held no session: nothing was failed over"
    assert cluster.open_sessions(0) + cluster.open_sessions(2) >= SESSIONS  # the survivors hold every session
    check(cluster, ids, ys, expected)


def test_rolling_restart(cluster: Cluster, workload) -> None:
    xs, expected = workload
    cluster.start_replicas([0, 1, 2])
    cluster.start_gateway([0, 1, 2])

    def roll() -> None:
        for r in cluster.replicas:
            r.stop(grace=10)  # SIGTERM: drains, writes its sessions
            r.start()  # same port: back in the ring once nginx retries it (fail_timeout 1 s)
            time.sleep(1.0)

    ids, ys = drive(cluster.address, xs, roll, at=0.15)
    check(cluster, ids, ys, expected)


def test_scale_up_from_two_to_three(cluster: Cluster, workload) -> None:
    xs, expected = workload
    cluster.start_replicas([0, 1, 2])
    cluster.start_gateway([0, 1])

    def scale_up() -> None:
        assert cluster.open_sessions(2) == 0
        cluster.reload_gateway([0, 1, 2])

    ids, ys = drive(cluster.address, xs, scale_up)
    # About a third of the sessions hash to the new replica; the unary ones move there at their next step,
    # leaving stale copies behind on the first two (which `check` makes write at shutdown: refused).
    assert cluster.open_sessions(2) > 0
    # The new replica, which holds the moved sessions' current state, stops first: the old ones' stale copies
    # are written after it, and must be refused.
    check(cluster, ids, ys, expected, stop_order=(2, 0, 1))


def test_workers_flag_runs_workers_behind_the_gateway(tiny_repository: Path, tmp_path: Path, workload) -> None:
    """`rnnserve serve --workers 2 --gateway-port P`: the same design on one machine, under a supervisor that
    restarts a worker killed by -9 and drains everything on SIGTERM."""
    xs, expected = workload
    redis = RedisServer().start()
    port_file = tmp_path / "port"
    gateway_port = free_port()
    base = free_port()
    cmd = [
        sys.executable,
        "-m",
        "rnnserve.cli",
        "serve",
        "--repository",
        str(tiny_repository),
        "--workers",
        "2",
        "--port",
        str(base),
        "--gateway-port",
        str(gateway_port),
        "--session-store",
        redis.url,
        "--durability",
        "every-step",
        "--grace",
        "1",
        "--port-file",
        str(port_file),
    ]
    supervisor = ServerProcess("rnnserve serve --workers 2", cmd, port_file, tmp_path / "workers.log")
    try:
        supervisor.start()
        assert supervisor.port == gateway_port
        children = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(supervisor.pid)]).split()]
        workers = [pid for pid in children if b"rnnserve.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2

        def kill_worker() -> None:
            os.kill(workers[0], signal.SIGKILL)

        few = np.r_[0:12, STREAMING : STREAMING + 8]  # streaming and unary sessions
        _, ys = drive(supervisor.address, xs[few], kill_worker, at=0.3, streaming=12)
        np.testing.assert_allclose(ys, expected[few], atol=1e-5)
        # The supervisor brings the killed worker back on its port.
        deadline = time.monotonic() + 30
        while True:
            now = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(supervisor.pid)]).split()]
            if len([p for p in now if p not in children]) == 1:
                break
            assert time.monotonic() < deadline, supervisor.log_tail()
            time.sleep(0.2)
        supervisor.stop(grace=30)
        assert supervisor.proc is not None and supervisor.proc.returncode == 0, supervisor.log_tail()
        for pid in now:
            assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
    finally:
        supervisor.stop(grace=5)
        redis.stop()


def test_workers_refuse_a_store_that_is_not_shared(tiny_repository: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rnnserve.cli", "serve", "--repository", str(tiny_repository), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--session-store redis://" in done.stderr


def test_gateway_command_prints_and_checks_its_config() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve.cli",
            "gateway",
            "--replica",
            "10.0.0.1:50051",
            "--replica",
            "10.0.0.2:50051",
            "--print",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "hash $http_x_session_id consistent;" in done.stdout
    assert "server 10.0.0.1:50051 max_fails=1" in done.stdout and "server 10.0.0.2:50051" in done.stdout
    assert "grpc_pass grpc://rnnserve;" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "rnnserve.cli", "gateway", "--replica", "no-port", "--print"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "expected host:port" in bad.stderr
