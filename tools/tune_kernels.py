#!/usr/bin/env python
"""Times the raw CUDA ops (no autograd, no host syncs) for several values of the row-kernel
launch knob SCOPE_CUDA_PACKS_PER_WARP (packs of a row per warp: fewer threads per row = fewer
block reductions per element), against the memory-bandwidth floors measured in the same run,
and prints the knob value with the lowest geometric-mean time over the sizes.

  python tools/tune_kernels.py --variants 128,512,2048,8192 --json out.json
  export SCOPE_CUDA_PACKS_PER_WARP=$(python tools/tune_kernels.py --print-best)

Each variant runs in its own process (the knob is read once per process). Timed per size: the
two-pass KL (kl_partial + kl_combine + kl_backward), the token log-prob (logprob_partial +
logprob_combine + logprob_backward) and, for the default variant, the fused KL (kl_fused); then
the fused KL alone with its rows on clusters (SCOPE_CUDA_FUSED_CLUSTER=1, rows longer than one
block holds) and with larger blocks (SCOPE_CUDA_FUSED_THREADS, --fused-threads, rows one block
holds). Times are CUDA events around bench_ops.KERNEL_BATCH calls queued back to back.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ops import KERNEL_BATCH, copy_bandwidth, cuda_event_times, make_inputs, raw_op_call  # noqa: E402
SIZES = "16384x151936,4096x151936,16384x75968,16384x37984,16384x18992"
# bytes per element (bf16) of the two floors: two-pass / one-pass
FLOOR_BYTES = {"kl": (10, 6), "logprob": (6, 4), "kl_fused": (10, 6)}


def _child(sizes, repeats, fused, only_fused=False):
    import torch

    def timed(op, inputs):
        times = cuda_event_times(raw_op_call(op, *inputs), warmup=2, repeats=repeats, batch=KERNEL_BATCH)
        return sorted(times)[len(times) // 2]

    out = {}
    for size in sizes:
        t, v = (int(x) for x in size.split("x"))
        inputs = make_inputs({"rows": t, "vocab": v, "dtype": "bf16", "device": "cuda"})
        out[size] = {} if only_fused else {"kl": timed("kl", inputs), "logprob": timed("logprob", inputs)}
        if fused:
            out[size]["kl_fused"] = timed("kl_fused", inputs)
        del inputs
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="128,512,2048,8192")
    parser.add_argument("--sizes", default=SIZES)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--fused-threads", default="512",
                        help="SCOPE_CUDA_FUSED_THREADS values to time the fused KL at (rows of at most "
                             "40960 columns; empty: none)")
    parser.add_argument("--json", default=None, help="write all timings here")
    parser.add_argument("--print-best", action="store_true", help="print only the best variant")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    if args.child is not None:
        print(json.dumps(_child(sizes, args.repeats, fused=args.child in ("fused", "fused_only"),
                                only_fused=args.child == "fused_only")))
        return 0

    bandwidth = copy_bandwidth("cuda")
    variants = args.variants.split(",")
    results = {}
    for i, variant in enumerate(variants):
        env = dict(os.environ, SCOPE_CUDA_PACKS_PER_WARP=variant)
        cmd = [sys.executable, __file__, "--sizes", args.sizes, "--repeats", str(args.repeats),
               "--child", "fused" if i == 0 else "plain"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        if res.returncode != 0:
            print(f"[tune] variant {variant} failed: {(res.stderr or res.stdout).strip()[-300:]}", file=sys.stderr)
            continue
        results[variant] = json.loads(res.stdout.strip().splitlines()[-1])

    def fused_alone(env_overrides: dict, run_sizes: list, what: str):
        """The fused KL alone at `run_sizes` in a child process with these settings, or None."""
        env = dict(os.environ, **env_overrides)
        cmd = [sys.executable, __file__, "--sizes", ",".join(run_sizes), "--repeats", str(args.repeats),
               "--child", "fused_only"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        if res.returncode != 0:
            print(f"[tune] {what} failed: {(res.stderr or res.stdout).strip()[-300:]}", file=sys.stderr)
            return None
        return json.loads(res.stdout.strip().splitlines()[-1])

    # The fused KL with rows split over clusters (opt-in: SCOPE_CUDA_FUSED_CLUSTER=1), at the
    # sizes one block cannot hold; and with larger blocks than its default shape
    # (SCOPE_CUDA_FUSED_THREADS), at the sizes one block holds.
    long_sizes = [s for s in sizes if int(s.split("x")[1]) > 40960]
    short_sizes = [s for s in sizes if int(s.split("x")[1]) <= 40960]
    cluster = fused_alone({"SCOPE_CUDA_FUSED_CLUSTER": "1"}, long_sizes, "fused clusters") if long_sizes else None
    fused_threads = {}
    for threads in [t for t in args.fused_threads.split(",") if t] if short_sizes else []:
        res = fused_alone({"SCOPE_CUDA_FUSED_THREADS": threads}, short_sizes, f"fused threads {threads}")
        if res is not None:
            fused_threads[threads] = res

    def floor_ms(op, size, which):
        t, v = (int(x) for x in size.split("x"))
        return FLOOR_BYTES[op][which] * t * v / bandwidth * 1e3

    def score(variant):  # geometric mean of two-pass kl and logprob times over the sizes
        logs = [math.log(results[variant][size][op]) for size in sizes for op in ("kl", "logprob")]
        return math.exp(sum(logs) / len(logs))

    best = min(results, key=score) if results else None
    if args.print_best:
        print(best or "")
        return 0 if best else 1
    print(f"[tune] copy bandwidth {bandwidth / 1e12:.2f} TB/s; kernels alone, ms (x two-pass floor)")
    header = "| variant (packs per warp) | " + " | ".join(f"{op} {s}" for s in sizes for op in ("kl", "logprob")) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(sizes)))
    for variant, res in results.items():
        cells = [f"{res[s][op]:.2f} ({res[s][op] / floor_ms(op, s, 0):.2f})" for s in sizes for op in ("kl", "logprob")]
        print(f"| {variant}{' (best)' if variant == best else ''} | " + " | ".join(cells) + " |")
    def fused_row(label: str, res: dict) -> None:
        cells = []
        for s in sizes:
            cells += [f"{res[s]['kl_fused']:.2f} ({res[s]['kl_fused'] / floor_ms('kl', s, 1):.2f} x one-pass)"
                      if s in res and "kl_fused" in res[s] else "", ""]
        print(f"| {label} | " + " | ".join(cells) + " |")

    first = results.get(variants[0], {})
    if first and "kl_fused" in first[sizes[0]]:
        fused_row("fused KL (ops.kl_fused)", first)
    if cluster:
        fused_row("fused KL, clusters of 4 (SCOPE_CUDA_FUSED_CLUSTER=1)", cluster)
    for threads, res in fused_threads.items():
        fused_row(f"fused KL, blocks of at least {threads} threads (SCOPE_CUDA_FUSED_THREADS={threads})", res)
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, "results": results, "best": best,
                                               "fused_clusters": cluster, "fused_threads": fused_threads,
                                               "kernel_batch": KERNEL_BATCH}, indent=1))
    print(f"[tune] best: SCOPE_CUDA_PACKS_PER_WARP={best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
