"""Server processes under test (rnnserve, the echo service, the Triton peer) and what /proc says about them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def reset_peak_rss(pid: int) -> bool:
    """Restart VmHWM from the current RSS (``5`` > /proc/PID/clear_refs), so each phase reports its own
    peak. False where the kernel does not allow it; the peak is then the process's lifetime peak."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class ServerProcess:
    """A server subprocess that writes its port to a file once it listens; stopped on ``stop()``."""

    def __init__(self, name: str, cmd: Sequence[str], port_file: Path, log_file: Path):
        self.name = name
        self.cmd = list(cmd)
        self.port_file = port_file
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
    repository: Path, workdir: Path, *, tag: str, max_sessions: int, extra: Sequence[str] = ()
) -> ServerProcess:
    port_file = workdir / f"{tag}.port"
    cmd = [
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
    return ServerProcess(f"rnnserve serve ({tag})", cmd, port_file, workdir / f"{tag}.log")


def echo_server(manifest_dir: Path, workdir: Path) -> ServerProcess:
    port_file = workdir / "echo.port"
    cmd = [sys.executable, "-m", "rnnserve.bench.echo", "--model-dir", str(manifest_dir), "--port-file", str(port_file)]
    return ServerProcess("echo server", cmd, port_file, workdir / "echo.log")
