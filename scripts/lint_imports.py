"""Check the import-linter contracts of pyproject.toml ([tool.importlinter]): which layer may import which.

import-linter finds a package's modules by walking its folder, but `rnnserve` is assembled from several
top-level folders ([tool.setuptools] package-dir: rnnserve.server = server/, ...). So this builds that package
once as a tree of symlinks in a temporary folder and lints there, checking every subpackage as installed.

    python scripts/lint_imports.py [--verbose]
"""

from __future__ import annotations

import os
import sys
import tempfile
import tomllib
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def assemble(pyproject: dict, into: Path) -> None:
    """Lay out the `rnnserve` package under ``into`` as setuptools installs it, from symlinks to the sources."""
    package_dir: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    top = into / "rnnserve"
    top.mkdir()
    for entry in (ROOT / package_dir["rnnserve"]).iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for name, folder in package_dir.items():
        if name != "rnnserve":
            # Nested names (rnnserve.a.b) would need their parent laid out first; the mapping has none today.
            assert name.count(".") == 1, f"{name}: only rnnserve.<name> mappings are supported"
            (top / name.split(".", 1)[1]).symlink_to(ROOT / folder)


def main() -> int:
    config = ROOT / "pyproject.toml"
    pyproject = tomllib.loads(config.read_text())
    with tempfile.TemporaryDirectory(prefix="rnnserve-imports-") as tmp:
        assemble(pyproject, Path(tmp))
        # lint_imports puts the working directory first on sys.path: it must be the assembled tree, not the
        # checkout, whose rnnserve/ folder lacks the mapped subpackages.
        os.chdir(tmp)
        return lint_imports(
            config_filename=str(config), no_cache=True, no_logo=True, verbose="--verbose" in sys.argv[1:]
        )


if __name__ == "__main__":
    sys.exit(main())
