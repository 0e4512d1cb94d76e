#!/usr/bin/env bash
# The project's test command (README quick start, CI): set up, then run the C++ kernel tests
# (CTest) and the Python suite (pytest); fails if either fails. Extra arguments go to pytest,
# e.g. tools/run_tests.sh -k kl
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SCOPE_VENV:-$ROOT/.venv}
"$ROOT/tools/setup_env.sh"
cd "$ROOT"
status=0
echo "== C++ kernel tests (CMake + CTest)"
"$ROOT/tools/run_cpp_tests.sh" || status=1
echo "== Python tests (pytest)"
"$VENV/bin/python" -m pytest "$@" || status=1
exit $status
