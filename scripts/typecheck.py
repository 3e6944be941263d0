"""Type-check with mypy ([tool.mypy] in pyproject.toml says which packages, and how strictly).

mypy resolves `rnnserve.client` and the other mapped subpackages only in the package as installed, so it runs
on that layout (scripts/layout.py); its messages name the checkout's files (client/x.py, not rnnserve/client/x.py).

    python scripts/typecheck.py [mypy options]
"""

from __future__ import annotations

import os
import sys

from layout import ROOT, assemble, source_path
from mypy import api


def main() -> int:
    os.chdir(assemble())
    args = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(ROOT / ".mypy_cache"), *sys.argv[1:]]
    out, err, status = api.run(args)
    sys.stdout.write(source_path(out))
    sys.stderr.write(source_path(err))
    return status


if __name__ == "__main__":
    sys.exit(main())
