"""The bench's phases: compute ceiling, transport ceiling, rnnserve (per-session streams, multiplexed,
chunked), idle capacity, scale-out (N processes behind the gateway versus one) and the optional Triton peer.
Each returns plain dict rows for the report."""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from rnnserve.bench import procs
from rnnserve.bench.load import LoadPool, LoadResult, LoadSpec, PhaseError
from rnnserve.bench.model import BenchModel, random_batch
from rnnserve.bench.progress import Progress

Row = dict[str, Any]


@dataclass
class BenchConfig:
    sessions: list[int]
    max_batch: int
    mux_sessions: int
    chunk_sessions: int
    chunk: int
    idle_sessions: int
    client_procs: int
    phase_timeout: float
    compute_seconds: float
    step_budget: int
    min_steps: int
    max_steps: int
    steps: int | None = None
    server_args: list[str] = field(default_factory=list)
    scale_sessions: int = 256
    scale_workers: int = 2

    def steps_for(self, sessions: int) -> int:
        """Timesteps per session for a phase of ``sessions``: about ``step_budget`` steps in all."""
        if self.steps:
            return self.steps
        return max(self.min_steps, min(self.max_steps, self.step_budget // max(1, sessions)))

    def chunk_steps(self) -> int:
        """Chunked phase: at least 8 messages per stream, a whole number of chunks."""
        steps = max(self.steps_for(self.chunk_sessions), 8 * self.chunk)
        return (steps // self.chunk) * self.chunk

    def compute_batches(self) -> list[int]:
        sizes = {1 << k for k in range(self.max_batch.bit_length()) if 1 << k <= self.max_batch}
        # The batch sizes the ratios refer to are measured even when they are not powers of two.
        sizes |= {min(n, self.max_batch) for n in (*self.sessions, self.mux_sessions, self.chunk_sessions)}
        return sorted(sizes)


class PhaseSkipped(RuntimeError):
    """A phase that cannot run here (a missing program); the reason says what to install."""


@dataclass
class ServerSample:
    cpu_s: float = 0.0
    stats: Any = None


class Bench:
    """Runs the phases against one model; holds the pool and whatever servers are up, for cleanup."""

    def __init__(self, model: BenchModel, repository: Path, workdir: Path, cfg: BenchConfig, progress: Progress):
        self.model = model
        self.repository = repository
        self.workdir = workdir
        self.cfg = cfg
        self.progress = progress
        self.pool = LoadPool(cfg.client_procs)
        self._servers: list[procs.ServerProcess] = []

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.pool.start()

    def close(self) -> None:
        for server in self._servers:
            server.stop(grace=3.0)
        self._servers.clear()
        self.pool.close()

    @contextlib.contextmanager
    def server(self, server: procs.ServerProcess) -> Iterator[procs.ServerProcess]:
        self._servers.append(server)
        try:
            self.progress.log(f"starting {server.name}")
            yield server.start()
        finally:
            server.stop(grace=3.0)
            self._servers.remove(server)

    def _spec(self, address: str, target: str, sessions: int, **kw: Any) -> LoadSpec:
        return LoadSpec(
            kind=kw.pop("kind", "steps"),
            address=address,
            target=target,  # type: ignore[arg-type]
            model=self.model.name,
            version=self.model.version,
            inputs=tuple(self.model.inputs),
            sessions=sessions,
            timeout=self.cfg.phase_timeout,
            **kw,
        )

    def _run_load(
        self,
        label: str,
        spec: LoadSpec,
        server: procs.ServerProcess,
        *,
        stats: Callable[[], Any] | None = None,
        pids: Sequence[int] | None = None,
        others: dict[str, Sequence[int]] | None = None,
    ) -> tuple[LoadResult, dict[str, Any]]:
        """One load phase against ``server`` with its CPU, peak RSS and (rnnserve) batch statistics.

        ``pids``: the server's processes (default: ``server`` itself), whose CPU and peak RSS are summed;
        ``others``: more processes by role (the gateway, the session store), whose CPU per step is reported as
        ``{role}_cpu_us_per_step``."""
        before, after = ServerSample(), ServerSample()
        mem: dict[str, int] = {}
        server_pids = list(pids) if pids is not None else [server.pid]
        roles = {"server": server_pids, **(others or {})}
        cpu0: dict[str, float] = {}
        cpu1: dict[str, float] = {}

        def on_start() -> None:
            for pid in server_pids:
                procs.reset_peak_rss(pid)
            cpu0.update({role: _cpu(ids) for role, ids in roles.items()})
            before.cpu_s = cpu0["server"]
            before.stats = stats() if stats else None

        def on_done() -> None:
            cpu1.update({role: _cpu(ids) for role, ids in roles.items()})
            after.cpu_s = cpu1["server"]
            for pid in server_pids:
                for key, value in procs.memory(pid).items():
                    mem[key] = mem.get(key, 0) + value
            after.stats = stats() if stats else None

        total = spec.sessions * spec.steps if spec.kind == "steps" else spec.sessions
        unit = "steps" if spec.kind == "steps" else "sessions"
        t = time.monotonic()
        try:
            result = self.pool.run(
                spec, on_start=on_start, on_done=on_done, tick=self.progress.ticker(label, total, unit)
            )
        except PhaseError:
            # A stuck or dead generator leaves the pool in an unknown state: start it afresh.
            self.pool.restart()
            raise
        if not server.alive():
            raise PhaseError(f"{server.name} died during {label}:\n{server.log_tail()}")
        count = result.steps or result.opened
        extra: dict[str, Any] = {
            "server_cpu_s": after.cpu_s - before.cpu_s,
            "server_cpu_us_per_step": 1e6 * (after.cpu_s - before.cpu_s) / count if count else math.nan,
            "client_cpu_us_per_step": 1e6 * result.client_cpu_s / count if count else math.nan,
            "server_rss_mib": mem.get("VmRSS", 0) / 2**20,
            "server_peak_rss_mib": mem.get("VmHWM", 0) / 2**20,
        }
        if pids is not None:
            extra["server_procs"] = len(server_pids)
        for role in others or {}:
            used = cpu1[role] - cpu0[role]
            extra[f"{role}_cpu_us_per_step"] = 1e6 * used / count if count else math.nan
        if before.stats is not None and after.stats is not None:
            extra.update(_batch_stats(before.stats, after.stats))
        self.progress.log(
            f"  {label}: {result.steps_per_s if result.steps else result.opened / result.wall_s:,.0f} "
            f"{unit}/s, phase took {time.monotonic() - t:.1f} s"
        )
        return result, extra

    # ---- 1. compute ceiling -------------------------------------------------------------------------------
    def compute(self) -> list[Row]:
        """The artifact called in-process through the server's own runtime class (same thread settings)."""
        from rnnserve.server.runtime import load_runtime

        runtime = load_runtime(self.model.manifest, self.model.version_dir, device="cpu", threads=1)
        manifest = self.model.manifest
        rng = np.random.default_rng(0)
        rows = []
        for batch in self.cfg.compute_batches():
            feeds = {k: np.moveaxis(v, 0, s.batch_axis) for k, v, s in _inputs(self.model, batch, rng)}
            for spec in manifest.states:
                shape = list(spec.shape)
                shape[spec.batch_axis] = batch
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
            times: list[float] = []
            for i in itertools.count():
                t = time.perf_counter()
                out = runtime.run(feeds)
                if i >= 2:  # two warm-up calls
                    times.append(time.perf_counter() - t)
                # Feed the states back, as serving does.
                for spec in manifest.states:
                    feeds[spec.name] = out[spec.output]
                if len(times) >= 3 and sum(times) >= self.cfg.compute_seconds:
                    break
            # Median call: a ceiling should not move with a neighbour's burst on a shared machine.
            call = float(np.median(times))
            rows.append(
                {
                    "phase": "compute",
                    "label": f"batch {batch}",
                    "batch": batch,
                    "calls": len(times),
                    "call_ms": call * 1e3,
                    "mean_call_ms": sum(times) / len(times) * 1e3,
                    "steps_per_s": batch / call,
                }
            )
            self.progress.log(
                f"  compute batch {batch}: {call * 1e3:.3f} ms/call, {rows[-1]['steps_per_s']:,.0f} steps/s"
            )
        del runtime
        return rows

    # ---- 2. transport ceiling -----------------------------------------------------------------------------
    def transport(self) -> list[Row]:
        rows = []
        with self.server(procs.echo_server(self.model.version_dir, self.workdir)) as echo:
            for phase, label, spec in self._load_plan(echo.address, "echo"):
                result, extra = self._run_load(f"transport {label}", spec, echo)
                rows.append(_load_row("transport", label, spec, result, extra, phase=phase))
        # The least per-step work a server can do (echo.py --floor), at the size the 0.8x target is read at.
        n = 256 if 256 in self.cfg.sessions else max(self.cfg.sessions)
        with self.server(procs.echo_server(self.model.version_dir, self.workdir, floor=True)) as floor:
            spec = self._spec(floor.address, "echo", n, steps=self.cfg.steps_for(n))
            result, extra = self._run_load(f"transport N={n} minimal server", spec, floor)
            rows.append(_load_row("transport", f"N={n} minimal server", spec, result, extra, phase="floor"))
        return rows

    # ---- 3 + 4. rnnserve ------------------------------------------------------------------------------
    def rnnserve(self) -> list[Row]:
        cfg = self.cfg
        most = max(max(cfg.sessions), cfg.mux_sessions, cfg.chunk_sessions)
        server = procs.rnnserve_server(
            self.repository, self.workdir, tag="serve", max_sessions=most + 64, extra=cfg.server_args
        )
        rows = []
        with self.server(server) as srv, _StatsClient(srv.address, self.model.name) as stats:
            for phase, label, spec in self._load_plan(srv.address, "rnnserve"):
                result, extra = self._run_load(f"rnnserve {label}", spec, srv, stats=stats.get)
                rows.append(_load_row(phase, label, spec, result, extra, phase=phase))
        return rows

    def _load_plan(self, address: str, target: str) -> list[tuple[str, str, LoadSpec]]:
        """(phase, label, spec) for every load phase, the same for the echo service and rnnserve."""
        cfg = self.cfg
        plan = [("sessions", f"N={n}", self._spec(address, target, n, steps=cfg.steps_for(n))) for n in cfg.sessions]
        n = cfg.mux_sessions
        plan.append(("multiplexed", f"N={n} in 1 msg", self._spec(address, target, n, group=n, steps=cfg.steps_for(n))))
        plan.append(
            (
                "multiplexed",
                f"N={n} columnar",
                self._spec(address, target, n, group=n, steps=cfg.steps_for(n), columnar=True),
            )
        )
        n = cfg.chunk_sessions
        plan.append(
            (
                "chunked",
                f"N={n} x {cfg.chunk} steps/msg",
                self._spec(address, target, n, chunk=cfg.chunk, steps=cfg.chunk_steps()),
            )
        )
        return plan

    # ---- 5. idle capacity ---------------------------------------------------------------------------------
    def idle(self) -> Row:
        cfg = self.cfg
        server = procs.rnnserve_server(
            self.repository,
            self.workdir,
            tag="idle",
            max_sessions=cfg.idle_sessions + 64,
            extra=["--session-ttl", "86400", *cfg.server_args],
        )
        with self.server(server) as srv:
            # Warm the server up (first model call, gRPC buffers) so the baseline holds everything but sessions.
            warm = self._spec(srv.address, "rnnserve", 1, steps=5)
            self._run_load("idle warm-up", warm, srv)
            rss0 = procs.memory(srv.pid)["VmRSS"]
            spec = self._spec(srv.address, "rnnserve", cfg.idle_sessions, kind="open")
            result, extra = self._run_load(f"idle open {cfg.idle_sessions}", spec, srv)
            time.sleep(0.2)  # let the allocator settle before reading RSS
            rss1 = procs.memory(srv.pid)["VmRSS"]
        per_session = (rss1 - rss0) / max(1, result.opened)
        raw = self.model.state_bytes
        return {
            "phase": "idle",
            "label": f"{result.opened} open sessions",
            "sessions": result.opened,
            "opens_per_s": result.opened / result.wall_s if result.wall_s else math.nan,
            "server_rss0_mib": rss0 / 2**20,
            "server_rss_mib": rss1 / 2**20,
            "server_peak_rss_mib": extra["server_peak_rss_mib"],
            "server_cpu_us_per_open": extra["server_cpu_us_per_step"],
            "bytes_per_session": per_session,
            "state_bytes": raw,
        }

    # ---- 6. scale-out: N processes behind the gateway versus one ----------------------------------------------
    def scale(self) -> list[Row]:
        """The per-session-stream load (``scale_sessions`` sessions) against ``rnnserve serve --workers 1`` and
        ``--workers N`` behind the nginx gateway, both on a throwaway redis-server with ``--durability
        every-step`` (what ``--workers`` requires), and against one plain server on the same store (no gateway),
        which separates the store's cost from the gateway hop's."""
        from rnnserve import gateway

        missing = [] if shutil.which("redis-server") else ["redis-server"]
        try:
            gateway.find_nginx()
        except FileNotFoundError:
            missing.append("nginx")
        if missing:
            raise PhaseSkipped(
                f"{' and '.join(missing)} not installed (`apt-get install redis-server nginx` installs both)"
            )
        cfg = self.cfg
        n, workers = cfg.scale_sessions, cfg.scale_workers
        steps = cfg.steps_for(n)
        rows = []
        redis = procs.RedisServer(self.workdir).start()
        try:
            self.progress.log(f"  redis-server on port {redis.port} (pid {redis.pid})")
            store = ["--session-store", redis.url(0), "--durability", "every-step"]
            direct = procs.rnnserve_server(
                self.repository, self.workdir, tag="scale-direct", max_sessions=n + 64, extra=[*store, *cfg.server_args]
            )
            with self.server(direct) as srv, _StatsClient(srv.address, self.model.name) as stats:
                label = f"N={n}, 1 process, no gateway"
                spec = self._spec(srv.address, "rnnserve", n, steps=steps)
                result, extra = self._run_load(
                    f"scale {label}", spec, srv, stats=stats.get, others={"store": [redis.pid]}
                )
                rows.append(_scale_row(label, spec, result, extra, processes=1, gateway=False))
            for count, db in ((1, 1), (workers, 2)):
                supervisor = procs.rnnserve_workers(
                    self.repository,
                    self.workdir,
                    tag=f"scale-{count}",
                    workers=count,
                    store_url=redis.url(db),
                    max_sessions=n + 64,
                    extra=cfg.server_args,
                )
                with self.server(supervisor) as sup:
                    _wait_ready(sup.address, self.model.name, timeout=30)
                    addresses = sup.worker_addresses()
                    with _StatsClient(addresses, self.model.name) as stats:
                        label = f"N={n}, {count} worker{'s' if count > 1 else ''} + gateway"
                        spec = self._spec(sup.address, "rnnserve", n, steps=steps)
                        result, extra = self._run_load(
                            f"scale {label}",
                            spec,
                            sup,
                            stats=stats.get,
                            pids=sup.workers(),
                            others={"gateway": sup.gateway(), "store": [redis.pid]},
                        )
                    rows.append(_scale_row(label, spec, result, extra, processes=count, gateway=True))
        finally:
            redis.stop()
        return rows


def _cpu(pids: Sequence[int]) -> float:
    """CPU seconds of ``pids`` together (a process gone meanwhile counts 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += procs.cpu_seconds(pid)
    return total


def _wait_ready(address: str, model: str, timeout: float) -> None:
    """Until ListModels answers through ``address`` (the supervisor names the gateway's port as nginx starts)."""
    import grpc

    from rnnserve.proto import rnnserve_pb2 as pb
    from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        while True:
            try:
                models = stub.ListModels(pb.ListModelsRequest(), timeout=2)
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise PhaseError(f"{address} did not answer within {timeout:.0f} s: {exc}") from None
                time.sleep(0.1)
                continue
            if not any(m.name == model for m in models.models):
                raise PhaseError(f"{address} does not serve {model!r}")
            return


def _scale_row(
    label: str, spec: LoadSpec, result: LoadResult, extra: dict[str, Any], *, processes: int, gateway: bool
) -> Row:
    row = _load_row("scale", label, spec, result, extra, phase="sessions")
    row.update(processes=processes, gateway=gateway, session_store="redis, durability every-step")
    return row


class _StatsClient:
    """GetStats for one model from the bench process (sync channels; this process sends no load). Several
    addresses (the workers behind a gateway, each asked directly): their counters summed."""

    def __init__(self, address: str | Sequence[str], model: str):
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.model = model

    def __enter__(self) -> _StatsClient:
        import grpc

        from rnnserve.proto import rnnserve_pb2 as pb
        from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc

        self._channels = [grpc.insecure_channel(a) for a in self.addresses]
        self._stubs = [pb_grpc.RnnServeStub(c) for c in self._channels]
        self._request = pb.StatsRequest(model=self.model)
        return self

    def __exit__(self, *exc: object) -> None:
        for channel in self._channels:
            channel.close()

    def get(self) -> Any:
        found = []
        for stub in self._stubs:
            response = stub.GetStats(self._request, timeout=30)
            if response.models:
                found.append(response.models[0])
        if len(self._stubs) == 1:
            return found[0] if found else None
        keys = ("steps", "batches", "compute_ns", "queue_ns")
        return SimpleNamespace(**{k: sum(getattr(m, k) for m in found) for k in keys}) if found else None


def _batch_stats(before: Any, after: Any) -> dict[str, Any]:
    steps = after.steps - before.steps
    batches = after.batches - before.batches
    return {
        "mean_batch": steps / batches if batches else math.nan,
        "model_calls": batches,
        "server_compute_s": (after.compute_ns - before.compute_ns) / 1e9,
        "server_queue_ms_per_step": (after.queue_ns - before.queue_ns) / 1e6 / steps if steps else math.nan,
    }


def _inputs(model: BenchModel, batch: int, rng: np.random.Generator):
    data = random_batch(model.inputs, batch, rng)
    for spec in model.manifest.inputs:
        yield spec.name, data[spec.name], spec


def _load_row(kind: str, label: str, spec: LoadSpec, result: LoadResult, extra: dict[str, Any], *, phase: str) -> Row:
    return {
        "phase": kind,
        "shape": phase,  # sessions / multiplexed / chunked: the message shape (transport rows mirror rnnserve's)
        "label": label,
        "sessions": spec.sessions,
        "steps_per_session": spec.steps,
        "steps_per_message": spec.steps_per_message * min(spec.group, spec.sessions),
        "steps": result.steps,
        "wall_s": result.wall_s,
        "steps_per_s": result.steps_per_s,
        "p50_ms": result.percentile_ms(50),
        "p99_ms": result.percentile_ms(99),
        **extra,
    }
