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
