"""scripts/setup.sh: one Python minimum everywhere, and a .venv whose install failed (or whose Python is too old)
is replaced on the next run instead of reused.

The script runs for real in a throwaway checkout beside it (its own pyproject.toml, a one-module ``rnnserve``),
so nothing touches the project's .venv; those checkouts declare a dependency that does not exist, so the
install fails the way a broken one does and the script never gets as far as perf_analyzer.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MIN_PYTHON = re.fullmatch(r">=\s*(3\.\d+)", PYPROJECT["project"]["requires-python"]).group(1)  # type: ignore[union-attr]

# A package pip cannot find, so that the install fails after the .venv exists.
FAILING_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "rnnserve"
version = "0.0.0"
dependencies = ["rnnserve-setup-test-no-such-distribution==1"]

[project.optional-dependencies]
dev = []

[tool.setuptools]
packages = ["rnnserve"]
"""


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, root / "scripts" / "setup.sh")
    (root / "pyproject.toml").write_text(FAILING_PYPROJECT)
    (root / "constraints.txt").write_text("")
    (root / "rnnserve").mkdir()
    (root / "rnnserve" / "__init__.py").write_text("")
    return root


def _setup(root: Path, python: str) -> subprocess.CompletedProcess[str]:
    """Run the checkout's setup.sh with ``PYTHON=python``, outside the tests' virtual environment."""
    keep = ("HOME", "PYENV_ROOT", "PIP_", "SSL_CERT", "REQUESTS_CA", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    env = {k: v for k, v in os.environ.items() if k.upper().startswith(keep)}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", PYTHON=python)
    return subprocess.run(
        ["bash", str(root / "scripts" / "setup.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )


def _base_python() -> str:
    """The interpreter behind the tests' venv: a checkout's .venv is made from a real Python, not a venv's."""
    return str(Path(sys.base_prefix) / "bin" / "python3")


def _old_python() -> str | None:
    """A Python older than the minimum, if this machine has one (pyenv keeps several)."""
    major, minor = map(int, MIN_PYTHON.split("."))
    name = f"python{major}.{minor - 1}"
    candidates = [
        shutil.which(name),
        *sorted(glob.glob(str(Path.home() / f".pyenv/versions/{major}.{minor - 1}*/bin/{name}"))),
    ]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "import venv, ensurepip"], capture_output=True).returncode == 0:
            return candidate
    return None


def test_one_python_minimum_everywhere() -> None:
    setup_min = re.search(r"^MIN_PYTHON=(\S+)$", SETUP.read_text(), re.M)
    assert setup_min and setup_min.group(1) == MIN_PYTHON, "scripts/setup.sh MIN_PYTHON != requires-python"
    image = re.search(r"^ARG PYTHON_IMAGE=python:(3\.\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert image and image.group(1) == MIN_PYTHON, "the Dockerfile's Python is not the minimum"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + MIN_PYTHON.replace(".", "")
    assert PYPROJECT["tool"]["mypy"]["python_version"] == MIN_PYTHON
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    mentions = {(p.name, v) for p in docs if p.is_file() for v in re.findall(r"Python (3\.\d+)", p.read_text())}
    assert {v for _, v in mentions} <= {MIN_PYTHON}, sorted(mentions)


def test_a_venv_whose_install_failed_is_replaced_on_the_next_run(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    first = _setup(root, _base_python())
    assert first.returncode != 0
    assert "rnnserve-setup-test-no-such-distribution" in first.stdout + first.stderr
    assert "rerun this script: it replaces" in first.stderr
    venv = root / ".venv"
    assert (venv / "bin" / "python").is_file()
    left_behind = venv / "left-behind-by-the-failed-install"
    left_behind.write_text("")

    second = _setup(root, _base_python())
    assert "replacing" in second.stdout and "no install has completed in it" in second.stdout, second.stdout
    assert not left_behind.exists()
    assert second.returncode != 0  # the dependency is still missing


def test_a_too_old_python_is_refused_and_a_venv_of_one_replaced(tmp_path: Path) -> None:
    old = _old_python()
    if old is None:
        pytest.skip(f"no Python older than {MIN_PYTHON} on this machine")
    root = _checkout(tmp_path)
    refused = _setup(root, old)
    assert refused.returncode == 1
    assert f"rnnserve needs Python {MIN_PYTHON}+" in refused.stderr
    assert not (root / ".venv").exists()

    # A .venv of the old Python with a completed install (as an earlier setup accepting it left one).
    subprocess.run([old, "-m", "venv", str(root / ".venv")], check=True, timeout=120)
    (root / ".venv" / ".rnnserve-setup").write_text("an install made by an older setup.sh\n")
    replaced = _setup(root, _base_python())
    assert f"replacing {root / '.venv'}: its Python does not run or is older than {MIN_PYTHON}" in replaced.stdout
    version = subprocess.run(
        [str(root / ".venv" / "bin" / "python"), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
    )
    assert tuple(map(int, version.stdout.split("."))) >= tuple(map(int, MIN_PYTHON.split(".")))
