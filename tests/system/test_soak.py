"""A bounded soak: waves of sessions open, stream, and then close or expire, against a real ``rnnserve serve``
process. After warm-up the server's RSS must stay flat and every session must be gone at the end.

About 60 s by default; ``RNNSERVE_SOAK_SECONDS=600`` soaks longer (the bounds stay the same).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_INPUT

from rnnserve.client import Client

SOAK_SECONDS = float(os.environ.get("RNNSERVE_SOAK_SECONDS", "60"))
TTL = 1.0
SESSIONS_PER_WAVE = 24
STEPS_PER_SESSION = 16
MAX_GROWTH_BYTES = 15 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wave(address: str, seed: int) -> None:
    """One client's wave: open sessions, stream each, close half and let the rest expire."""
    rng = np.random.default_rng(seed)
    with Client(address, timeout=30) as client:
        for i in range(SESSIONS_PER_WAVE):
            s = client.session("gru" if i % 2 else "gru_ts")
            xs = rng.standard_normal((STEPS_PER_SESSION, TINY_INPUT)).astype(np.float32)
            assert len(list(s.stream(xs, window=4))) == STEPS_PER_SESSION
            if i % 2:
                s.close()  # the others are left to expire
        if seed % 3 == 0:  # some waves use unary steps and chunks too
            with client.session("gru") as s:
                s.step(np.zeros(TINY_INPUT, np.float32))
                s.step_chunk(np.zeros((4, TINY_INPUT), np.float32))


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_SECONDS * 3) + 120)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_soak_memory_is_flat(tiny_repository, tmp_path):
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = ["serve", "--repository", str(tiny_repository), "--host", "127.0.0.1", "--port", "0"]
    argv += ["--port-file", str(port_file), "--session-ttl", str(TTL), "--log-level", "WARNING"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnserve.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        start = time.monotonic()
        warm_until = start + min(20.0, SOAK_SECONDS / 3)
        baseline = None
        seed = 0
        samples = []
        while time.monotonic() - start < SOAK_SECONDS:
            with ThreadPoolExecutor(3) as pool:
                for done in [pool.submit(wave, address, seed + i) for i in range(3)]:
                    done.result()  # a failed wave fails the test
            seed += 3
            if baseline is None and time.monotonic() >= warm_until:
                time.sleep(TTL * 2)  # let the warm-up's sessions expire too
                baseline = rss_bytes(proc.pid)
            samples.append(rss_bytes(proc.pid))
        time.sleep(TTL * 3)  # every session left open expires
        with Client(address, timeout=30) as client:
            stats = client.stats()
            assert stats.open_sessions == 0
            assert stats.expired_sessions > 0
            assert sum(m.steps for m in stats.models) >= seed * SESSIONS_PER_WAVE * STEPS_PER_SESSION
        end = rss_bytes(proc.pid)
        assert baseline is not None
        growth = end - baseline
        print(
            f"soak {SOAK_SECONDS:.0f}s, {seed} waves: RSS baseline {baseline / 2**20:.1f} MiB,"
            f" end {end / 2**20:.1f} MiB, peak {max(samples) / 2**20:.1f} MiB, growth {growth / 2**20:+.2f} MiB"
        )
        assert growth < MAX_GROWTH_BYTES, f"RSS grew {growth / 2**20:.1f} MiB after warm-up"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
