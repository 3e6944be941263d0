"""Packaging: one import package, ``rnnserve``, assembled from the top-level folders; a wheel that installs
nothing else at top level; a console script; a base install (the client) that needs only its declared
dependencies."""

from __future__ import annotations

import configparser
import email
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS: dict[str, Any] = PYPROJECT["tool"]["setuptools"]
NAME: str = PYPROJECT["project"]["name"]
VERSION: str = PYPROJECT["project"]["version"]


def package_folders() -> dict[str, Path]:
    """Every folder holding Python modules under the package roots, by the package name it installs as."""
    found: dict[str, Path] = {}
    for package, folder in SETUPTOOLS["package-dir"].items():
        root = ROOT / folder
        for module in root.rglob("*.py"):
            if "__pycache__" in module.parts:
                continue
            rel = module.parent.relative_to(root)
            found[".".join([package, *rel.parts])] = module.parent
    return found


def source_folder(package: str) -> Path:
    """Where setuptools looks for ``package``: the longest package-dir prefix, then the dotted rest."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in SETUPTOOLS["package-dir"]:
            return ROOT / SETUPTOOLS["package-dir"][prefix] / Path(*parts[i:])
    return ROOT / Path(*parts)


def test_every_package_folder_is_listed() -> None:
    listed = set(SETUPTOOLS["packages"])
    folders = package_folders()
    # setuptools ships only the listed packages: a folder left out is silently missing from the wheel.
    assert sorted(set(folders) - listed) == [], "add these to [tool.setuptools] packages in pyproject.toml"
    for package in sorted(listed):
        folder = source_folder(package)
        assert (folder / "__init__.py").is_file(), f"{package}: expected {folder.relative_to(ROOT)}/__init__.py"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a clean copy of the sources (a stale build/ in the checkout cannot leak in)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", PYPROJECT["project"]["readme"]):
        shutil.copy(ROOT / name, src / name)
    for folder in set(SETUPTOOLS["package-dir"].values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("*.whl")
    return path


def dist_info(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(f"{NAME}-{VERSION}.dist-info/{name}").decode()


def test_wheel_installs_only_the_rnnserve_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {NAME, f"{NAME}-{VERSION}.dist-info"}, f"unexpected top-level entries: {sorted(top)}"
    for package in SETUPTOOLS["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    # The generated gRPC code is checked in and shipped: an install needs no grpcio-tools.
    assert {"rnnserve/proto/rnnserve_pb2.py", "rnnserve/proto/rnnserve_pb2_grpc.py"} <= set(names)


def test_wheel_has_the_console_script(wheel: Path) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(dist_info(wheel, "entry_points.txt"))
    assert entry_points["console_scripts"]["rnnserve"].strip() == "rnnserve.cli:main"


def test_heavy_dependencies_are_extras_only(wheel: Path) -> None:
    """``pip install rnnserve`` (the client) pulls no torch, onnx, onnxruntime or pydantic."""
    metadata = email.message_from_string(dist_info(wheel, "METADATA"))
    base = [r for r in metadata.get_all("Requires-Dist", []) if "extra ==" not in r]
    heavy = re.compile(r"^(torch|onnx|onnxruntime|onnxruntime-gpu|onnxscript|pydantic|pydantic-settings)\b", re.I)
    assert [r for r in base if heavy.match(r)] == []
    assert {"cpu", "gpu", "server", "export", "dev"} <= set(metadata.get_all("Provides-Extra", []))


# Runs in a subprocess on the unpacked wheel: every module of an installed distribution outside the base
# install's dependency closure is blocked, so the client has exactly what `pip install rnnserve` would give.
BASE_INSTALL_ONLY = textwrap.dedent(
    """
    import importlib.metadata as md
    import re
    import sys

    wheel_dir, address = sys.argv[1], sys.argv[2]

    def name_of(requirement):
        return re.match(r"[A-Za-z0-9._-]+", requirement)[0].lower().replace("_", "-")

    allowed, todo = set(), [name_of(r) for r in sys.argv[3:]]
    while todo:
        dist = todo.pop()
        if dist in allowed:
            continue
        allowed.add(dist)
        for req in md.distribution(dist).requires or []:
            if "extra ==" not in req:
                todo.append(name_of(req))

    providers = md.packages_distributions()
    blocked = {
        module
        for module, dists in providers.items()
        if module != "rnnserve" and not {d.lower().replace("_", "-") for d in dists} & allowed
    }

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"{name} is not a dependency of the base install")
            return None

    sys.meta_path.insert(0, Block())
    sys.path.insert(0, wheel_dir)
    import rnnserve.client
    from rnnserve.cli import main

    assert rnnserve.__file__.startswith(wheel_dir), rnnserve.__file__
    assert main(["health", "--address", address]) == 0
    assert main(["models", "--address", address]) == 0
    print("base install ok")
    """
)


def test_client_runs_on_the_base_install(
    wheel: Path,
    tmp_path: Path,
    server_factory: Callable[..., Any],
    tiny_repository: Path,
) -> None:
    """The client SDK and ``rnnserve health``/``models`` (what a container healthcheck runs) work with only
    the dependencies the wheel declares for a plain ``pip install rnnserve``."""
    server = server_factory(tiny_repository)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path)
    metadata = email.message_from_string(dist_info(wheel, "METADATA"))
    base = [r for r in metadata.get_all("Requires-Dist", []) if "extra ==" not in r]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", BASE_INSTALL_ONLY, str(tmp_path), server.address, *base],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,  # not the checkout: its rnnserve/ folder must not shadow the wheel's
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "base install ok" in done.stdout
