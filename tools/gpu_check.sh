#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in one call of about 6-8 minutes, build the extension with its
# CUDA kernels, run the fused-KL and core CUDA tests, benchmark the ops against torch eager /
# torch.compile and the bandwidth floors, take a profiler timeline of the benchmark's step, run
# the rest of the CUDA tests, and print the results and the performance targets
# (tools/targets.py) last. The benchmark also times the ops inside a last-layer step (what each
# adds to a training step), and the timeline is followed by the host time per op call
# (tools/bench_host.py, appended to trace.md). Logs and results go to $OUT (default
# build/gpu_check; exactly 8 files, the most the device tool brings back: gpu.txt, build.log,
# tests.log, tune.json, ops_cuda.csv, ops_cuda.md, bench.log, trace.md).
#
#   tools/gpu_check.sh                 # H100: TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16 by default
#
# Optional steps (each costs a minute or more of device time):
#   GPU_CHECK_CPP=1     the C++ CTest suite (CPU and CUDA launchers; builds the kernels again)
#   GPU_CHECK_SKIP=tests,tune   leave steps out (of tests, tune, bench, trace): a rerun after a
#                       Python-only change needs the build, the benchmark and the timeline only
#   GPU_CHECK_TRAIN=1   a 6-step bf16 toy training run, resumed to 8, and 2 steps with --split-groups and
#                       --overlap-grad-reduce (needs megatron-core:
#                       tools/device_wheels.sh puts a cp312 wheel in .whl/ here; carry .whl)
#   SCOPE_BENCH_COMMIT=<hash>   the commit the result files name (a device copy's .git may show an
#                       older HEAD "+changes" than the tree it runs)
# Wheels in .whl/ are installed to /tmp/site first (the test machine has no network). The package
# is used in place (build_ext --inplace), so pip never resolves dependencies there.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/build/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
skip() { [[ ",${GPU_CHECK_SKIP:-}," == *",$1,"* ]]; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; run this on a GPU machine" >&2
  exit 2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  date -u +"%Y-%m-%d %H:%M UTC"
} | tee "$OUT/gpu.txt"

stamp "== build (CUDA kernels, sm ${TORCH_CUDA_ARCH_LIST:-9.0})"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} SCOPE_MEGATRON_CUDA=1 \
  "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
"$PY" -c "import torch, scope_megatron._C as C; assert C.built_with_cuda(); print('extension: cuda kernels present')" || exit 1

# pytest -o addopts="": the slow tests (64-bit offsets) run too.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="" --maxfail=8 --no-header -rfE)
if ! skip tests; then
  stamp "== CUDA tests: fused KL and 64-bit offsets"
  timeout 240 "${PYTEST[@]}" tests/ops/test_cuda_ops.py -k "fused or large" >"$OUT/tests.log" 2>&1 || status=1
  tail -4 "$OUT/tests.log"
fi

mkdir -p /tmp/scope_gpu_check
# Clocks, power and temperature every 100 ms while the kernels are timed (read only: the card's
# settings are left alone), summarized into gpu.txt: does the card hold its clocks through the
# benchmark, or do idle gaps let them drop?
nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
  --format=csv,noheader,nounits -lms 100 >/tmp/scope_gpu_check/clocks.csv 2>/dev/null &
sampler=$!
if ! skip tune; then
  stamp "== launch knob of the row kernels (kernels alone, several SCOPE_CUDA_PACKS_PER_WARP)"
  if timeout 150 "$PY" tools/tune_kernels.py --json "$OUT/tune.json" >/tmp/scope_gpu_check/tune.log 2>&1; then
    cat /tmp/scope_gpu_check/tune.log
    # reported, not exported: the benchmark measures the defaults users get (set
    # SCOPE_CUDA_PACKS_PER_WARP yourself to benchmark another value)
    best=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['best'] or '')" "$OUT/tune.json")
    echo "tuning: best SCOPE_CUDA_PACKS_PER_WARP=${best:-none}"
  else
    tail -5 /tmp/scope_gpu_check/tune.log; status=1
  fi
fi
echo "benchmark and remaining tests with SCOPE_CUDA_PACKS_PER_WARP=${SCOPE_CUDA_PACKS_PER_WARP:-default}"

skip bench || { stamp "== benchmark"
timeout 330 "$PY" tools/bench_ops.py --device cuda --ops kl,logprob --dtypes bf16 \
  --sizes 4096x151936,16384x151936,16384x75968,16384x37984,16384x18992 \
  --baseline-sizes 4096x151936,16384x151936 --in-step-sizes 16384x151936,16384x37984,16384x18992 \
  --repeats ${BENCH_REPEATS:-10} --timeout 150 \
  --out "$OUT/ops_cuda.csv" --markdown "$OUT/ops_cuda.md" >"$OUT/bench.log" 2>&1 || status=1
grep -E "^\[bench\]   " "$OUT/bench.log" | tail -40; }

skip trace || { stamp "== step timeline (torch.profiler): the time through autograd above the kernels alone"
timeout 150 "$PY" tools/trace_step.py --device cuda --sizes 16384x151936,16384x18992 \
  --ops kl:scope,kl:deferred,kl:fused,kl:fused_deferred,logprob:scope,logprob:deferred \
  --markdown "$OUT/trace.md" >/tmp/scope_gpu_check/trace.log 2>&1 \
  || { tail -5 /tmp/scope_gpu_check/trace.log; status=1; }
grep -E "^## |^\| (step|raw|raw \+ sync|step − raw) \|" "$OUT/trace.md" 2>/dev/null
# What the ops add inside a last-layer step (bench_ops --in-step-sizes), as a timeline: the step
# with the op against the step without it, appended to trace.md (8 files at most)
# (V/8 only, where run 4's excess was largest relative to the op: the check stays under 10 minutes)
timeout 90 "$PY" tools/trace_step.py --device cuda --sizes 16384x18992 \
  --ops kl:deferred,kl:fused_deferred --in-step 4096 --steps 4 --warmup 2 \
  --markdown /tmp/scope_gpu_check/trace_in_step.md >/tmp/scope_gpu_check/trace_in_step.log 2>&1 \
  && { echo; sed -e 's/^## /### /' -e 's/^# Step timeline/## In a last-layer step: timeline/' \
       /tmp/scope_gpu_check/trace_in_step.md; } >>"$OUT/trace.md" \
  && grep -E "^## kl|^\| in step" /tmp/scope_gpu_check/trace_in_step.md \
  || { tail -5 /tmp/scope_gpu_check/trace_in_step.log; status=1; }
# Host time per call at a tiny size (tools/bench_host.py), appended to trace.md (8 files at most)
timeout 60 "$PY" tools/bench_host.py --device cuda --calls 300 --rounds 5 --markdown /tmp/scope_gpu_check/host.md \
  >/tmp/scope_gpu_check/host.log 2>&1 && { echo; sed 's/^# /## /' /tmp/scope_gpu_check/host.md; } >>"$OUT/trace.md" \
  && grep -E "^\| (kl|logprob) \|" /tmp/scope_gpu_check/host.md || { tail -5 /tmp/scope_gpu_check/host.log; status=1; }; }

kill "$sampler" 2>/dev/null
"$PY" - /tmp/scope_gpu_check/clocks.csv <<'PYEOF' | tee -a "$OUT/gpu.txt"
import statistics, sys
rows = []
for line in open(sys.argv[1]):
    try:
        rows.append([float(x) for x in line.split(",")])
    except ValueError:
        pass
if not rows:
    print("clocks during tune / benchmark / timeline: no samples")
else:
    cols = list(zip(*rows))
    mid = lambda c: f"{min(c):.0f} / {statistics.median(c):.0f} / {max(c):.0f}"
    print(f"clocks during tune / benchmark / timeline ({len(rows)} samples, min / median / max): "
          f"SM {mid(cols[0])} MHz, memory {mid(cols[1])} MHz, power {mid(cols[2])} W, "
          f"temperature {mid(cols[3])} C, utilization {mid(cols[4])} %")
PYEOF

if ! skip tests; then
  stamp "== CUDA tests: the rest"
  timeout 200 "${PYTEST[@]}" tests/ops/test_cuda_ops.py -k "not fused and not large" >>"$OUT/tests.log" 2>&1 || status=1
  timeout 60 "${PYTEST[@]}" tests/ops/test_error_check.py -m cuda >>"$OUT/tests.log" 2>&1 || status=1
  tail -4 "$OUT/tests.log"
fi

if [ "${GPU_CHECK_CPP:-0}" = 1 ] && [ -x tools/run_cpp_tests.sh ]; then
  stamp "== C++ tests (CPU and CUDA kernels)"
  timeout 240 tools/run_cpp_tests.sh --build-dir /tmp/scope_gpu_check/cpp >>"$OUT/tests.log" 2>&1 || status=1
  tail -5 "$OUT/tests.log"
fi

if [ "${GPU_CHECK_TRAIN:-0}" = 1 ]; then
  stamp "== trainer smoke (toy run, 1 GPU, bf16: NCCL, CUDA kernels)"
  if "$PY" -c "import megatron.core" >/dev/null 2>&1; then
    # 6 steps from the toy checkpoint (bf16: the KL must stay near step 1's), checkpoints at 3
    # and 6, then the same run continued to 8 steps (a bf16 resume: optimizer state loaded).
    # A fresh run directory: on a machine kept warm, the last call's run would be resumed.
    rm -rf /tmp/scope_gpu_check/run
    for iters in 6 8; do
      timeout 200 "$PY" -m torch.distributed.run --nproc-per-node 1 examples/pretrain_scope.py \
        --train-iters $iters --eval-interval 3 --eval-num-prompts 32 --save /tmp/scope_gpu_check/run/ckpt \
        --save-interval 3 --log-dir /tmp/scope_gpu_check/run \
        >/tmp/scope_gpu_check/train_$iters.log 2>&1 || { tail -30 /tmp/scope_gpu_check/train_$iters.log; status=1; }
      cat /tmp/scope_gpu_check/train_$iters.log >>"$OUT/tests.log"
    done
    grep -hE "step [0-9]+/[0-9]+ \||done:" /tmp/scope_gpu_check/train_6.log /tmp/scope_gpu_check/train_8.log
    # the second call must resume at step 7 (not train from step 1) and finish step 8
    t8=/tmp/scope_gpu_check/train_8.log
    if ! grep -q "step 7/8 |" $t8 || ! grep -q "step 8/8 |" $t8 || grep -q "step 1/8 |" $t8; then
      echo "trainer smoke: the second run did not resume at step 7 and finish step 8"; status=1
    fi
    # the KL to the teacher stays near where the loaded student starts (a stale bf16 optimizer
    # copy of the initialization once sent it from 0.4 to 9 after one step)
    "$PY" - /tmp/scope_gpu_check/train_6.log $t8 <<'KLEOF' || status=1
import re, sys
kl = [float(v) for path in sys.argv[1:] for v in re.findall(r"step \d+/\d+ \|.*\| kl ([0-9.e+-]+)", open(path).read())]
ok = len(kl) == 8 and max(kl) < 3 * kl[0]
print(f"trainer smoke: KL per step {kl}: {'ok' if ok else 'NOT near step 1 (or steps missing)'}")
sys.exit(0 if ok else 1)
KLEOF
    # micro-batches that cut prompt groups (4 rollouts of groups of 8: the weights pass) with the
    # gradient reduce in buckets: 2 steps from the toy checkpoint, bf16, NCCL
    rm -rf /tmp/scope_gpu_check/split
    timeout 120 "$PY" -m torch.distributed.run --nproc-per-node 1 examples/pretrain_scope.py \
      --train-iters 2 --eval-interval 0 --split-groups true --micro-batch-size 4 --overlap-grad-reduce true \
      --save /tmp/scope_gpu_check/split/ckpt --save-interval 2 --log-dir /tmp/scope_gpu_check/split \
      >/tmp/scope_gpu_check/train_split.log 2>&1 || { tail -30 /tmp/scope_gpu_check/train_split.log; status=1; }
    cat /tmp/scope_gpu_check/train_split.log >>"$OUT/tests.log"
    echo "split groups + overlapped reduce:"; grep -hE "step [0-9]+/[0-9]+ \||done:" /tmp/scope_gpu_check/train_split.log
    grep -q "step 2/2 |" /tmp/scope_gpu_check/train_split.log || { echo "trainer smoke: the split-groups run did not finish"; status=1; }
  else
    echo "megatron-core is not installed here: carry a cp312 wheel in .whl/ (see the device README)"
  fi
fi

stamp "== results (status $status)"
cat "$OUT/ops_cuda.md" 2>/dev/null | sed -n '/^| op/,$p'
echo
if [ -f "$OUT/ops_cuda.csv" ]; then
  "$PY" tools/targets.py --bench "$OUT/ops_cuda.csv" $([ -f "$OUT/tune.json" ] && echo --tune "$OUT/tune.json") || status=1
fi
exit $status
