"""Where Triton's ``perf_analyzer`` (the C++ KServe/Triton load generator) is on this machine.

``scripts/setup.sh`` installs it into ``.tools/perf_analyzer/`` of the checkout (a venv of its own plus a
wrapper that puts the CUDA runtime library it links on ``LD_LIBRARY_PATH``). ``RNNSERVE_PERF_ANALYZER`` names
another executable; otherwise ``perf_analyzer`` on ``PATH`` is used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV = "RNNSERVE_PERF_ANALYZER"
CHECKOUT_PATH = Path(__file__).resolve().parents[2] / ".tools" / "perf_analyzer" / "perf_analyzer"
INSTALL_HINT = (
    "perf_analyzer not found: run scripts/setup.sh --system in a checkout (it installs Debian's libb64-0d and "
    f"tritonclient 2.51.0's perf_analyzer into .tools/perf_analyzer/), or set {ENV} to its path"
)


def find() -> Path | None:
    """The perf_analyzer executable to run, or None when there is none."""
    named = os.environ.get(ENV)
    if named:
        path = Path(named)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    if CHECKOUT_PATH.is_file() and os.access(CHECKOUT_PATH, os.X_OK):
        return CHECKOUT_PATH
    found = shutil.which("perf_analyzer")
    return Path(found) if found else None


# The field's standard sequence load (Triton's own recipe): one gRPC stream per sequence, 100-step sequences,
# measurement windows repeated until 3 in a row agree within STABILITY percent, at most MAX_TRIALS windows.
SEQUENCE_LENGTH = 100
MAX_TRIALS = 6
STABILITY = 50


def command(
    executable: Path | str,
    model: str,
    address: str,
    concurrency: int,
    window_ms: int,
    *,
    threads: int = 1,
    max_trials: int = MAX_TRIALS,
    stability: int = STABILITY,
    version: int | None = None,
) -> list[str]:
    """perf_analyzer in sequence mode over gRPC streams, ``concurrency`` sequences in flight, driven by
    ``threads`` worker threads: one per load CPU. With 4 or more (its default is 4) this perf_analyzer build
    hangs, growing without bound, once a fast server answers 192+ streamed sequences; one thread per CPU has
    the load's CPUs as busy and never did. ``version`` (``-x``): the model version (None: the server's
    default, its newest)."""
    return [
        str(executable),
        "-m",
        model,
        "-u",
        address,
        "-i",
        "grpc",
        "--streaming",
        "--sequence-length",
        str(SEQUENCE_LENGTH),
        "--concurrency-range",
        str(concurrency),
        "-p",
        str(window_ms),
        "-r",
        str(max_trials),
        "-s",
        str(stability),
        "--max-threads",
        str(threads),
        *(["-x", str(version)] if version is not None else []),
    ]


class OutputError(ValueError):
    """perf_analyzer's output holds no measurement (it failed before one, or its format changed)."""


def parse(text: str) -> dict[str, float]:
    """The figures of the last measurement perf_analyzer printed: ``steps_per_s`` (its Throughput),
    ``p50_ms``/``p99_ms`` (client-side latency) and ``count`` (requests in the measured windows)."""
    block = text.rsplit("Request concurrency:", 1)
    if len(block) != 2:
        raise OutputError(f"no measurement in perf_analyzer's output: {_last_line(text)}")
    found: dict[str, float] = {}
    wanted = {
        "Throughput:": ("steps_per_s", 1.0),
        "p50 latency:": ("p50_ms", 1e-3),
        "p99 latency:": ("p99_ms", 1e-3),
        "Request count:": ("count", 1.0),
    }
    for line in block[1].splitlines():
        line = line.strip()
        for prefix, (key, scale) in wanted.items():
            if line.startswith(prefix) and key not in found:
                value = line[len(prefix) :].split()[0]
                try:
                    found[key] = float(value) * scale
                except ValueError:
                    raise OutputError(f"unexpected perf_analyzer line: {line!r}") from None
    missing = [prefix for prefix, (key, _) in wanted.items() if key not in found]
    if missing:
        raise OutputError(f"perf_analyzer's output lacks {', '.join(missing)}: {_last_line(text)}")
    return found


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def error_line(text: str) -> str:
    """What perf_analyzer said went wrong: its first line starting with ``error``/``Failed``, else its last."""
    for line in text.splitlines():
        if line.strip().lower().startswith(("error", "failed", "thread [")):
            return line.strip()
    return _last_line(text)
