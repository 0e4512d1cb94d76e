#!/usr/bin/env bash
# Builds the kernel library (csrc/, no torch) and its C++ tests with CMake and runs them with
# CTest. The CUDA kernels and their tests are built when nvcc is found (they skip without a GPU;
# SCOPE_KERNELS_CUDA=OFF leaves them out).
#   tools/run_cpp_tests.sh [--build-dir DIR] [extra ctest arguments]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build/cpp
if [ "${1:-}" = "--build-dir" ]; then BUILD=$2; shift 2; fi
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
mkdir -p "$BUILD"
cmake -S "$ROOT/csrc" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DSCOPE_KERNELS_CUDA="${SCOPE_KERNELS_CUDA:-ON}" >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; exit 1; }
grep "scope_kernels:" "$BUILD/configure.log" || true
cmake --build "$BUILD" -j "$(nproc)"
ctest --test-dir "$BUILD" --output-on-failure "$@"
