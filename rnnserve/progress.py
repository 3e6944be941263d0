"""Progress on stderr for long commands (``rnnserve export --all-examples``, ``rnnserve bench``): a rich progress
bar under the lines when stderr is a terminal, plain lines otherwise, so logs, pipes and CI get text they can
read and grep. Without rich installed a terminal gets the plain lines too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO


def wants_bar(stream: TextIO) -> bool:
    """A person watches ``stream``: a terminal that can redraw a line (not TERM=dumb)."""
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class Progress:
    """Lines ``{prefix}{message}`` on ``stream`` (default: stderr at the time of each write), and ``bar()`` for
    work of a known number of steps. ``prefix`` may be a function, called for each line (e.g. elapsed time)."""

    def __init__(self, prefix: str | Callable[[], str] = "", *, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self._prefix = prefix
        self._stream = stream
        self._live: Any = None  # the rich Progress while a bar is shown: lines go through its console

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def _line(self, message: str) -> str:
        prefix = self._prefix() if callable(self._prefix) else self._prefix
        return f"{prefix}{message}"

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            # Printed above the bar, which stays the last line.
            self._live.console.print(self._line(message), markup=False, highlight=False, soft_wrap=True)
        else:
            print(self._line(message), file=self.stream, flush=True)

    @contextlib.contextmanager
    def bar(self, title: str, total: int) -> Iterator[Callable[[str], None]]:
        """``with progress.bar("phase", 5) as start: start("kserve") ...``: each ``start(name)`` begins the next
        of ``total`` steps. On a terminal a bar counts them (its description naming the step); otherwise each
        start is a line ``{title} {k}/{total}: {name}``."""
        live = self._rich(title, total) if self.enabled and self._live is None and wants_bar(self.stream) else None
        done = -1

        def start(name: str) -> None:
            nonlocal done
            done += 1
            if live is None:
                self.log(f"{title} {done + 1}/{total}: {name}")
                return
            progress, task = live
            progress.update(task, completed=done, description=f"{title}: {name}")

        if live is None:
            yield start
            return
        progress, task = live
        self._live = progress
        progress.start()
        try:
            yield start
            progress.update(task, completed=total, description=f"{title}: done")
        finally:
            progress.stop()
            self._live = None

    def _rich(self, title: str, total: int) -> tuple[Any, Any] | None:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
        except ImportError:
            return None
        progress = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=self.stream),
            # Other writers (a library's warning, a subprocess sharing stderr) print above the bar too.
            redirect_stdout=False,
            redirect_stderr=True,
            # Few redraws: the bench's own process shares the load CPUs with the loads it measures.
            refresh_per_second=2,
        )
        return progress, progress.add_task(title, total=total)
