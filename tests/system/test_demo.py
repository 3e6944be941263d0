"""`rnnserve demo` (what ./scripts/demo.sh runs) works end to end: export, a real server process, a stream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_streams_and_matches_eager(tmp_path: Path):
    repo = tmp_path / "repo"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve.cli",
            "demo",
            "--repository",
            str(repo),
            "--steps",
            "4",
            "--model",
            "elman_tanh",
            "--model",
            "lstm_proj_classifier",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== elman_tanh" in done.stdout and "== lstm_proj_classifier" in done.stdout
    assert "OK: every streamed output equals eager PyTorch" in done.stdout
    assert (repo / "elman_tanh" / "1" / "manifest.json").is_file()
    assert "[1/3] exporting 2 example(s)" in done.stderr
