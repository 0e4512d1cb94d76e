#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in one call of about 8 minutes, build the extension with its
# CUDA kernels, run the CUDA tests, a short toy training run, benchmark the ops against torch eager /
# torch.compile and the bandwidth floors, and print a short table. Logs and results (8 files) go
# to $OUT (default build/gpu_check); bulky outputs (C++ build, the run's checkpoints) to /tmp.
#
#   tools/gpu_check.sh                 # H100: TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16 by default
#
# Wheels in .whl/ (e.g. megatron-core for Python 3.12, pytest-timeout) are installed to
# /tmp/site first: the test machine has no network. The package is used in place (build_ext
# --inplace), so pip never resolves dependencies there.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/build/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; run this on a GPU machine" >&2
  exit 2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

echo "== build (CUDA kernels, sm ${TORCH_CUDA_ARCH_LIST:-9.0})"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} SCOPE_MEGATRON_CUDA=1 \
  "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
"$PY" -c "import torch, scope_megatron._C as C; assert C.built_with_cuda(); print('extension: cuda kernels present')"

echo "== CUDA tests"
status=0
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/ops/test_cuda_ops.py tests/test_cuda_sources.py \
  2>&1 | tee "$OUT/tests.log" | tail -25 || status=1
if [ -x tools/run_cpp_tests.sh ]; then
  echo "== C++ tests (CPU and CUDA kernels)"
  tools/run_cpp_tests.sh --build-dir /tmp/scope_gpu_check/cpp 2>&1 | tee "$OUT/cpp_tests.log" | tail -15 || status=1
fi

echo "== trainer smoke (toy run, 1 GPU, bf16: NCCL, TE layers if installed, CUDA kernels)"
if "$PY" -c "import megatron.core" >/dev/null 2>&1; then
  timeout 300 "$PY" -m torch.distributed.run --nproc-per-node 1 examples/pretrain_scope.py \
    --train-iters 6 --eval-interval 3 --eval-num-prompts 32 --save /tmp/scope_gpu_check/run/ckpt \
    --save-interval 3 --log-dir /tmp/scope_gpu_check/run --logging-overwrite true \
    >"$OUT/gpu_run.log" 2>&1 && tail -3 "$OUT/gpu_run.log" || { tail -30 "$OUT/gpu_run.log"; status=1; }
else
  echo "megatron-core is not installed here: carry a cp312 wheel in .whl/ (see the device README)"
fi

echo "== benchmark"
"$PY" tools/bench_ops.py --device cuda --repeats ${BENCH_REPEATS:-10} --timeout 240 \
  --out "$OUT/ops_cuda.csv" --markdown "$OUT/ops_cuda.md" 2>&1 | tee "$OUT/bench.log" | grep -v "^\[bench\] wrote" || status=1
cat "$OUT/ops_cuda.md"
exit $status
