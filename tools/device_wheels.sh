#!/usr/bin/env bash
# Downloads, on this machine, the Python 3.12 wheels the GPU machine lacks for
# `GPU_CHECK_TRAIN=1 tools/gpu_check.sh` into .whl/ (git-ignored): megatron-core 0.19.x, which
# needs only torch, numpy and packaging (all present there). Carry the folder with the call
# (carry: [".whl"]); gpu_check.sh installs whatever it finds in .whl/ first.
#
#   tools/device_wheels.sh            # then: GPU_CHECK_TRAIN=1 tools/gpu_check.sh on the device
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$ROOT/.whl"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$ROOT/.whl" "${MEGATRON_CORE_SPEC:-megatron-core>=0.19,<0.20}"
ls -la "$ROOT/.whl"
