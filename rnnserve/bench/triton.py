"""``--peer triton``: the Triton peer (``PEER_DIR``: tritonserver 2.51 with the sequence batcher and the same
LSTM in its Python backend), started pinned to the server CPUs as the peer's ``pinned.sh`` runs it, so the
bench drives it with the identical perf_analyzer command it sends rnnserve and the floor.

Needs the venv that ``PEER_DIR/setup.sh`` builds (``/tmp/venv-triton``); never part of CI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from rnnserve.bench import procs

DEFAULT_PEER_DIR = Path(os.environ.get("RNNSERVE_TRITON_PEER", "/work/shared/peers/triton"))
DEFAULT_VENV = Path(os.environ.get("VENV", "/tmp/venv-triton"))
MODEL = "lstm_step"  # the peer's name for the LSTM


def missing(peer_dir: Path = DEFAULT_PEER_DIR, venv: Path = DEFAULT_VENV) -> str | None:
    """Why the peer cannot run here, or None."""
    python = venv / "bin" / "python"
    if not (peer_dir / "serve.sh").exists():
        return f"no Triton peer at {peer_dir} (set RNNSERVE_TRITON_PEER)"
    if not python.exists():
        return f"no {python} (run {peer_dir}/setup.sh first)"
    return None


class TritonPeer:
    """tritonserver started by the peer's ``serve.sh`` (own process group: the server and its Python backend
    stub, whose CPU is the server's)."""

    name = "Triton peer"

    def __init__(
        self,
        cpus: Sequence[int] | None,
        *,
        peer_dir: Path = DEFAULT_PEER_DIR,
        venv: Path = DEFAULT_VENV,
        log: Path | None = None,
    ):
        self.cpus = list(cpus) if cpus else None
        self.peer_dir = peer_dir
        self.venv = venv
        self.log = log
        self.port = 0
        self.pid = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return procs.group_pids(self.pid)

    def start(self, timeout: float = 240.0) -> TritonPeer:
        self.port = procs.free_port()
        cmd = [str(self.peer_dir / "serve.sh"), str(self.port)]
        if self.log is not None:
            cmd.append(str(self.log))
        started = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "VENV": str(self.venv)},
            preexec_fn=procs.pinned(self.cpus),  # only sched_setaffinity: safe in the child
        )
        if started.returncode != 0:
            raise RuntimeError(f"{self.peer_dir}/serve.sh failed: {started.stderr.strip()[-500:]}")
        self.pid = int(started.stdout.strip().splitlines()[-1])
        return self

    def alive(self) -> bool:
        return bool(self.pid) and bool(procs.group_pids(self.pid))

    def log_tail(self) -> str:
        return ""

    def stop(self, grace: float = 5.0) -> None:
        if not self.pid:
            return
        # serve.sh starts tritonserver with setsid: its process group also holds the Python backend stub.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while procs.group_pids(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.pid = 0
