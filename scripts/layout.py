"""The `rnnserve` package laid out as installed, for tools that find modules by walking folders.

`rnnserve` is assembled from several top-level folders ([tool.setuptools] package-dir in pyproject.toml:
rnnserve.server = server/, rnnserve.client = client/, ...). The editable install maps them with an import hook
that import-linter and mypy do not run, so they would see `rnnserve` without its subpackages. `assemble()` builds
that package as a tree of symlinks to the sources, in a fixed place (build/layout) so that mypy's cache stays
valid from one run to the next.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "build" / "layout"


def wanted_links() -> dict[str, Path]:
    """Name under LAYOUT/rnnserve -> the source it links to, from pyproject.toml's package-dir."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    links = {e.name: e for e in (ROOT / package_dir["rnnserve"]).iterdir() if e.name != "__pycache__"}
    for name, folder in package_dir.items():
        if name != "rnnserve":
            # Nested names (rnnserve.a.b) would need their parent laid out first; the mapping has none.
            assert name.count(".") == 1, f"{name}: only rnnserve.<name> mappings are supported"
            links[name.split(".", 1)[1]] = ROOT / folder
    return links


def assemble() -> Path:
    """Bring LAYOUT/rnnserve up to date with the sources and return LAYOUT (the folder to put on sys.path).
    Links are replaced atomically, so two runs at once both see a whole package."""
    top = LAYOUT / "rnnserve"
    top.mkdir(parents=True, exist_ok=True)
    links = wanted_links()
    for entry in top.iterdir():
        if entry.name not in links:
            entry.unlink()
    for name, target in links.items():
        link = top / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        staged = top / f".{name}.{os.getpid()}"
        staged.symlink_to(target)
        os.replace(staged, link)
    return LAYOUT


def source_path(text: str) -> str:
    """Rewrite paths under the layout in a tool's output (rnnserve/client/x.py) to the checkout's (client/x.py)."""
    for name, target in sorted(wanted_links().items(), key=lambda item: -len(item[0])):
        rel = target.relative_to(ROOT).as_posix()
        text = text.replace(f"rnnserve/{name}", rel)
    return text
