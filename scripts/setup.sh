#!/usr/bin/env bash
# Set up the development environment: .venv (system python3, 3.11+) with rnnserve installed editable and the
# dev extras (which pull the server and export extras). Idempotent: a second run only checks, and reinstalls
# when pyproject.toml or constraints.txt changed since the last install (or with --force). A .venv that no
# install has completed in (the last one failed, or it was made by hand) or whose Python is too old is
# replaced by a new one.
#
#   scripts/setup.sh [--system] [--force]
#     --system   also install the system packages some tests use (redis-server, nginx, and libb64-0d for
#                perf_analyzer) with apt-get when they are missing and we are root; same as
#                RNNSERVE_SYSTEM_DEPS=1. .ci/run turns it on.
# It also installs Triton's perf_analyzer into .tools/perf_analyzer/ (a venv of its own) once libb64 is there.
#     --force    reinstall the Python packages even when nothing changed.
#   PYTHON=python3.12 scripts/setup.sh   picks another interpreter for a new .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

system="${RNNSERVE_SYSTEM_DEPS:-0}"
force=0
for arg in "$@"; do
  case "$arg" in
    --system) system=1 ;;
    --force) force=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '==> setup: %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
# pyproject.toml's requires-python: the one minimum (tests/system/test_setup.py checks they agree).
MIN_PYTHON=3.11
# The checks use the venv's own interpreter: "is it 3.11+" must hold for what we run, not only for $PYTHON.
version_ok="import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))"
# The stamp records what the last successful install was made from. It is removed before each install and
# written after it succeeds, so a .venv without one holds an install that failed half-way (or was not made
# by this script): it is replaced rather than patched.
stamp="$VENV/.rnnserve-setup"

# --- 1. the virtual environment --------------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "$version_ok" 2>/dev/null && [[ -f "$stamp" ]]; then
  say "using $VENV ($("$VENV/bin/python" --version))"
else
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python $MIN_PYTHON+ (Debian: apt-get install python3 python3-venv)"
  "$PYTHON" -c "$version_ok" || die "$PYTHON is $("$PYTHON" --version 2>&1); rnnserve needs Python $MIN_PYTHON+ (set PYTHON=...)"
  # Debian/Ubuntu split venv's pip bootstrap (ensurepip) into python3-venv; without it `python3 -m venv`
  # fails half-way and leaves a .venv with no pip, so check first and say what to install.
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    minor="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    die "$PYTHON cannot create virtual environments (no ensurepip). On Debian/Ubuntu run: apt-get install python3-venv (or python${minor}-venv), then rerun this script."
  fi
  # A .venv that exists but does not run, runs a Python that is too old, or has no completed install is
  # replaced, not patched.
  if [[ -e "$VENV" ]]; then
    if [[ -f "$stamp" ]]; then
      say "replacing $VENV: its Python does not run or is older than $MIN_PYTHON"
    else
      say "replacing $VENV: no install has completed in it (the last one failed, or it was not made by this script)"
    fi
    rm -rf "$VENV"
  fi
  say "creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable)') ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv "$VENV"
  # The pip that ensurepip bundles can be years old; a current one reads the constraints/extras the same way
  # everywhere.
  say "upgrading pip in $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

# --- 2. the Python packages ------------------------------------------------------------------------------
# The stamp's content says what the last successful install was made from; the import check catches a venv
# whose editable install points at another checkout (e.g. a copied .venv).
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
installed_here() {
  "$VENV/bin/python" - "$ROOT" <<'PY' 2>/dev/null
import pathlib, sys
import rnnserve
sys.exit(pathlib.Path(rnnserve.__file__).resolve().parent.parent != pathlib.Path(sys.argv[1]).resolve())
PY
}
if [[ "$force" == 1 || "$(cat "$stamp" 2>/dev/null)" != "$want" ]] || ! installed_here; then
  # -c constraints.txt pins torch to the CPU build on this machine's disk; without it pip resolves torch to
  # a multi-GB CUDA build.
  say "pip install -c constraints.txt -e '.[dev]'"
  rm -f "$stamp"
  "$VENV/bin/python" -m pip install --progress-bar off -c constraints.txt -e '.[dev]' \
    || die "pip install failed (output above); after fixing the cause rerun this script: it replaces $VENV"
  echo "$want" >"$stamp"
else
  say "rnnserve[dev] already installed (pyproject.toml and constraints.txt unchanged; --force reinstalls)"
fi

# --- 3. optional system packages -------------------------------------------------------------------------
if [[ "$system" == 1 ]]; then
  missing=()
  # nginx lives in /usr/sbin, which is not on every user's PATH.
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
  # perf_analyzer (step 4) links libb64.
  ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' || missing+=(libb64-0d)
  if [[ ${#missing[@]} -eq 0 ]]; then
    say "system packages present: redis-server nginx libb64-0d"
  elif [[ "$(id -u)" != 0 ]]; then
    say "NOTE: missing ${missing[*]}; not root, so skipping. Run: sudo apt-get install -y ${missing[*]}"
  elif ! command -v apt-get >/dev/null; then
    say "NOTE: missing ${missing[*]} and no apt-get here; install them with the system's package manager"
  else
    say "apt-get install -y ${missing[*]}"
    # Debian starts a package's daemon on install. Tests start their own instances on free ports, so keep
    # the system ones (port 80, 6379) from starting: policy-rc.d exiting 101 forbids it. Only ours is removed.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e "$policy" ]]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

# --- 4. Triton's perf_analyzer (tests and `rnnserve bench` use it as the KServe load) ---------------------
# The PyPI `perf-analyzer` wheels need glibc 2.38+ (Debian 12 has 2.36: pip falls back to an empty placeholder).
# tritonclient 2.51.0's manylinux1 wheel still carries bin/perf_analyzer; it needs libb64 (Debian: libb64-0d)
# and libcudart.so.12 (PyPI: nvidia-cuda-runtime-cu12; it only has to load, no GPU is used). It gets a venv of
# its own because that tritonclient pins packages the project's venv has newer.
PA_DIR="$ROOT/.tools/perf_analyzer"
# It has no --help: an unknown option prints the usage (and exits 1), which shows that the binary loads.
pa_runs() { [[ -x "$PA_DIR/perf_analyzer" ]] && [[ "$("$PA_DIR/perf_analyzer" --help 2>&1 || true)" == *--concurrency-range* ]]; }
if pa_runs; then
  say "perf_analyzer present: $PA_DIR/perf_analyzer"
elif ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
  say "NOTE: perf_analyzer not installed: it needs libb64-0d (apt-get install libb64-0d, or rerun with --system)"
else
  say "installing perf_analyzer into $PA_DIR"
  rm -rf "$PA_DIR"
  "$PYTHON" -m venv "$PA_DIR/venv"
  "$PA_DIR/venv/bin/python" -m pip install --quiet --progress-bar off "tritonclient==2.51.0" nvidia-cuda-runtime-cu12
  cudart="$("$PA_DIR/venv/bin/python" -c 'import nvidia.cuda_runtime as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')"
  cat >"$PA_DIR/perf_analyzer" <<WRAP
#!/bin/sh
# Runs tritonclient 2.51.0's perf_analyzer with the CUDA runtime library it links (no GPU is used).
LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$PA_DIR/venv/bin/perf_analyzer" "\$@"
WRAP
  chmod +x "$PA_DIR/perf_analyzer"
  pa_runs || die "perf_analyzer does not run: $PA_DIR/perf_analyzer"
  say "perf_analyzer: $PA_DIR/perf_analyzer"
fi

say "done. Activate with: source .venv/bin/activate"
