"""``--peer triton``: Triton's sequence batcher on the same LSTM, driven by the peer's own load generator.

Needs the venv that ``PEER_DIR/setup.sh`` builds (``/tmp/venv-triton``); never part of CI. The peer's
``load.py`` multiplexes all sequences over one stream with its own (tritonclient) client, so its numbers sit
next to ours for comparison; server CPU per step is the fairest column (see the peer's README).
"""

from __future__ import annotations

import contextlib
import json
import os
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


def triton_rows(
    progress: Progress, *, peer_dir: Path = DEFAULT_PEER_DIR, venv: Path = DEFAULT_VENV, timeout: float = 300.0
) -> list[dict[str, Any]]:
    python = venv / "bin" / "python"
    if not python.exists() or not (peer_dir / "serve.sh").exists():
        reason = f"no {python} (run {peer_dir}/setup.sh first)"
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
            ]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120)
                rec = json.loads(done.stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
                rows.append({"phase": "peer", "label": label, "sessions": sessions, "error": f"load.py: {exc}"})
                continue
            cpu = rec.get("server_cpu_s")
            rows.append(
                {
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
            )
            progress.log(f"  peer {label}: {rec['steps_per_s']:,.0f} steps/s")
    finally:
        # serve.sh starts tritonserver with setsid: its process group also holds the Python backend stub.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    return rows
