#!/usr/bin/env bash
# Sets up the project's Python environment and builds the C++ (and, where possible, CUDA)
# extension. Idempotent: a second run with unchanged sources does nothing.
#
#   SCOPE_VENV=path   virtual environment to create/use (default: .venv in the repository);
#                     it sees the system's site-packages, so an installed torch (GPU machines,
#                     containers) is used as is.
#   PYTHON=python3    interpreter that creates the venv.
#
# torch: an importable torch is kept; otherwise torch==2.13.0+cpu is installed (on local disk on
# the project's machines, else from PyTorch's CPU index, SCOPE_TORCH_CPU_INDEX; PyPI's Linux torch
# wheels are CUDA builds). Every later pip call is constrained to that torch version, so no
# dependency can pull another (multi-GB CUDA) torch.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SCOPE_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
CPU_TORCH=${SCOPE_CPU_TORCH:-2.13.0}
TORCH_CPU_INDEX=${SCOPE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ -f "$VENV/pyvenv.cfg" ] && ! "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
  # e.g. the interpreter it was made from was removed or upgraded: `venv` without --clear keeps
  # the dangling links, so the environment is made anew
  echo "[setup] $VENV is a virtual environment whose python does not run: recreating it"
  "$PYTHON" -m venv --clear --system-site-packages "$VENV"
elif [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "[setup] $VENV has no pip: installing it (ensurepip)"
  "$PY" -m ensurepip --upgrade >/dev/null || {
    echo "[setup] error: $VENV has no pip and ensurepip failed (Debian/Ubuntu: apt install" \
         "python3-venv); then delete $VENV and run this again" >&2; exit 1; }
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ "$(uname -s)" = Linux ]; then
    # the +cpu build by name: a plain torch==X from PyPI is the CUDA build on Linux
    echo "[setup] installing torch==$CPU_TORCH+cpu"
    "${PIP[@]}" install -q "torch==$CPU_TORCH+cpu" 2>/dev/null || \
      "${PIP[@]}" install -q --extra-index-url "$TORCH_CPU_INDEX" "torch==$CPU_TORCH+cpu" || {
        echo "[setup] error: could not install torch==$CPU_TORCH+cpu (from the configured indexes" \
             "or $TORCH_CPU_INDEX); install a torch into $VENV or the system first: it is kept" >&2
        exit 1; }
  else
    echo "[setup] installing torch==$CPU_TORCH"
    "${PIP[@]}" install -q "torch==$CPU_TORCH"
  fi
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS="$VENV/scope-constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# Rebuild only when the sources or the build configuration changed.
STAMP="$VENV/scope-build.stamp"
HASH=$(cd "$ROOT" && cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
HASH="$HASH torch=$TORCH_VERSION cuda=${SCOPE_MEGATRON_CUDA:-auto}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && \
   "$PY" -c "import torch, scope_megatron._C" >/dev/null 2>&1; then
  echo "[setup] up to date (torch $TORCH_VERSION, $VENV)"
  exit 0
fi

echo "[setup] installing build tools and dependencies (torch pinned to $TORCH_VERSION)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" "setuptools>=64" wheel ninja pybind11
echo "[setup] building scope_megatron (C++ extension; takes about a minute on 2 cores)"
(cd "$ROOT" && MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" install -q -c "$CONSTRAINTS" \
   --no-build-isolation -e ".[dev]")
"$PY" -c "import torch, scope_megatron._C as C; print('[setup] built: cuda=%s cpu_simd=%s' % (C.built_with_cuda(), C.cpu_simd_flavour()))"
echo "$HASH" > "$STAMP"
