"""``--peer triton``: Triton's sequence batcher on the same LSTM, and rnnserve's KServe endpoint on the same
model, both driven by the peer's own load generator (tritonclient), so the client is identical.

Needs the venv that ``PEER_DIR/setup.sh`` builds (``/tmp/venv-triton``); never part of CI. The peer's
``load.py`` multiplexes all sequences over one stream with its own (tritonclient) client, so its numbers sit
next to ours for comparison; server CPU per step is the fairest column (see the peer's README).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from rnnserve.bench.progress import Progress

DEFAULT_PEER_DIR = Path(os.environ.get("RNNSERVE_TRITON_PEER", "/work/shared/peers/triton"))
DEFAULT_VENV = Path(os.environ.get("VENV", "/tmp/venv-triton"))
# (sessions, steps per session): the peer README's table
RUNS = ((64, 500), (256, 150))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PEER_MODEL = "lstm_step"  # the name the peer's load.py asks for


def _missing(peer_dir: Path, venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists() or not (peer_dir / "serve.sh").exists():
        return f"no {python} (run {peer_dir}/setup.sh first)"
    return None


def _load(
    python: Path,
    peer_dir: Path,
    port: int,
    pid: int,
    sessions: int,
    steps: int,
    timeout: float,
    label: str,
    check: bool = True,
) -> dict[str, Any]:
    """One run of the peer's load generator against ``port``; a row for the report. ``check=False``: skip
    the reference check (the echo answers zeros)."""
    cmd = [
        str(python),
        str(peer_dir / "load.py"),
        "--url",
        f"127.0.0.1:{port}",
        "--sessions",
        str(sessions),
        "--steps",
        str(steps),
        "--server-pid",
        str(pid),
        "--timeout",
        str(timeout),
        *(() if check else ("--no-check",)),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120)
        rec = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired as exc:
        return {"phase": "peer", "label": label, "sessions": sessions, "error": f"load.py: {exc}"}
    except (json.JSONDecodeError, IndexError):
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"phase": "peer", "label": label, "sessions": sessions, "error": f"load.py failed: {why[:300]}"}
    if rec.get("errors"):
        return {"phase": "peer", "label": label, "sessions": sessions, "error": f"load.py: {rec['errors'][:1]}"}
    cpu = rec.get("server_cpu_s")
    return {
        "phase": "peer",
        "label": label,
        "sessions": sessions,
        "steps_per_session": steps,
        "steps_per_s": rec["steps_per_s"],
        "p50_ms": rec["p50_ms"],
        "p99_ms": rec["p99_ms"],
        "server_cpu_us_per_step": 1e6 * cpu / (sessions * steps) if cpu is not None else None,
        "mean_batch": rec.get("server_mean_batch"),
        "max_abs_err": rec.get("max_abs_err"),
        "client_cpu_s": rec.get("client_cpu_s"),
    }


def _newest(repository: Path, model: str) -> Path:
    return max((p for p in (repository / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _runs(
    progress: Progress, server: Any, name: str, peer_dir: Path, venv: Path, timeout: float, check: bool
) -> list[dict[str, Any]]:
    """The peer's RUNS against a started server process, which is stopped afterwards."""
    rows = []
    try:
        for sessions, steps in RUNS:
            label = f"{name} N={sessions}"
            progress.log(f"  peer {label}, {steps} steps each")
            python = venv / "bin" / "python"
            rows.append(_load(python, peer_dir, server.port, server.pid, sessions, steps, timeout, label, check))
            if "steps_per_s" in rows[-1]:
                progress.log(f"  peer {label}: {rows[-1]['steps_per_s']:,.0f} steps/s")
    finally:
        server.stop()
    return rows


def rnnserve_rows(
    progress: Progress,
    repository: Path,
    model: str,
    workdir: Path,
    *,
    peer_dir: Path = DEFAULT_PEER_DIR,
    venv: Path = DEFAULT_VENV,
    timeout: float = 300.0,
) -> list[dict[str, Any]]:
    """The peer's own load generator (tritonclient: ModelStreamInfer with sequence ids) against rnnserve's
    KServe endpoint, serving the bench model under the peer's model name: the identical client for both
    servers, as the rows of ``triton_rows`` use. load.py checks the outputs against its own torch reference."""
    reason = _missing(peer_dir, venv)
    if reason is not None:
        progress.log(f"peer rnnserve (tritonclient) skipped: {reason}")
        return [{"phase": "peer", "label": "rnnserve (tritonclient)", "error": reason}]
    from rnnserve.bench.procs import rnnserve_server
    from rnnserve.manifest import ModelManifest

    target = workdir / "peer-repository" / PEER_MODEL / "1"
    shutil.rmtree(target.parent, ignore_errors=True)
    shutil.copytree(_newest(repository, model), target)
    manifest = ModelManifest.read(target)
    manifest.model_copy(update={"name": PEER_MODEL, "version": 1}).write(target)
    server = rnnserve_server(target.parent.parent, workdir, tag="peer-rnnserve", max_sessions=100_000).start()
    return _runs(progress, server, "rnnserve (tritonclient)", peer_dir, venv, timeout, check=True)


def echo_rows(
    progress: Progress,
    repository: Path,
    model: str,
    workdir: Path,
    *,
    peer_dir: Path = DEFAULT_PEER_DIR,
    venv: Path = DEFAULT_VENV,
    timeout: float = 300.0,
) -> list[dict[str, Any]]:
    """The floor: the bench's echo service answering ModelStreamInfer without a model (rnnserve/bench/echo.py),
    under the same tritonclient load. No Python gRPC server can do better with this client on this machine."""
    reason = _missing(peer_dir, venv)
    if reason is not None:
        return [{"phase": "peer", "label": "echo (tritonclient)", "error": reason}]
    from rnnserve.bench.procs import echo_server

    server = echo_server(_newest(repository, model), workdir, kserve_model=PEER_MODEL).start()
    return _runs(progress, server, "echo (tritonclient)", peer_dir, venv, timeout, check=False)


def triton_rows(
    progress: Progress, *, peer_dir: Path = DEFAULT_PEER_DIR, venv: Path = DEFAULT_VENV, timeout: float = 300.0
) -> list[dict[str, Any]]:
    python = venv / "bin" / "python"
    reason = _missing(peer_dir, venv)
    if reason is not None:
        progress.log(f"peer triton skipped: {reason}")
        return [{"phase": "peer", "label": "triton", "error": reason}]
    port = _free_port()
    progress.log(f"starting tritonserver on port {port}")
    started = subprocess.run(
        [str(peer_dir / "serve.sh"), str(port)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "VENV": str(venv)},
    )
    if started.returncode != 0:
        return [{"phase": "peer", "label": "triton", "error": f"serve.sh failed: {started.stderr.strip()[-500:]}"}]
    pid = int(started.stdout.strip().splitlines()[-1])
    rows = []
    try:
        for sessions, steps in RUNS:
            label = f"triton N={sessions}"
            progress.log(f"  peer {label}, {steps} steps each")
            rows.append(_load(python, peer_dir, port, pid, sessions, steps, timeout, label))
            if "steps_per_s" in rows[-1]:
                progress.log(f"  peer {label}: {rows[-1]['steps_per_s']:,.0f} steps/s")
    finally:
        # serve.sh starts tritonserver with setsid: its process group also holds the Python backend stub.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    return rows
