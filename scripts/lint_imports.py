"""Check the import-linter contracts of pyproject.toml ([tool.importlinter]): which layer may import which.

import-linter finds a package's modules by walking its folder, so it runs on the package as installed
(scripts/layout.py), with every subpackage in place.

    python scripts/lint_imports.py [--verbose]
"""

from __future__ import annotations

import os
import sys

from importlinter.cli import lint_imports
from layout import ROOT, assemble


def main() -> int:
    # lint_imports puts the working directory first on sys.path: it must be the assembled package, not the
    # checkout, whose rnnserve/ folder lacks the mapped subpackages.
    os.chdir(assemble())
    return lint_imports(
        config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True, verbose="--verbose" in sys.argv[1:]
    )


if __name__ == "__main__":
    sys.exit(main())
