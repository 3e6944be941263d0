"""Where a model's version folders are, for names and versions that come from requests.

A request names a model and a version; neither may lead outside the repository: a name is one path
component in the manifest's name alphabet (so no ``..``, no ``/``), and a folder that resolves outside the
repository (a symlink out) is refused rather than loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from rnnserve.server.errors import InvalidArgument, ModelNotFound, echo

# The manifest's own rule for model names (rnnserve.manifest.ModelManifest.name).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or len(name) > 255:
        raise InvalidArgument(
            f"model name {echo(name)!r} is not a valid name: letters, digits, '_', '.', '-', starting with a letter or "
            "digit (one folder of the repository)"
        )
    return name


def check_version(version: int) -> int:
    if version < 0:
        raise InvalidArgument(f"version {version} is not valid: give a version number >= 1, or 0 for every version")
    return version


def inside(root: Path, path: Path) -> bool:
    """``path`` resolves (symlinks followed) to somewhere under ``root``."""
    return root.resolve() in path.resolve().parents


def version_dirs(root: Path, name: str, version: int = 0) -> dict[int, Path]:
    """The version folders of ``name`` (one when ``version`` is given), checked to lie inside ``root``.

    Raises InvalidArgument for names, versions or folders that point outside the repository, and
    ModelNotFound when there is no such folder.
    """
    check_name(name)
    check_version(version)
    model_dir = root / name
    if model_dir.exists() and not inside(root, model_dir):
        raise InvalidArgument(f"model folder {name!r} resolves outside the repository; refusing to load it")
    if not model_dir.is_dir():
        raise ModelNotFound(f"the repository {root} has no model folder {name!r}")
    if version:
        candidates = {version: model_dir / str(version)}
        if not candidates[version].is_dir():
            there = sorted(_scan(model_dir))
            raise ModelNotFound(f"the repository has no folder {name}/{version}; version folders there: {there}")
    else:
        candidates = _scan(model_dir)
        if not candidates:
            raise ModelNotFound(f"model folder {name!r} has no version folders (REPO/{name}/VERSION/)")
    for v, path in candidates.items():
        if not inside(root, path):
            raise InvalidArgument(f"version folder {name}/{v} resolves outside the repository; refusing to load it")
    return candidates


def _scan(model_dir: Path) -> dict[int, Path]:
    return {int(p.name): p for p in sorted(model_dir.iterdir()) if p.is_dir() and p.name.isdigit() and int(p.name) > 0}


def all_version_dirs(root: Path) -> dict[tuple[str, int], Path]:
    """Every ``NAME/VERSION`` folder inside ``root`` (folders that resolve outside it are left out)."""
    found: dict[tuple[str, int], Path] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not _NAME.fullmatch(model_dir.name):
            continue
        for version, path in _scan(model_dir).items():
            if inside(root, path):
                found[(model_dir.name, version)] = path
    return found
