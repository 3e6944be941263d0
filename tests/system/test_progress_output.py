"""``rnnserve export --all-examples`` progress: plain lines when stderr is a pipe (logs, CI), a bar counting the
models when stderr is a terminal (a pseudo-terminal here); stdout lists the written versions either way."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

from rnnserve.examples import EXAMPLES, SEQUENCE_EXAMPLES

NAMES = [*EXAMPLES, *SEQUENCE_EXAMPLES]


def _command(repository: Path) -> list[str]:
    return [sys.executable, "-m", "rnnserve.cli", "export", "--all-examples", "--repository", str(repository)]


def _quick(command: list[str]) -> list[str]:
    return [*command, "--steps", "5", "--batch-sizes", "1", "--version", "1", "--overwrite"]


def test_plain_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    env = {**os.environ, "TERM": "xterm"}  # a terminal type alone does not make a pipe a terminal
    done = subprocess.run(_quick(_command(tmp_path)), capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\x1b" not in done.stderr and all(line.startswith("rnnserve export: ") for line in lines), done.stderr
    counted = [line for line in lines if line.startswith("rnnserve export: example ")]
    assert counted == [f"rnnserve export: example {i}/{len(NAMES)}: {n} (onnx)" for i, n in enumerate(NAMES, 1)]
    assert done.stdout.split() == [str(tmp_path / name / "1") for name in NAMES]


def test_a_bar_when_stderr_is_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    env = {**os.environ, "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    try:
        done = subprocess.run(
            _quick(_command(tmp_path)), stdout=subprocess.PIPE, stderr=slave, text=True, timeout=300, env=env
        )
    finally:
        os.close(slave)
        reader.join(30)
        os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, shown
    # The bar, redrawn with control codes, counted every model; the lines of each export are there above it.
    total = len(NAMES)
    assert "\x1b[" in shown and f"{total}/{total}" in shown and "example: done" in shown, shown
    assert shown.count("rnnserve export: wrote ") == total
    assert f"example 1/{total}:" not in shown  # the bar, not the plain count lines
    assert done.stdout.split() == [str(tmp_path / name / "1") for name in NAMES]
