"""rnnserve.progress: plain lines where no one watches a terminal, a rich bar under the lines where someone does."""

from __future__ import annotations

import io
import os
import pty

import pytest

from rnnserve.progress import Progress, wants_bar


def test_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress("p: ", stream=out)
    progress.log("first")
    with progress.bar("step", 2) as start:
        start("x")
        progress.log("during x")
        start("y")
    assert out.getvalue().splitlines() == ["p: first", "p: step 1/2: x", "p: during x", "p: step 2/2: y"]
    assert "\x1b" not in out.getvalue()  # no terminal control codes in a log


def test_disabled_says_nothing() -> None:
    out = io.StringIO()
    progress = Progress("p: ", enabled=False, stream=out)
    progress.log("first")
    with progress.bar("step", 1) as start:
        start("x")
    assert out.getvalue() == ""


def test_prefix_is_computed_per_line() -> None:
    out = io.StringIO()
    count = iter(range(10))
    progress = Progress(lambda: f"[{next(count)}] ", stream=out)
    progress.log("a")
    progress.log("b")
    assert out.getvalue() == "[0] a\n[1] b\n"


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("NO_COLOR", raising=False)
    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        assert wants_bar(terminal)
        progress = Progress("p: ", stream=terminal)
        with progress.bar("step", 2) as start:
            start("x")
            progress.log("during x")
            start("y")
        progress.log("after")
    finally:
        terminal.close()
        shown = _read_all(master)
        os.close(master)
    # The bar (redrawn in place with control codes) counted both steps; the lines are there, in order, above it.
    assert "\x1b[" in shown and "2/2" in shown and "step: done" in shown, shown
    assert shown.index("p: during x") < shown.index("p: after")
    assert "step 1/2: x" not in shown  # the bar, not the plain lines


def test_who_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setenv("TERM", "xterm")
        assert wants_bar(terminal) and not wants_bar(io.StringIO())
        monkeypatch.setenv("TERM", "dumb")  # a terminal that cannot redraw a line
        assert not wants_bar(terminal)
    os.close(master)
    assert not wants_bar(terminal)  # closed
