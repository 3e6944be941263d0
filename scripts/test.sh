#!/usr/bin/env bash
# Set up (scripts/setup.sh), then lint, check the generated gRPC code and configuration page, build the docs,
# check the import layers and the types, then run the tests. Arguments go to pytest:  scripts/test.sh -k deploy -x
# RNNSERVE_SYSTEM_DEPS=1 also installs the system packages tests use (see scripts/setup.sh; .ci/run sets it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/setup.sh"

# The venv's tools, and its `rnnserve` console script for tests that start the server as a subprocess.
export VIRTUAL_ENV="$ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"

step() { printf '\n==> test: %s\n' "$*"; }

step "ruff check ."
ruff check .
step "ruff format --check ."
ruff format --check .

step "python scripts/gen_protos.py --check"
python scripts/gen_protos.py --check

step "python scripts/gen_config_docs.py --check (docs/configuration.md from the server's settings and flags)"
python scripts/gen_config_docs.py --check

step "mkdocs build --strict (the user docs: mkdocs.yml, docs/)"
# Material's banner about MkDocs 2 is advice, not a result; the build fails on any warning of its own.
NO_MKDOCS_2_WARNING=1 mkdocs build --strict  # into site/ (git-ignored)

step "python scripts/lint_imports.py (layer contracts: [tool.importlinter] in pyproject.toml)"
python scripts/lint_imports.py

step "python scripts/typecheck.py (mypy: [tool.mypy] in pyproject.toml)"
python scripts/typecheck.py

step "pytest $*"
exec python -m pytest "$@"
