#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo: export the built-in example models, serve them, stream a demo
# session and print its outputs. Arguments go to `rnnserve demo` (see: scripts/demo.sh --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/rnnserve" demo "$@"
