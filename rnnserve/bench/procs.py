"""Server processes under test (rnnserve, the floor, the Triton peer), the CPUs they run on, and what /proc
says about them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_cpus(text: str) -> list[int]:
    """``0``, ``0,2`` or ``0-3,6`` (taskset's list form) as sorted CPU numbers."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if lo < 0 or hi < lo:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(lo, hi + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return sorted(cpus)


def cpu_list(cpus: Sequence[int]) -> str:
    """CPU numbers as taskset writes them: ``0-3,6``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def pinned(cpus: Sequence[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` putting a child on ``cpus`` before it execs, so every thread it starts inherits them
    (setting a running process's affinity moves only its main thread)."""
    if not cpus:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def _live(field: int, value: int) -> list[int]:
    """Live processes whose /proc/PID/stat ``field`` (counted after the command name: 1 ppid, 2 pgrp) is
    ``value``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (a server started with setsid and its helpers)."""
    return _live(2, pgid)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of every thread of ``pid`` so far (/proc/PID/stat utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in bytes."""
    result = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                result[key] = int(value.split()[0]) * 1024
    return result


class ServerProcess:
    """A server subprocess that writes its port to a file once it listens; stopped on ``stop()``."""

    def __init__(
        self, name: str, cmd: Sequence[str], port_file: Path, log_file: Path, cpus: Sequence[int] | None = None
    ):
        self.name = name
        self.cmd = list(cmd)
        self.port_file = port_file
        self.log_file = log_file
        self.cpus = list(cpus) if cpus else None
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The processes whose CPU counts as the server's."""
        return [self.pid]

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.port_file.unlink(missing_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            # Own session: a Ctrl-C in the terminal reaches the bench, which stops the server itself
            # (the server's own SIGINT drain would otherwise race the bench's cleanup).
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=pinned(self.cpus),  # only sched_setaffinity: safe in the child
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text:
                self.port = int(text)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before listening:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not listen within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)


def rnnserve_server(
    repository: Path,
    workdir: Path,
    *,
    tag: str,
    max_sessions: int,
    extra: Sequence[str] = (),
    cpus: Sequence[int] | None = None,
) -> ServerProcess:
    port_file = workdir / f"{tag}.port"
    cmd = _serve_command(repository, port_file, max_sessions, extra)
    return ServerProcess(f"rnnserve serve ({tag})", cmd, port_file, workdir / f"{tag}.log", cpus)


def _serve_command(repository: Path, port_file: Path, max_sessions: int, extra: Sequence[str]) -> list[str]:
    """``rnnserve serve`` on a free loopback port, as every bench server runs (1 intra-op thread, short grace)."""
    return [
        sys.executable,
        "-m",
        "rnnserve.cli",
        "serve",
        "--repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--max-sessions",
        str(max_sessions),
        "--intra-op-threads",
        "1",
        "--grace",
        "0.5",
        "--log-level",
        "WARNING",
        *extra,
    ]


def floor_server(manifest_dir: Path, workdir: Path, *, cpus: Sequence[int] | None = None) -> ServerProcess:
    """The floor: ``rnnserve.bench.echo``, a bare grpc.aio server answering the same RPCs without a model."""
    port_file = workdir / "floor.port"
    cmd = [sys.executable, "-m", "rnnserve.bench.echo", "--model-dir", str(manifest_dir), "--port-file", str(port_file)]
    return ServerProcess("floor (bare grpc.aio)", cmd, port_file, workdir / "floor.log", cpus)


# ---- the multi-process row: `rnnserve serve --workers N --gateway-port P` on a throwaway redis-server ---------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    return _live(1, pid)


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot): with the pid, it names one process (pids are reused)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, persisting nothing (the bench's session store)."""

    def __init__(self, workdir: Path, binary: str = "redis-server", cpus: Sequence[int] | None = None):
        self.binary = binary
        self.workdir = workdir
        self.cpus = cpus
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        import socket

        self.port = free_port()
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(self.workdir)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=pinned(self.cpus),  # only sched_setaffinity: safe in the child
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)


class Supervisor(ServerProcess):
    """``rnnserve serve --workers N --gateway-port P``: its port file names the gateway's port. ``workers()`` and
    ``gateway()`` find its worker and nginx processes in /proc; ``stop()`` gives it time to drain them, then
    kills any of them (by pid, as recorded at start) that outlived it."""

    min_grace = 30.0

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        port_file: Path,
        log_file: Path,
        workers: int,
        cpus: Sequence[int] | None = None,
    ):
        super().__init__(name, cmd, port_file, log_file, cpus)
        self.expected_workers = workers
        self._descendants: dict[int, int | None] = {}

    def start(self, timeout: float = 120.0) -> Supervisor:
        super().start(timeout)
        self._descendants = {pid: start_time(pid) for pid in self.workers() + self.gateway()}
        if len(self.workers()) != self.expected_workers:
            self.stop()
            raise RuntimeError(f"{self.name}: expected {self.expected_workers} workers, found {self.workers()}")
        return self

    def workers(self) -> list[int]:
        return [p for p in children(self.pid) if any("rnnserve.cli" in a for a in cmdline(p))]

    def pids(self) -> list[int]:
        return self.workers()

    def gateway(self) -> list[int]:
        """nginx's master and worker processes."""
        masters = [p for p in children(self.pid) if any("nginx" in a for a in cmdline(p)[:1])]
        return masters + [c for m in masters for c in children(m)]

    def worker_addresses(self) -> list[str]:
        """Each worker's own address (from the port file named on its command line)."""
        out = []
        for pid in self.workers():
            args = cmdline(pid)
            port_file = Path(args[args.index("--port-file") + 1])
            out.append(f"127.0.0.1:{int(port_file.read_text().split()[0])}")
        return out

    def stop(self, grace: float = 5.0) -> None:
        super().stop(max(grace, self.min_grace))
        for pid, started in self._descendants.items():
            if started is not None and start_time(pid) == started:  # the supervisor died before stopping it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._descendants = {}


def rnnserve_workers(
    repository: Path,
    workdir: Path,
    *,
    tag: str,
    workers: int,
    store_url: str,
    max_sessions: int,
    extra: Sequence[str] = (),
    cpus: Sequence[int] | None = None,
) -> Supervisor:
    """``workers`` rnnserve processes behind the nginx gateway (on a free port), sharing ``store_url`` with
    ``--durability every-step``: the deployment the scale-out design runs on one machine."""
    port_file = workdir / f"{tag}.port"
    scale_out = ["--workers", str(workers), "--gateway-port", str(free_port())]
    scale_out += ["--session-store", store_url, "--durability", "every-step"]
    cmd = _serve_command(repository, port_file, max_sessions, [*scale_out, *extra])
    name = f"rnnserve serve --workers {workers} + gateway ({tag})"
    return Supervisor(name, cmd, port_file, workdir / f"{tag}.log", workers, cpus)


class Measured:
    """A finished command: its exit code, output (stdout and stderr together), CPU seconds and wall seconds."""

    def __init__(self, returncode: int, output: str, cpu_s: float, wall_s: float):
        self.returncode = returncode
        self.output = output
        self.cpu_s = cpu_s
        self.wall_s = wall_s


def run_measured(cmd: Sequence[str], *, cpus: Sequence[int] | None, timeout: float, workdir: Path) -> Measured:
    """Run ``cmd`` on ``cpus`` to its end; its CPU time comes from wait4's resource usage (all its threads),
    which /proc no longer shows once it exited. Killed after ``timeout`` seconds (returncode -9)."""
    import tempfile

    with tempfile.TemporaryFile(dir=workdir) as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pinned(cpus),  # only sched_setaffinity: safe in the child
        )
        deadline = t0 + timeout
        while True:
            # Reaped here, not by Popen.wait, which would drop the resource usage.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return Measured(proc.returncode, text, usage.ru_utime + usage.ru_stime, wall)
