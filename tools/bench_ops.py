#!/usr/bin/env python
"""Benchmark of the vocab-parallel ops (forward + backward) against torch eager and torch.compile
of the same math, measured in the same run on the same device.

For each op (kl = full-vocabulary reverse KL, logprob = token log-prob), size T x V and dtype it
times `loss = (op(...) * w).sum(); loss.backward()` for these providers:
  scope    scope_megatron.ops (the C++ / CUDA kernels; for kl: forward, then backward)
  deferred scope with error_check="backward": the forward does not wait for the error flags
           (backward checks them), so the host queues the backward while the forward runs
  fused    kl only: vocab_parallel_kl(..., expected_grad=w), the KL and its gradient in one pass
           (ops.kl_fused) when the row fits on chip, returned by backward
  fused_deferred  kl only: fused with error_check="backward"
  eager    scope_megatron.ops.reference in plain PyTorch (float32 upcast, as user code does)
  compile  torch.compile of that reference
and reports the p20/p50/p80 time, the peak memory above the inputs, and the ratios. On CUDA it
also measures the copy bandwidth and reports each op's memory-bandwidth floors:
  kl:      two-pass 5 x elem bytes (read both logits twice, write the gradient), one-pass 3 x;
  logprob: two-pass 3 x elem bytes, one-pass 2 x.
On the CPU every provider runs in its own process (peak memory is the process's RSS); on CUDA the
providers of one size share a process (the caching allocator's peak is reset for each) and a
provider that runs out of memory loses only its own row. --baseline-sizes limits eager and
compile to some sizes (their runs cost the most time).

  python tools/bench_ops.py                         # CPU defaults, writes benchmarks/results/
  python tools/bench_ops.py --sizes 2048x32000,4096x151936:bf16 --dtypes fp32,bf16
  python tools/bench_ops.py --device cuda --sizes 4096x151936,16384x151936 --dtypes bf16
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROVIDERS = ("scope", "deferred", "fused", "fused_deferred", "eager", "compile")
OP_PROVIDERS = {"kl": PROVIDERS, "logprob": ("scope", "deferred", "eager", "compile")}
# calls per CUDA-event measurement of the raw kernels ("kernels alone"): back to back, so that
# the host's launch latency after each sync is not counted as kernel time
KERNEL_BATCH = 5
# bytes moved per logits element (in units of the element size) by an ideal implementation
FLOOR_FACTORS = {"kl": {"two_pass": 5, "one_pass": 3}, "logprob": {"two_pass": 3, "one_pass": 2}}


# ----------------------------------------------------------------------------------------------
# the raw ops alone (also used by tools/tune_kernels.py)
# ----------------------------------------------------------------------------------------------
def raw_op_call(op: str, student, teacher, target, weights, *, pause=None):
    """A no-argument call of the raw ops of `op` on one shard holding the whole vocabulary (no
    autograd, input checks or host syncs): "kl" (kl_partial, kl_combine, kl_backward), "kl_fused"
    (kl_fused) or "logprob" (logprob_partial, logprob_combine, logprob_backward). pause: a
    no-argument function called between the forward kernels and the backward kernel (e.g. a
    device sync, to see what an idle device costs the backward)."""
    from scope_megatron.ops._library import ops

    pause = pause or (lambda: None)
    s, v = student.detach(), student.shape[-1]
    if op == "kl_fused":
        return lambda: ops.kl_fused(s, teacher, weights, v, 1.0, 1.0, True)
    if op == "kl":
        def call():
            stats = ops.kl_partial(s, teacher, 0, v, 1.0, 1.0, True)
            _, row_stats, _ = ops.kl_combine(stats.unsqueeze(0), True, 1.0, 1.0)
            pause()
            return ops.kl_backward(weights, s, teacher, row_stats, 0, v, 1.0, 1.0, True)
        return call
    if op == "logprob":
        def call():
            stats = ops.logprob_partial(s, target, 0, v, 1.0)
            _, row_stats, _ = ops.logprob_combine(stats.unsqueeze(0), 1.0)
            pause()
            return ops.logprob_backward(weights, s, target, row_stats, 0, v, 1.0)
        return call
    raise ValueError(f"unknown op {op!r}")


def cuda_event_times(call, warmup: int, repeats: int, batch: int = 1) -> list:
    """Milliseconds per call of `repeats` measurements, timed with CUDA events after `warmup`
    calls. batch > 1: each measurement is `batch` calls queued back to back between the two
    events, divided by `batch`: the device time of the kernels when the host keeps ahead of them
    (as it does in training), without the launch latency that a call after an idle, synchronized
    device starts with (tens of microseconds on the host before the first kernel runs)."""
    import torch

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return times


# ----------------------------------------------------------------------------------------------
# one case, in a child process
# ----------------------------------------------------------------------------------------------
def make_inputs(case: dict):
    """Random student / teacher logits [*lead, vocab] (the student requires grad), target ids and
    per-token weights [*lead] for case {"rows" or "lead", "vocab", "dtype", "device"} (lead: the
    leading dimensions, default (rows,)); seeded, never zeros."""
    import torch

    device = torch.device(case["device"])
    dtype = getattr(torch, DTYPES[case["dtype"]])
    lead, vocab = tuple(case.get("lead") or (case["rows"],)), case["vocab"]
    g = torch.Generator(device=device).manual_seed(0)
    student = torch.empty(*lead, vocab, dtype=dtype, device=device).normal_(generator=g).requires_grad_()
    teacher = torch.empty(*lead, vocab, dtype=dtype, device=device).normal_(generator=g)
    target = torch.randint(0, vocab, lead, device=device, generator=g)
    weights = torch.rand(lead, device=device, generator=g)
    return student, teacher, target, weights


def provider_fn(op: str, provider: str, teacher, target, weights):
    """student -> per-token result of `op` for provider scope / fused / eager (compile: wrap the
    eager one in torch.compile); None where the op has no such provider."""
    from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob
    from scope_megatron.ops.reference import kl_reference, logprob_reference

    late = dict(error_check="backward")
    if op == "kl":
        return {"scope": lambda s: vocab_parallel_kl(s, teacher),
                "deferred": lambda s: vocab_parallel_kl(s, teacher, **late),
                "fused": lambda s: vocab_parallel_kl(s, teacher, expected_grad=weights),
                "fused_deferred": lambda s: vocab_parallel_kl(s, teacher, expected_grad=weights, **late),
                "eager": lambda s: kl_reference(s, teacher)}.get(provider)
    return {"scope": lambda s: vocab_parallel_logprob(s, target),
            "deferred": lambda s: vocab_parallel_logprob(s, target, **late),
            "eager": lambda s: logprob_reference(s, target)}.get(provider)


def loss_step(fn, student, weights):
    """The timed step: `(fn(student) * weights).sum().backward()`, then the gradient dropped."""
    def step():
        (fn(student) * weights).sum().backward()
        student.grad = None
    return step


def in_step_steps(student, weights, hidden: int, seed: int = 1):
    """(op_step, base_step) of a step shaped like training's last layer, on logits of student's
    shape: logits = h @ W.T from h [T, hidden] and W [V, hidden] of student's dtype (both
    requiring grad). op_step(fn) is the step `(fn(logits) * weights).sum().backward()`; base_step
    backpropagates a fixed logits gradient instead (the same matmul work, no op)."""
    import torch

    rows, vocab = student.shape
    g = torch.Generator(device=student.device).manual_seed(seed)
    make = lambda *shape: torch.empty(shape, dtype=student.dtype, device=student.device).normal_(generator=g)
    h = (make(rows, hidden) / hidden**0.5).requires_grad_()
    w = make(vocab, hidden).requires_grad_()
    grad_logits = make(rows, vocab) * 1e-3

    def op_step(fn):
        def step():
            (fn(h @ w.T) * weights).sum().backward()
            h.grad = w.grad = None
        return step

    def base_step():
        (h @ w.T).backward(grad_logits)
        h.grad = w.grad = None

    return op_step, base_step


def _run_case(case: dict) -> dict:
    """Times case["providers"] on one set of inputs: {provider: result or {"error": ...}}."""
    import torch

    from scope_megatron.utils.memory import PeakMemory

    device = torch.device(case["device"])
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    student, teacher, target, weights = make_inputs(case)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(step, peak_memory=True):
        for _ in range(case["warmup"]):
            step()
        sync()
        peak = None
        if peak_memory:
            with PeakMemory(device) as peak:
                step()
        times = []
        for _ in range(case["repeats"]):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return {"times_ms": times, "peak_extra_bytes": peak.extra_bytes if peak else None}

    def run_paired(step, base):
        """Times of `step` and `base` alternated within each repeat (their order flipping every
        repeat): a small difference of two long steps, measured so that a drift of the clocks
        during the run (a GPU under a power cap) shifts both alike."""
        for _ in range(case["warmup"]):
            step()
            base()
        times = {step: [], base: []}
        for i in range(case["repeats"]):
            for call in ((step, base) if i % 2 == 0 else (base, step)):
                sync()
                t0 = time.perf_counter()
                call()
                sync()
                times[call].append((time.perf_counter() - t0) * 1e3)
        return times[step], times[base]

    # One JSON line per provider as soon as it is done: a crash later keeps the earlier rows.
    in_step = None  # (op_step, base_step), built at its first use
    in_step_last = ([p for p in case["providers"] if p not in ("eager", "compile")] or [None])[-1]
    for provider in case["providers"]:
        try:
            fn = (provider_fn(case["op"], provider, teacher, target, weights) if provider != "compile"
                  else torch.compile(provider_fn(case["op"], "eager", teacher, target, weights)))
            result = run(loss_step(fn, student, weights))
            if case.get("in_step") and provider not in ("eager", "compile"):
                if in_step is None:  # the inputs and the step without the op: once per case
                    in_step = in_step_steps(student.detach(), weights, case["hidden"])
                result["in_step_ms"], result["in_step_base_ms"] = run_paired(in_step[0](fn), in_step[1])
                if provider == in_step_last:  # free h, W and the logits gradient before eager runs
                    in_step = None
            if device.type == "cuda" and provider in ("scope", "fused"):
                raw = case["op"] + ("_fused" if provider == "fused" else "")
                try:
                    result["kernels_ms"] = cuda_event_times(
                        raw_op_call(raw, student, teacher, target, weights), case["warmup"], case["repeats"],
                        batch=KERNEL_BATCH)
                except Exception as exc:  # keep the end-to-end row
                    result["kernels_error"] = str(exc).splitlines()[0][:200]
        except torch.OutOfMemoryError as exc:
            result = {"error": "out of memory: " + str(exc).splitlines()[0][:120]}
        print(json.dumps({provider: result}), flush=True)
        student.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), 1 GiB buffers."""
    import torch

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / best


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _percentile(values, q):
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _in_step_marginal(res: dict) -> float:
    """What the op adds to the last-layer step: the median over repeats of the step with the op
    minus the step without it timed next to it (ms)."""
    return _percentile([a - b for a, b in zip(res["in_step_ms"], res["in_step_base_ms"])], 0.5)


def _spawn(case: dict, timeout: float) -> dict:
    """Runs a case in a child process: {provider: result}; providers it did not finish get
    {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        stdout, error = res.stdout, None
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
            error = tail[0][:200] if res.returncode > 0 else f"killed (signal {-res.returncode}; out of memory?)"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        error = f"timed out after {timeout:.0f} s"
    results = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    return {p: results.get(p, {"error": error or "no result"}) for p in case["providers"]}


def _git_commit() -> str:
    """HEAD's short hash, with "+changes" when the working tree differs from it (as on a device
    machine whose copy of the tree carries a newer state than its .git); SCOPE_BENCH_COMMIT, when
    set, instead (the hash of the tree sent there, named by whoever sends it)."""
    if os.environ.get("SCOPE_BENCH_COMMIT"):
        return os.environ["SCOPE_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ops", default="kl,logprob")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated TxV, optionally TxV:dtype/dtype to override --dtypes "
                             "for that size (default: per device)")
    parser.add_argument("--dtypes", default=None, help="comma-separated of fp32,bf16,fp16")
    parser.add_argument("--providers", default=None,
                        help="of " + ",".join(PROVIDERS) + " (fused, fused_deferred: kl only; default: all "
                             "on CUDA, without the deferred ones on the CPU, where nothing runs ahead)")
    parser.add_argument("--baseline-sizes", default=None,
                        help="comma-separated TxV: run eager and compile only at these sizes")
    parser.add_argument("--in-step-sizes", default=None,
                        help="comma-separated TxV: also time our providers inside a last-layer step "
                             "(logits = h @ W.T, the op, backward) against the same step without the op")
    parser.add_argument("--hidden", type=int, default=None,
                        help="hidden size of that step (default 4096 on CUDA, 256 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/ops_<device>.csv)")
    parser.add_argument("--markdown", default=None, help="Markdown table path (default: next to the CSV)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.case is not None:  # child process
        _run_case(json.loads(args.case))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    cpu = args.device == "cpu"
    wanted = (args.providers or ",".join(p for p in PROVIDERS if not (cpu and "deferred" in p))).split(",")
    sizes = args.sizes or ("2048x32000,4096x151936:bf16" if cpu else "4096x151936,16384x151936")
    baseline_sizes = set(args.baseline_sizes.lower().split(",")) if args.baseline_sizes else None
    in_step_sizes = set(args.in_step_sizes.lower().split(",")) if args.in_step_sizes else set()
    hidden = args.hidden = args.hidden or (256 if cpu else 4096)  # the markdown names it too
    dtypes = args.dtypes or ("fp32,bf16" if cpu else "bf16")
    repeats = args.repeats or (5 if cpu else 20)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"ops_{args.device}.csv")
    markdown = Path(args.markdown or out.with_suffix(".md"))
    bandwidth = None if cpu else copy_bandwidth("cuda")

    meta = {
        "device": _device_name(args.device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
    }
    rows = []
    for op in args.ops.split(","):
        for size in sizes.split(","):
            size, _, size_dtypes = size.partition(":")
            t, v = (int(x) for x in size.lower().split("x"))
            for dtype in (size_dtypes.replace("/", ",") or dtypes).split(","):
                providers = [p for p in wanted if p in OP_PROVIDERS[op]]
                if baseline_sizes is not None and size.lower() not in baseline_sizes:
                    providers = [p for p in providers if p not in ("eager", "compile")]
                results = {}
                # one process per provider on the CPU (peak RSS), one per size on CUDA
                groups = [[p] for p in providers] if cpu else [providers]
                for group in groups:
                    case = dict(op=op, rows=t, vocab=v, dtype=dtype, providers=group, device=args.device,
                                repeats=repeats, warmup=args.warmup, in_step=size.lower() in in_step_sizes,
                                hidden=hidden)
                    print(f"[bench] {op} {t}x{v} {dtype} {','.join(group)} ...", flush=True)
                    results.update(_spawn(case, args.timeout))
                for provider in providers:
                    res = results[provider]
                    kernels = (f", kernels alone p50 {_percentile(res['kernels_ms'], 0.5):.2f} ms"
                               if "kernels_ms" in res else "")
                    if "in_step_ms" in res:
                        kernels += f", in step +{_in_step_marginal(res):.2f} ms"
                    print(f"[bench]   {provider}: " + (res["error"] if "error" in res else
                          f"p50 {_percentile(res['times_ms'], 0.5):.2f} ms, "
                          f"+{res['peak_extra_bytes'] / 2**30:.2f} GiB{kernels}"), flush=True)
                elem = torch.empty(0, dtype=getattr(torch, DTYPES[dtype])).element_size()
                floors = ({k: f * elem * t * v / bandwidth * 1e3 for k, f in FLOOR_FACTORS[op].items()}
                          if bandwidth else {})
                ours = results.get("scope", {})
                ours_p50 = _percentile(ours["times_ms"], 0.5) if "times_ms" in ours else None
                compiled = results.get("compile", {})
                compile_p50 = _percentile(compiled["times_ms"], 0.5) if "times_ms" in compiled else None
                for provider, res in results.items():
                    row = dict(op=op, provider=provider, dtype=dtype, tokens=t, vocab=v, **meta)
                    if "error" in res:
                        row.update(error=res["error"])
                    else:
                        p50 = _percentile(res["times_ms"], 0.5)
                        row.update(p20_ms=round(_percentile(res["times_ms"], 0.2), 3), p50_ms=round(p50, 3),
                                   p80_ms=round(_percentile(res["times_ms"], 0.8), 3),
                                   peak_extra_gib=round(res["peak_extra_bytes"] / 2**30, 3),
                                   speedup_of_scope=round(p50 / ours_p50, 2) if ours_p50 else "",
                                   speedup_vs_compile=round(compile_p50 / p50, 2) if compile_p50 else "")
                        for k, floor in floors.items():
                            row[f"ratio_to_{k}_floor"] = round(p50 / floor, 2)
                        if "in_step_ms" in res:
                            marginal = _in_step_marginal(res)
                            row["in_step_p50_ms"] = round(_percentile(res["in_step_ms"], 0.5), 3)
                            row["in_step_base_p50_ms"] = round(_percentile(res["in_step_base_ms"], 0.5), 3)
                            row["in_step_marginal_ms"] = round(marginal, 3)
                            for k, floor in floors.items():
                                row[f"in_step_ratio_to_{k}_floor"] = round(marginal / floor, 2)
                        if "kernels_ms" in res:
                            kp50 = _percentile(res["kernels_ms"], 0.5)
                            row["kernels_p50_ms"] = round(kp50, 3)
                            for k, floor in floors.items():
                                row[f"kernels_ratio_to_{k}_floor"] = round(kp50 / floor, 2)
                    if floors:
                        row.update({f"{k}_floor_ms": round(f, 3) for k, f in floors.items()})
                    if bandwidth:
                        row["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 3)
                    rows.append(row)

    out.parent.mkdir(parents=True, exist_ok=True)
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    markdown.write_text(_markdown(rows, meta, args, bandwidth))
    print(f"[bench] wrote {out} and {markdown}")
    return 0


def _markdown(rows, meta, args, bandwidth) -> str:
    cmd = "python tools/bench_ops.py " + " ".join(a for a in sys.argv[1:])
    lines = [
        f"# Op benchmark: forward + backward ({args.device})",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}; commit {meta['commit']}.",
        f"Command: `{cmd.strip()}`.",
        "Time: p50 over repeats of `(op(...) * w).sum().backward()`; memory: peak above the inputs; "
        "scope speedup = provider time / scope time (higher = scope faster); "
        "vs compile = torch.compile time / provider time (higher = provider faster). "
        "Providers: scope = the ops as called by default; deferred = with error_check=\"backward\" "
        "(no host sync in the forward); fused = with expected_grad=w (KL and gradient in one pass); "
        "fused_deferred = both; eager / compile = the plain-PyTorch reference.",
    ]
    if bandwidth:
        lines.append(f"Copy bandwidth measured in this run: {bandwidth / 1e12:.2f} TB/s. 'kernels alone': "
                     "the raw ops (partial, combine, backward; or kl_fused) timed with CUDA events over "
                     f"{KERNEL_BATCH} calls queued back to back (device time, launch latency hidden), "
                     "without autograd, input checks and the host sync of the error check.")
    header = "| op | T x V | dtype | provider | p50 ms | peak extra GiB | scope speedup | vs compile |"
    sep = "|---|---|---|---|---|---|---|---|"
    if bandwidth:
        header += " × two-pass floor | × one-pass floor | kernels alone ms | kernels × two-pass | kernels × one-pass |"
        sep += "---|---|---|---|---|"
    lines += ["", header, sep]
    for r in rows:
        size = f"{r['tokens']} x {r['vocab']}"
        if "error" in r:
            line = f"| {r['op']} | {size} | {r['dtype']} | {r['provider']} | {r['error']} | | | |"
            if bandwidth:
                line += " | | | | |"
        else:
            line = (f"| {r['op']} | {size} | {r['dtype']} | {r['provider']} | {r['p50_ms']:.2f} | "
                    f"{r['peak_extra_gib']:.3f} | {r['speedup_of_scope']}× | "
                    f"{str(r['speedup_vs_compile']) + '×' if r['speedup_vs_compile'] != '' else ''} |")
            if bandwidth:
                line += f" {r['ratio_to_two_pass_floor']} | {r['ratio_to_one_pass_floor']} |"
                if "kernels_p50_ms" in r:
                    line += (f" {r['kernels_p50_ms']:.2f} | {r['kernels_ratio_to_two_pass_floor']} | "
                             f"{r['kernels_ratio_to_one_pass_floor']} |")
                else:
                    line += " | | |"
        lines.append(line)
    in_step = [r for r in rows if "in_step_marginal_ms" in r]
    if in_step:
        lines += ["", f"In a last-layer step (`logits = h @ W.T`, hidden {args.hidden}, "
                  "the op, backward through both matmuls): p50 of that step, p50 of the same step with a fixed "
                  "logits gradient in place of the op (the two alternated within each repeat), and the median "
                  "of their paired differences, what the op adds to the step (the host time before its "
                  "first kernel overlaps the matmul there).", ""]
        header = "| op | T x V | provider | step ms | without the op ms | op adds ms |"
        sep = "|---|---|---|---|---|---|"
        if bandwidth:
            header += " × two-pass floor | × one-pass floor |"
            sep += "---|---|"
        lines += [header, sep]
        for r in in_step:
            line = (f"| {r['op']} | {r['tokens']} x {r['vocab']} | {r['provider']} | {r['in_step_p50_ms']:.2f} | "
                    f"{r['in_step_base_p50_ms']:.2f} | {r['in_step_marginal_ms']:.2f} |")
            if bandwidth:
                line += f" {r['in_step_ratio_to_two_pass_floor']} | {r['in_step_ratio_to_one_pass_floor']} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
