"""`rnnserve demo` (what ./scripts/demo.sh runs) works end to end: export, a real server process, a stream per
step model and Predict for a whole-sequence one, nothing left behind; an unknown example is a usage error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from export_support import rnnserve_cli


def test_demo_streams_and_matches_eager(tmp_path: Path):
    repo = tmp_path / "repo"
    scratch = tmp_path / "tmp"  # the demo's TMPDIR: the folders it makes there must be gone when it ends
    scratch.mkdir()
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
            "--model",
            "bilstm_classifier",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "== elman_tanh" in done.stdout and "== lstm_proj_classifier" in done.stdout
    # The whole-sequence example goes through Predict: 4 sequences of at most --steps tokens.
    assert "== bilstm_classifier: a whole-sequence model (Predict, no session)" in done.stdout
    assert "max |server - eager PyTorch| over 4 sequences" in done.stdout
    assert "OK: every output equals eager PyTorch" in done.stdout
    assert (repo / "elman_tanh" / "1" / "manifest.json").is_file()
    assert "[1/3] exporting 3 example(s)" in done.stderr
    # No folder left behind (a dependency keeps one small file of its own there, reused by every run).
    assert [p.name for p in scratch.iterdir() if p.is_dir()] == []


def test_demo_names_the_known_examples_for_an_unknown_one(tmp_path: Path):
    done = rnnserve_cli("demo", "--repository", str(tmp_path), "--model", "gru3")
    assert done.returncode == 2
    assert "argument --model: invalid choice: 'gru3' (choose from" in done.stderr and "'gru2'" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
