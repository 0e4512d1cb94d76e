#!/usr/bin/env python
"""Host time per call of the ops' Python and autograd path, at a size where the kernels cost
next to nothing: what each call of an op costs the host in a training step (on a GPU: the time
before the first kernel and after the last that tools/bench_ops.py's step, which waits for the
device, counts in full; tools/trace_step.py shows it as "lead" and "tail").

For each provider of tools/bench_ops.py (scope, deferred, fused, fused_deferred), on [S, B, V]
logits shaped as Megatron's ([sequence, batch, vocabulary]):
  step     `(op(s) * w).sum().backward()`, exactly the step tools/bench_ops.py times
  trivial  the same step with `s.sum(-1)` in place of the op: the step's own autograd (the
           multiply, the sum, the engine), which no op can avoid
  raw      the op's raw kernels alone, without autograd or checks (bench_ops.raw_op_call)
  overhead step - trivial - raw: what the op's wrapper adds per call (input checks, the
           autograd.Function, view nodes, error-flag and mismatch bookkeeping)
Each figure is the best over --rounds of the mean over --calls calls, the three measured in turn
in each round; on CUDA the device is synchronized after each batch of calls only, so the host
runs ahead where the op lets it.

  python tools/bench_host.py                          # CPU, writes benchmarks/results/host_cpu.md
  python tools/bench_host.py --device cuda --markdown /tmp/host_cuda.md
  python tools/bench_host.py --device cuda --profile kl:fused_deferred   # where its host time goes
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_ops  # noqa: E402  (tools/ is not a package)

PROVIDERS = {"kl": ("scope", "deferred", "fused", "fused_deferred"), "logprob": ("scope", "deferred")}
RAW = {("kl", "fused"): "kl_fused", ("kl", "fused_deferred"): "kl_fused"}


def _inputs(device: str, shape):
    """bench_ops.make_inputs at bf16 logits of `shape` ([S, B, V])."""
    return bench_ops.make_inputs({"lead": shape[:-1], "vocab": shape[-1], "dtype": "bf16", "device": device})


def _per_call_us(calls_by_name: dict, sync, calls: int, rounds: int) -> dict:
    """{name: best over rounds of the mean microseconds per call} for no-argument calls timed in
    turn within each round (a slow spell of a shared machine then hits all of them alike); one
    untimed warm-up round first."""
    for call in calls_by_name.values():
        for _ in range(max(calls // 4, 1)):
            call()
    sync()
    best = dict.fromkeys(calls_by_name, float("inf"))
    for _ in range(rounds):
        for name, call in calls_by_name.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best


def measure(device: str, shape, calls: int, rounds: int, ops=("kl", "logprob")) -> list:
    """Rows {op, provider, step_us, trivial_us, raw_us, overhead_us} at logits of `shape`."""
    import torch

    from scope_megatron.ops._library import KL_ROW_WIDTH
    from scope_megatron.ops._library import ops as raw_ops

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    student, teacher, target, weights = _inputs(device, shape)
    vocab = shape[-1]
    flat = dict(student=student.detach().reshape(-1, vocab), teacher=teacher.reshape(-1, vocab),
                target=target.reshape(-1), weights=weights.reshape(-1))
    trivial = bench_ops.loss_step(lambda s: s.sum(-1), student, weights)
    rows = []
    for op in ops:
        for provider in PROVIDERS[op]:
            fn = bench_ops.provider_fn(op, provider, teacher, target, weights)
            raw_call = bench_ops.raw_op_call(RAW.get((op, provider), op), **flat)
            if RAW.get((op, provider)) == "kl_fused":  # the backward's fix-up launch too
                stats = torch.zeros(flat["weights"].numel(), KL_ROW_WIDTH, device=dev)

                def raw_call(fused=raw_call, w=flat["weights"]):
                    grad = fused()[3]
                    raw_ops.kl_backward_fixup(grad, w, w, flat["student"], flat["teacher"], stats, 0,
                                              vocab, 1.0, 1.0, True)
            us = _per_call_us({"step": bench_ops.loss_step(fn, student, weights), "trivial": trivial,
                               "raw": raw_call}, sync, calls, rounds)
            rows.append(dict(op=op, provider=provider, step_us=us["step"], trivial_us=us["trivial"],
                             raw_us=us["raw"], overhead_us=us["step"] - us["trivial"] - us["raw"]))
            student.grad = None
    return rows


def profile(device: str, shape, calls: int, op: str, provider: str, top: int = 30) -> str:
    """cProfile of `calls` steps of op:provider (after a warm-up), the device synchronized once at
    the end: the functions with the most own time, then the most cumulative time, as text."""
    import cProfile
    import io
    import pstats

    import torch

    dev = torch.device(device)
    student, teacher, target, weights = _inputs(device, shape)
    step = bench_ops.loss_step(bench_ops.provider_fn(op, provider, teacher, target, weights), student, weights)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(max(calls // 4, 1)):
        step()
    sync()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    sync()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    out.write(f"cProfile of {calls} steps of {op}:{provider} at {shape} bf16 on {device}\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def markdown(rows, meta: dict, command: str) -> str:
    lines = [
        f"# Host time per op call ({meta['device_kind']})",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}; commit {meta['commit']}.",
        f"Command: `{command}`. Logits {meta['shape']} bf16; µs per call, best of {meta['rounds']} rounds "
        f"of {meta['calls']} calls. step: `(op(s) * w).sum().backward()`; trivial: the same with "
        "`s.sum(-1)` for the op; raw: the op's kernels alone; overhead = step − trivial − raw "
        "(the op's checks, autograd.Function and bookkeeping).",
        "",
        "| op | provider | step µs | trivial µs | raw µs | overhead µs |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['op']} | {r['provider']} | {r['step_us']:.1f} | {r['trivial_us']:.1f} | "
                     f"{r['raw_us']:.1f} | {r['overhead_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="16x2x128", help="SxBxV logits (default 16x2x128)")
    parser.add_argument("--ops", default="kl,logprob")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", default=None,
                        help="output (default: benchmarks/results/host_<device>.md)")
    parser.add_argument("--profile", default=None, metavar="OP:PROVIDER",
                        help="instead of the table: cProfile --calls steps of one op and provider "
                             "(e.g. kl:fused_deferred) and print where the host time goes")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu":
        torch.set_num_threads(1)  # the kernels are tiny: threads would only add their wake-ups
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    if args.profile:
        op, _, provider = args.profile.partition(":")
        if provider not in PROVIDERS.get(op, ()):
            parser.error(f"--profile {args.profile!r}: expected OP:PROVIDER from {PROVIDERS}")
        print(profile(args.device, shape, args.calls, op, provider))
        return 0
    rows = measure(args.device, shape, args.calls, args.rounds, args.ops.split(","))
    for r in rows:
        print(f"[host] {r['op']} {r['provider']}: step {r['step_us']:.1f} µs, overhead "
              f"{r['overhead_us']:.1f} µs", flush=True)
    meta = dict(device_kind=args.device, device=bench_ops._device_name(args.device),
                torch=torch.__version__, date=datetime.date.today().isoformat(),
                commit=bench_ops._git_commit(), shape="×".join(map(str, shape)), calls=args.calls,
                rounds=args.rounds)
    out = Path(args.markdown or REPO / "benchmarks" / "results" / f"host_{args.device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, meta, ("python tools/bench_host.py " + " ".join(sys.argv[1:])).strip()))
    print(f"[host] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
