#!/usr/bin/env bash
# The project's test command (README quick start, CI): set up, then run the whole suite.
# Extra arguments go to pytest, e.g. tools/run_tests.sh -k kl
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SCOPE_VENV:-$ROOT/.venv}
"$ROOT/tools/setup_env.sh"
cd "$ROOT"
"$VENV/bin/python" -m pytest "$@"
