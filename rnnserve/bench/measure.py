"""The bench's measurements. Servers run on the server CPUs, loads on the load CPUs; each figure is measured
``repeat`` times with the systems alternating (rnnserve, floor, peer, rnnserve, floor, peer, ...), and every
measurement records the load's CPU use so a saturated load can be told from a slow server.

Phases: the compute ceiling (the model in-process at batch 1..max, on a server CPU); ``kserve``, per-session
sequences from Triton's perf_analyzer over the KServe endpoint (rnnserve, the floor, the Triton peer);
``native``, rnnserve's own load generator over the native API (per-session streams, multiplexed StepBatch,
chunked); ``idle``, memory per open session; ``scale``, N worker processes behind the gateway against one.
Each phase returns rows of runs; report.py turns runs into medians, ratios and targets.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np

from rnnserve.bench import perf_analyzer, procs, report
from rnnserve.bench.load import LoadPool, LoadSpec, PhaseError
from rnnserve.bench.model import BenchModel, random_batch
from rnnserve.bench.progress import Progress

Row = dict[str, Any]
Run = dict[str, Any]


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
    repeat: int
    window_ms: int
    server_cpus: list[int]
    load_cpus: list[int]
    pa_max_trials: int = perf_analyzer.MAX_TRIALS
    pa_stability: int = perf_analyzer.STABILITY
    steps: int | None = None
    server_args: list[str] = field(default_factory=list)
    scale_sessions: int = 256
    scale_workers: int = 2
    peer: str | None = None
    available_cpus: list[int] = field(default_factory=list)  # this process's CPUs before the bench pinned it

    def steps_for(self, sessions: int, factor: int = 1) -> int:
        """Timesteps per session of one run with ``sessions``: about ``step_budget * factor`` steps in all."""
        if self.steps:
            return self.steps
        return max(self.min_steps, min(self.max_steps * factor, self.step_budget * factor // max(1, sessions)))

    def chunk_steps(self) -> int:
        """Chunked runs: at least 8 messages per stream, a whole number of chunks."""
        steps = max(self.steps_for(self.chunk_sessions, 4), 8 * self.chunk)
        return (steps // self.chunk) * self.chunk

    def compute_batches(self) -> list[int]:
        sizes = {1 << k for k in range(self.max_batch.bit_length()) if 1 << k <= self.max_batch}
        # The batch sizes the ratios refer to are measured even when they are not powers of two.
        sizes |= {min(n, self.max_batch) for n in (*self.sessions, self.mux_sessions, self.chunk_sessions)}
        return sorted(sizes)

    def scale_cpus(self, workers: int) -> list[int]:
        """CPUs for ``workers`` server processes: the server CPUs first, then CPUs no load runs on, then (on a
        machine without enough of those) the load CPUs."""
        rest = sorted(set(self.available_cpus) | set(self.server_cpus) | set(self.load_cpus))
        order = [*self.server_cpus, *(c for c in rest if c not in self.load_cpus), *self.load_cpus]
        return list(dict.fromkeys(order))[:workers]

    def estimate_s(self) -> float:
        """A rough duration of the whole run, for the first progress line."""
        pa_systems = 3 if self.peer else 2
        # A perf_analyzer run: 3 to max_trials windows (about 5 on a busy 2-core host) plus start and stop.
        pa = len(self.sessions) * self.repeat * pa_systems * (5 * self.window_ms / 1000 + 2.0)
        native = (len(self.sessions) + 2) * self.repeat * 2 * 3.0
        idle = self.repeat * (5.0 + self.idle_sessions / 3000)  # ~30 s per 100,000 opens on 2 cores
        scale = 30.0 + 3 * self.repeat * 4.0
        compute = len(self.compute_batches()) * self.repeat * (self.compute_seconds + 0.1)
        return 30.0 + compute + pa + native + idle + scale + (60.0 if self.peer else 0.0)


class PhaseSkipped(RuntimeError):
    """A phase that cannot run here (a missing program); the reason says what to install."""


class Server(Protocol):
    name: str
    port: int

    @property
    def address(self) -> str: ...

    def pids(self) -> list[int]: ...

    def alive(self) -> bool: ...

    def log_tail(self) -> str: ...

    def stop(self, grace: float = ...) -> None: ...


@dataclass
class System:
    """One server under a load: its name in the report, the process(es) whose CPU counts as its own, and the
    model name and version a KServe client asks for."""

    name: str
    server: Server
    kserve_model: str
    kserve_version: int | None = None  # None: the server's default version
    native_stats: bool = False  # answers rnnserve's GetStats (mean batch of native runs)


class Bench:
    """Runs the phases against one model; holds the pool and whatever servers are up, for cleanup."""

    def __init__(self, model: BenchModel, repository: Path, workdir: Path, cfg: BenchConfig, progress: Progress):
        self.model = model
        self.repository = repository
        self.workdir = workdir
        self.cfg = cfg
        self.progress = progress
        self.pool = LoadPool(cfg.client_procs, cfg.load_cpus)
        self._servers: list[Any] = []
        self._main: tuple[System, System] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.pool.start()

    def close(self) -> None:
        for server in self._servers:
            server.stop(grace=3.0)
        self._servers.clear()
        self._main = None
        self.pool.close()

    def _start(self, server: Any) -> Any:
        self._servers.append(server)
        self.progress.log(f"starting {server.name}")
        return server.start()

    def _stop(self, server: Any) -> None:
        server.stop(grace=3.0)
        if server in self._servers:
            self._servers.remove(server)

    @contextlib.contextmanager
    def server(self, server: Any) -> Iterator[Any]:
        try:
            yield self._start(server)
        finally:
            self._stop(server)

    def main_systems(self) -> tuple[System, System]:
        """rnnserve and the floor on the server CPUs, started once for the kserve and native phases."""
        if self._main is None:
            cfg = self.cfg
            # perf_analyzer leaves its last sequences open when it exits: room for every run's.
            most = max(100_000, 4 * max(*cfg.sessions, cfg.mux_sessions, cfg.chunk_sessions))
            serve = procs.rnnserve_server(
                self.repository,
                self.workdir,
                tag="serve",
                max_sessions=most,
                extra=cfg.server_args,
                cpus=cfg.server_cpus,
            )
            floor = procs.floor_server(self.model.version_dir, self.workdir, cpus=cfg.server_cpus)
            self._main = (
                System("rnnserve", self._start(serve), self.model.name, self.model.version, native_stats=True),
                System("floor", self._start(floor), self.model.name, self.model.version),
            )
        return self._main

    # ---- compute ceiling ----------------------------------------------------------------------------------
    def compute(self) -> list[Row]:
        """The artifact called in-process through the server's own runtime class (same thread settings), on the
        server CPUs: ``repeat`` passes over the batch sizes, each figure a pass's median call."""
        from rnnserve.server.models.runtime import load_runtime

        cfg = self.cfg
        before = os.sched_getaffinity(0)
        # This thread only: onnxruntime with one intra-op thread computes on the calling thread.
        os.sched_setaffinity(0, cfg.server_cpus)
        try:
            runtime = load_runtime(self.model.manifest, self.model.version_dir, device="cpu", threads=1)
            runs: dict[int, list[Run]] = {b: [] for b in cfg.compute_batches()}
            for attempt in range(cfg.repeat):
                for batch in runs:
                    call = _median_call(runtime, self.model, batch, cfg.compute_seconds)
                    runs[batch].append({"call_ms": call * 1e3, "steps_per_s": batch / call})
                    self.progress.log(
                        f"  compute batch {batch} run {attempt + 1}/{cfg.repeat}: {call * 1e3:.3f} ms/call, "
                        f"{batch / call:,.0f} steps/s"
                    )
            del runtime
        finally:
            os.sched_setaffinity(0, before)
        return [report.summarize({"phase": "compute", "label": f"batch {b}", "batch": b}, r) for b, r in runs.items()]

    # ---- per-session sequences through KServe, perf_analyzer's load ----------------------------------------
    def kserve(self) -> list[Row]:
        executable = perf_analyzer.find()
        if executable is None:
            raise PhaseSkipped(perf_analyzer.INSTALL_HINT)
        cfg = self.cfg
        systems = list(self.main_systems())
        peer = None
        if cfg.peer == "triton":
            from rnnserve.bench import triton

            reason = triton.missing()
            if reason is None:
                peer = self._start(triton.TritonPeer(cfg.server_cpus, log=self.workdir / "triton.log"))
                systems.append(System("triton", peer, triton.MODEL))
            else:
                self.progress.log(f"peer triton skipped: {reason}")
        rows = []
        try:
            for n in cfg.sessions:
                runs: dict[str, list[Run]] = {s.name: [] for s in systems}
                for attempt, system in itertools.product(range(cfg.repeat), systems):
                    label = f"kserve N={n} {system.name} run {attempt + 1}/{cfg.repeat}"
                    runs[system.name].append(self._perf_analyzer(executable, system, n, label))
                for system in systems:
                    meta = {"phase": "kserve", "system": system.name, "load": "perf_analyzer", "sessions": n}
                    rows.append(report.summarize({**meta, "label": f"N={n}"}, runs[system.name]))
        finally:
            if peer is not None:
                self._stop(peer)
        return rows

    def _perf_analyzer(self, executable: Path, system: System, concurrency: int, label: str) -> Run:
        cfg = self.cfg
        cmd = perf_analyzer.command(
            executable,
            system.kserve_model,
            system.server.address,
            concurrency,
            cfg.window_ms,
            threads=len(cfg.load_cpus),
            max_trials=cfg.pa_max_trials,
            stability=cfg.pa_stability,
            version=system.kserve_version,
        )
        server = system.server
        with _KServeStats(server.address, system.kserve_model, system.kserve_version) as stats:
            cpu0, counts0 = _cpu(server.pids()), stats.get()
            # Its windows, with the work between them (which grows with the requests it recorded: 1024 sequences
            # on a busy load CPU took a minute for 1 s windows), then its last calls; past that it is stuck.
            timeout = cfg.pa_max_trials * cfg.window_ms / 1000 * 10 + 120
            done = procs.run_measured(cmd, cpus=cfg.load_cpus, timeout=timeout, workdir=self.workdir)
            cpu1, counts1 = _cpu(server.pids()), stats.get()
        run: Run = {
            "load_cpu": report.load_fraction(done.cpu_s, done.wall_s, len(cfg.load_cpus)),
            "load_cpu_s": done.cpu_s,
            "wall_s": done.wall_s,
        }
        try:
            run.update(perf_analyzer.parse(done.output))
        except perf_analyzer.OutputError as exc:
            run["error"] = f"perf_analyzer exited {done.returncode}: {exc}"
        else:
            if done.returncode != 0:
                # Its figures were printed, but it failed after them: the run does not count.
                run["error"] = f"perf_analyzer exited {done.returncode}: {perf_analyzer.error_line(done.output)}"
        # Over the whole perf_analyzer run (its windows, the warm-up between them), as the CPU is counted.
        steps, executions = counts1[0] - counts0[0], counts1[1] - counts0[1]
        if steps > 0:
            run["server_cpu_us_per_step"] = 1e6 * (cpu1 - cpu0) / steps
            run["client_cpu_us_per_step"] = 1e6 * done.cpu_s / steps
            run["mean_batch"] = steps / executions if executions else math.nan
        if not server.alive():
            run["error"] = f"{server.name} died:\n{server.log_tail()}"
        self._log_run(label, run)
        return run

    def _log_run(self, label: str, run: Run) -> None:
        if "error" in run:
            self.progress.log(f"  {label}: ERROR {run['error'].splitlines()[0]}")
            return
        rate = run.get("steps_per_s", run.get("opens_per_s", math.nan))
        line = f"  {label}: {rate:,.0f} {'opens' if 'opens_per_s' in run else 'steps'}/s"
        if "p50_ms" in run:
            line += f", p50 {run['p50_ms']:.3f} ms"
        if "load_cpu" in run:
            line += f", load CPUs {100 * run['load_cpu']:.0f}% busy"
            if report.saturated(run):
                line += " (SATURATED)"
        self.progress.log(line)

    # ---- the native API, rnnserve's own load generator ------------------------------------------------------
    def native(self) -> list[Row]:
        cfg = self.cfg
        systems = self.main_systems()
        plan: list[tuple[str, str, int, dict[str, Any]]] = [
            ("native", f"N={n}", n, {"steps": cfg.steps_for(n)}) for n in cfg.sessions
        ]
        n = cfg.mux_sessions
        plan.append(
            ("multiplexed", f"N={n} StepBatch", n, {"group": n, "columnar": True, "steps": cfg.steps_for(n, 4)})
        )
        n = cfg.chunk_sessions
        plan.append(("chunked", f"N={n} x {cfg.chunk} steps/msg", n, {"chunk": cfg.chunk, "steps": cfg.chunk_steps()}))
        rows = []
        for phase, label, n, shape in plan:
            runs: dict[str, list[Run]] = {s.name: [] for s in systems}
            for attempt, system in itertools.product(range(cfg.repeat), systems):
                target = "rnnserve" if system.native_stats else "echo"
                spec = self._spec(system.server.address, target, n, **shape)
                stats = _StatsClient(system.server.address, self.model.name, self.model.version)
                with stats if system.native_stats else _no_stats() as s:
                    run = self._native_run(spec, system.server, stats=s.get if s else None)
                runs[system.name].append(run)
                self._log_run(f"{phase} {label} {system.name} run {attempt + 1}/{cfg.repeat}", run)
            for system in systems:
                meta = {"phase": phase, "system": system.name, "load": "rnnserve load", "label": label, "sessions": n}
                meta["steps_per_message"] = max(shape.get("chunk", 0), 1) * shape.get("group", 1)
                rows.append(report.summarize(meta, runs[system.name]))
        return rows

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

    def _native_run(
        self,
        spec: LoadSpec,
        server: Any,
        *,
        stats: Callable[[], Any] | None = None,
        pids: Sequence[int] | None = None,
        others: dict[str, Sequence[int]] | None = None,
    ) -> Run:
        """One run of the pool's load against ``server``: steps/s, latency, server and client CPU per step, the
        load CPUs' use and (rnnserve) the mean batch.

        ``pids``: the server's processes (default: ``server.pids()``); ``others``: more processes by role (the
        gateway, the session store), whose CPU per step is reported as ``{role}_cpu_us_per_step``."""
        roles = {"server": list(pids) if pids is not None else server.pids(), **(others or {})}
        cpu0: dict[str, float] = {}
        cpu1: dict[str, float] = {}
        snapshots: list[Any] = []

        def on_start() -> None:
            cpu0.update({role: _cpu(ids) for role, ids in roles.items()})
            snapshots.append(stats() if stats else None)

        def on_done() -> None:
            cpu1.update({role: _cpu(ids) for role, ids in roles.items()})
            snapshots.append(stats() if stats else None)

        try:
            result = self.pool.run(spec, on_start=on_start, on_done=on_done)
        except PhaseError as exc:
            # A stuck or dead generator leaves the pool in an unknown state: start it afresh.
            self.pool.restart()
            return {"error": str(exc)}
        if not server.alive():
            return {"error": f"{server.name} died:\n{server.log_tail()}"}
        count = result.steps or result.opened
        run: Run = {
            "wall_s": result.wall_s,
            "load_cpu": report.load_fraction(result.client_cpu_s, result.wall_s, len(self.cfg.load_cpus)),
            "client_cpu_us_per_step": 1e6 * result.client_cpu_s / count if count else math.nan,
        }
        for role in roles:
            key = "server_cpu_us_per_step" if role == "server" else f"{role}_cpu_us_per_step"
            run[key] = 1e6 * (cpu1[role] - cpu0[role]) / count if count else math.nan
        if spec.kind == "open":
            run["opened"] = result.opened
            run["opens_per_s"] = result.opened / result.wall_s if result.wall_s else math.nan
            return run
        run.update(
            steps=result.steps,
            steps_per_s=result.steps_per_s,
            p50_ms=result.percentile_ms(50),
            p99_ms=result.percentile_ms(99),
        )
        if snapshots and snapshots[0] is not None and snapshots[-1] is not None:
            steps = snapshots[-1].steps - snapshots[0].steps
            batches = snapshots[-1].batches - snapshots[0].batches
            run["mean_batch"] = steps / batches if batches else math.nan
        return run

    # ---- idle capacity ------------------------------------------------------------------------------------
    def idle(self) -> Row:
        cfg = self.cfg
        runs = []
        for attempt in range(cfg.repeat):
            server = procs.rnnserve_server(
                self.repository,
                self.workdir,
                tag="idle",
                max_sessions=cfg.idle_sessions + 64,
                extra=["--session-ttl", "86400", *cfg.server_args],
                cpus=cfg.server_cpus,
            )
            with self.server(server) as srv:
                # Warm the server up (first model call, gRPC buffers) so the baseline holds everything but sessions.
                warm = self._native_run(self._spec(srv.address, "rnnserve", 1, steps=5), srv)
                if "error" in warm:
                    runs.append(warm)
                    continue
                rss0 = procs.memory(srv.pid)["VmRSS"]
                spec = self._spec(srv.address, "rnnserve", cfg.idle_sessions, kind="open")
                run = self._native_run(spec, srv)
                time.sleep(0.2)  # let the allocator settle before reading RSS
                if "error" not in run:
                    rss1 = procs.memory(srv.pid)["VmRSS"]
                    run.update(
                        server_rss0_mib=rss0 / 2**20,
                        server_rss_mib=rss1 / 2**20,
                        bytes_per_session=(rss1 - rss0) / max(1, run["opened"]),
                        server_cpu_us_per_open=run.pop("server_cpu_us_per_step"),
                    )
                    run.pop("client_cpu_us_per_step", None)
                    run.pop("load_cpu", None)  # memory per session does not depend on how fast the load opened
            runs.append(run)
            self._log_run(f"idle {cfg.idle_sessions} sessions run {attempt + 1}/{cfg.repeat}", run)
            if "bytes_per_session" in run:
                self.progress.log(f"    {run['bytes_per_session']:,.0f} bytes/session")
        meta = {
            "phase": "idle",
            "system": "rnnserve",
            "label": f"{cfg.idle_sessions} open sessions",
            "sessions": cfg.idle_sessions,
            "state_bytes": self.model.state_bytes,
        }
        return report.summarize(meta, runs)

    # ---- scale-out: N processes behind the gateway versus one ----------------------------------------------
    def scale(self) -> list[Row]:
        """The per-session-stream load (``scale_sessions`` sessions) against ``rnnserve serve --workers 1`` on one
        server CPU and ``--workers N`` on N CPUs, behind the nginx gateway, both on a throwaway redis-server with
        ``--durability every-step`` (what ``--workers`` requires), and against one plain server on the same store
        (no gateway), which separates the store's cost from the gateway hop's. The three deployments are up
        together and measured in turn."""
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
        one_cpu, many_cpus = cfg.scale_cpus(1), cfg.scale_cpus(workers)
        redis = procs.RedisServer(self.workdir, cpus=one_cpu).start()
        deployments: list[tuple[Row, Any, list[str] | None]] = []
        try:
            self.progress.log(f"  redis-server on port {redis.port} (pid {redis.pid})")
            store = ["--session-store", redis.url(0), "--durability", "every-step"]
            direct = procs.rnnserve_server(
                self.repository,
                self.workdir,
                tag="scale-direct",
                max_sessions=n + 64,
                extra=[*store, *cfg.server_args],
                cpus=one_cpu,
            )
            self._start(direct)
            meta = {"label": f"N={n}, 1 process, no gateway", "processes": 1, "gateway": False, "cpus": one_cpu}
            deployments.append((meta, direct, None))
            for count, db, cpus in ((1, 1, one_cpu), (workers, 2, many_cpus)):
                supervisor = procs.rnnserve_workers(
                    self.repository,
                    self.workdir,
                    tag=f"scale-{count}",
                    workers=count,
                    store_url=redis.url(db),
                    max_sessions=n + 64,
                    extra=cfg.server_args,
                    cpus=cpus,
                )
                self._start(supervisor)
                _wait_ready(supervisor.address, self.model.name, timeout=30)
                label = f"N={n}, {count} worker{'s' if count > 1 else ''} + gateway"
                meta = {"label": label, "processes": count, "gateway": True, "cpus": cpus}
                deployments.append((meta, supervisor, supervisor.worker_addresses()))
            runs: list[list[Run]] = [[] for _ in deployments]
            for attempt in range(cfg.repeat):
                for (meta, server, addresses), found in zip(deployments, runs, strict=True):
                    others = {"store": [redis.pid]}
                    if meta["gateway"]:
                        others["gateway"] = server.gateway()
                    spec = self._spec(server.address, "rnnserve", n, steps=cfg.steps_for(n))
                    with _StatsClient(addresses or server.address, self.model.name, self.model.version) as stats:
                        run = self._native_run(spec, server, stats=stats.get, pids=server.pids(), others=others)
                    found.append(run)
                    self._log_run(f"scale {meta['label']} run {attempt + 1}/{cfg.repeat}", run)
            rows = []
            for (meta, _, _), found in zip(deployments, runs, strict=True):
                base = {"phase": "scale", "system": "rnnserve", "load": "rnnserve load", "sessions": n}
                # A machine without enough spare CPUs puts workers next to the load: the row says so.
                base["shares_load_cpus"] = bool(set(meta["cpus"]) & set(cfg.load_cpus))
                row = report.summarize({**base, **meta}, found)
                row["session_store"] = "redis, durability every-step"
                rows.append(row)
            return rows
        finally:
            for _, server, _ in deployments:
                self._stop(server)
            redis.stop()


def _median_call(runtime: Any, model: BenchModel, batch: int, seconds: float) -> float:
    """The median seconds of one call at ``batch``, states fed back as serving does, over about ``seconds``."""
    manifest = model.manifest
    rng = np.random.default_rng(batch)
    data = random_batch(model.inputs, batch, rng)
    feeds = {s.name: np.moveaxis(data[s.name], 0, s.batch_axis) for s in manifest.inputs}
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
        for spec in manifest.states:
            feeds[spec.name] = out[spec.output]
        if len(times) >= 3 and sum(times) >= seconds:
            break
    # The median call: a ceiling should not move with a neighbour's burst on a shared machine.
    return float(np.median(times))


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


@contextlib.contextmanager
def _no_stats() -> Iterator[None]:
    yield None


class _KServeStats:
    """(inference_count, execution_count) of one model version from KServe's ModelStatistics: what every server
    under perf_analyzer answers (rnnserve, the floor, Triton), so their CPU per step and mean batch are counted
    alike. ``version`` None: every version the server reports for the model."""

    def __init__(self, address: str, model: str, version: int | None = None):
        self.address = address
        self.model = model
        self.version = version

    def __enter__(self) -> _KServeStats:
        import grpc

        from rnnserve.proto import kserve_grpc_service_pb2 as kpb

        self._channel = grpc.insecure_channel(self.address)
        # Triton's service name (the generated stub names rnnserve's own proto package).
        self._call = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelStatistics",
            request_serializer=kpb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=kpb.ModelStatisticsResponse.FromString,
        )
        version = "" if self.version is None else str(self.version)
        self._request = kpb.ModelStatisticsRequest(name=self.model, version=version)
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def get(self) -> tuple[int, int]:
        import grpc

        try:
            reply = self._call(self._request, timeout=30)
        except grpc.RpcError:
            return (0, 0)  # no counts: the run reports no server CPU per step
        return (
            sum(m.inference_count for m in reply.model_stats),
            sum(m.execution_count for m in reply.model_stats),
        )


class _StatsClient:
    """GetStats for one model version from the bench process (sync channels; this process sends no load).
    Several addresses (the workers behind a gateway, each asked directly): their counters summed."""

    def __init__(self, address: str | Sequence[str], model: str, version: int):
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.model = model
        self.version = version

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
            # GetStats answers every loaded version of the model; the load steps only the bench's.
            found += [m for m in response.models if m.version == self.version]
        if not found:
            return None
        return SimpleNamespace(steps=sum(m.steps for m in found), batches=sum(m.batches for m in found))
