#!/usr/bin/env python
"""Where the time of one benchmark step goes: a torch.profiler timeline of tools/bench_ops.py's
step, `(op(...) * w).sum().backward()`, of the raw ops alone (no autograd, checks or syncs) and,
for the two-pass ops, of the raw ops with a device sync before the backward kernel (the idle
device of the default error check, without autograd), each step split into

  work   the kernels (on CUDA: kernels, copies and fills on the GPU; on the CPU: the
         scope_megatron:: ops), each named, with its median duration;
  lead   from the step's start on the host to the first kernel's start;
  gaps   between kernels, each with the host ops that ran meanwhile (what the device waited for);
  tail   from the last kernel's end to the step's end on the host (the final sync returning).

wall = work (union) + lead + gaps + tail. Comparing the step with the raw ops says whether the
time the benchmark sees above the kernels alone is slower kernels, extra kernels, or waiting on
the host (benchmarks/NOTES.md: 0.6-1.0 ms on an H100, growing with the size). The profiler adds a
few microseconds of host time per op, so host-bound gaps read slightly long.

  python tools/trace_step.py --device cuda --sizes 16384x151936,16384x18992 --markdown trace.md
  python tools/trace_step.py --sizes 64x4096           # CPU: the host overhead around the kernels
  python tools/trace_step.py --device cuda --sizes 16384x18992 --ops kl:fused_deferred --in-step 4096

--in-step HIDDEN also profiles bench_ops.py's last-layer step (`logits = h @ W.T` with h [T,
HIDDEN], the op, backward through both matmuls) and the same step with a fixed logits gradient in
place of the op: where what an op adds to a training step goes (slower matmuls, the op's kernels,
or waiting on the host).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import (_device_name, _git_commit, in_step_steps, loss_step, make_inputs,  # noqa: E402
                       provider_fn, raw_op_call)

HOST_OPS_PER_GAP = 3


@dataclass
class Span:
    name: str
    start: float  # microseconds, the profiler's clock (host and device events share it)
    end: float

    @property
    def dur(self) -> float:
        return self.end - self.start


@dataclass
class StepSplit:
    """One step's wall time split into work, lead, gaps and tail (microseconds)."""
    wall: float
    busy: float
    lead: float
    tail: float
    kernels: list = field(default_factory=list)  # [Span] in start order
    gaps: list = field(default_factory=list)  # [(after kernel, before kernel, us, [(host op, us)])]

    @property
    def gap_total(self) -> float:
        return sum(g[2] for g in self.gaps)


def split_step(window: Span, work: list, host: list) -> StepSplit:
    """Splits `window` (the step on the host) by the device `work` spans inside it; gaps list the
    `host` spans overlapping them, longest overlap first. Overlapping work (concurrent kernels)
    counts once in busy; only idle stretches between kernels are gaps."""
    work = sorted((w for w in work if window.start <= w.start < window.end), key=lambda w: w.start)
    if not work:
        return StepSplit(window.dur, 0.0, window.dur, 0.0)
    busy, gaps = 0.0, []
    cur_start, cur_end, last = work[0].start, work[0].end, work[0]
    for w in work[1:]:
        if w.start > cur_end:
            busy += cur_end - cur_start
            overlaps = [(h.name, min(h.end, w.start) - max(h.start, cur_end)) for h in host]
            overlaps = sorted((o for o in overlaps if o[1] > 0), key=lambda o: -o[1])
            gaps.append((last.name, w.name, w.start - cur_end, overlaps[:HOST_OPS_PER_GAP]))
            cur_start = w.start
        if w.end >= cur_end:
            cur_end, last = w.end, w
    busy += cur_end - cur_start
    return StepSplit(window.dur, busy, work[0].start - window.start, max(0.0, window.end - cur_end),
                     work, gaps)


def short_name(name: str, width: int = 48) -> str:
    """A kernel's name without its template arguments and parameter list."""
    out, depth = [], 0
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    name = "".join(out).replace("void ", "").strip() or name
    return name if len(name) <= width else name[: width - 1] + "…"


def profile_steps(step, sync, steps: int, device: str) -> list:
    """Runs `step` then `sync` `steps` times under torch.profiler: [StepSplit] per step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            sync()
            with record_function(f"{STEP_PREFIX}{i}"):
                step()
                sync()
    return split_events(list(prof.events()), device)


STEP_PREFIX = "trace_step_"


def split_events(events: list, device: str) -> list:
    """[StepSplit] per step from the profiler's events (FunctionEvent-like: name, device_type,
    time_range, cpu_parent, is_user_annotation). Steps: the host ranges named STEP_PREFIX*.
    Work: on CUDA the device's events, less annotations (a record_function shows there too, as
    a range spanning its kernels); on the CPU the scope_megatron:: ops. Host: ops at the top of
    their thread's stack or right under the step, and on CUDA the runtime's calls."""
    from torch.autograd import DeviceType

    def is_step(e):
        return e.name.startswith(STEP_PREFIX)

    def span(e):
        return Span(short_name(e.name), e.time_range.start, e.time_range.end)

    windows = sorted((e for e in events if is_step(e) and e.device_type == DeviceType.CPU),
                     key=lambda e: e.time_range.start)
    step_ids = {id(w) for w in windows}
    if device == "cuda":
        work = [span(e) for e in events if e.device_type == DeviceType.CUDA and not is_step(e)
                and not getattr(e, "is_user_annotation", False)]
    else:
        work = [span(e) for e in events if e.name.startswith("scope_megatron::")]

    def is_host(e):
        if e.device_type != DeviceType.CPU or id(e) in step_ids:
            return False
        if device == "cuda" and e.name.startswith("cuda"):
            return True
        top = e.cpu_parent is None or id(e.cpu_parent) in step_ids
        return top and not (device == "cpu" and e.name.startswith("scope_megatron::"))

    host = [span(e) for e in events if is_host(e)]
    return [split_step(Span(w.name, w.time_range.start, w.time_range.end), work, host) for w in windows]


@dataclass
class Summary:
    wall: float
    busy: float
    lead: float
    gaps: float
    tail: float
    kernels: list  # [(name, median us)] in the order of the median step
    gap_rows: list  # [(after, before, median us, host ops of the median step)]


def summarize(splits: list) -> Summary:
    """Medians over the steps; kernels and gaps matched by position among steps with the same
    kernel sequence as the median step."""
    med = statistics.median
    ordered = sorted(splits, key=lambda s: s.wall)
    typical = ordered[len(ordered) // 2]
    names = [k.name for k in typical.kernels]
    same = [s for s in splits if [k.name for k in s.kernels] == names]
    kernels = [(n, med(s.kernels[i].dur for s in same)) for i, n in enumerate(names)]
    gap_count = len(typical.gaps)
    same_gaps = [s for s in same if len(s.gaps) == gap_count]
    gap_rows = [(a, b, med(s.gaps[i][2] for s in same_gaps), host)
                for i, (a, b, _, host) in enumerate(typical.gaps)]
    return Summary(med(s.wall for s in splits), med(s.busy for s in splits), med(s.lead for s in splits),
                   med(s.gap_total for s in splits), med(s.tail for s in splits), kernels, gap_rows)


def trace_case(op: str, provider: str, rows: int, vocab: int, dtype: str, device: str, steps: int,
               warmup: int, in_step: int = 0) -> dict:
    """{"step": Summary, "raw": Summary, "raw_sync": Summary} for one op / provider / size;
    raw_sync (two-pass ops only): the raw ops with a device sync between the forward kernels and
    the backward one, as the default error check does, but without autograd or checks. in_step
    (a hidden size) adds "in_step" (the op inside bench_ops.in_step_steps' last-layer step) and
    "in_step_base" (that step with a fixed logits gradient instead of the op)."""
    import torch

    case = dict(rows=rows, vocab=vocab, dtype=dtype, device=device)
    student, teacher, target, weights = make_inputs(case)
    fn = provider_fn(op, provider, teacher, target, weights)
    if fn is None:
        raise ValueError(f"{op} has no provider {provider!r}")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fused = provider.startswith("fused")
    calls = [("step", loss_step(fn, student, weights)),
             ("raw", raw_op_call(op + ("_fused" if fused else ""), student, teacher, target, weights))]
    if not fused:
        calls.append(("raw_sync", raw_op_call(op, student, teacher, target, weights, pause=sync)))
    if in_step:
        op_step, base_step = in_step_steps(student.detach(), weights, in_step)
        calls += [("in_step", op_step(fn)), ("in_step_base", base_step)]
    out = {}
    for name, call in calls:
        for _ in range(warmup):
            call()
        sync()
        out[name] = summarize(profile_steps(call, sync, steps, device))
    return out


def _ms(us: float) -> str:
    return f"{us / 1e3:.3f}"


def markdown(results: list, meta: dict, command: str) -> str:
    lines = [f"# Step timeline ({meta['device']})", "",
             f"torch {meta['torch']}; {meta['date']}; commit {meta['commit']}. Command: `{command}`.",
             "Medians over the profiled steps, in ms. step: `(op(...) * w).sum().backward()` with its "
             "checks, autograd and syncs (what tools/bench_ops.py times); raw: the raw ops alone, "
             "then a sync; raw + sync: the same with a device sync before the backward kernel (what "
             "the forward's error check adds, without autograd). work: the union of the kernels; lead: host start to the first kernel; "
             "gaps: the device idle between kernels; tail: last kernel to the host's end.", ""]
    for r in results:
        lines += [f"## {r['op']} {r['provider']}, {r['rows']} x {r['vocab']} {r['dtype']}", ""]
        if "error" in r:
            lines += [f"failed: {r['error']}", ""]
            continue
        s, raw = r["step"], r["raw"]
        lines += ["| | wall | work | lead | gaps | tail | kernels |", "|---|---|---|---|---|---|---|"]
        for name, x in (("step", s), ("raw", raw), ("raw + sync", r.get("raw_sync"))):
            if x is None:
                continue
            lines.append(f"| {name} | {_ms(x.wall)} | {_ms(x.busy)} | {_ms(x.lead)} | {_ms(x.gaps)} | "
                         f"{_ms(x.tail)} | {len(x.kernels)} |")
        lines.append(f"| step − raw | {_ms(s.wall - raw.wall)} | {_ms(s.busy - raw.busy)} | "
                     f"{_ms(s.lead - raw.lead)} | {_ms(s.gaps - raw.gaps)} | {_ms(s.tail - raw.tail)} | "
                     f"{len(s.kernels) - len(raw.kernels)} |")
        step_in, base = r.get("in_step"), r.get("in_step_base")
        if step_in is not None and base is not None:
            for name, x in ((f"in step (hidden {r['in_step_hidden']})", step_in), ("in step, no op", base)):
                lines.append(f"| {name} | {_ms(x.wall)} | {_ms(x.busy)} | {_ms(x.lead)} | {_ms(x.gaps)} | "
                             f"{_ms(x.tail)} | {len(x.kernels)} |")
            lines.append(f"| in step − no op | {_ms(step_in.wall - base.wall)} | {_ms(step_in.busy - base.busy)} | "
                         f"{_ms(step_in.lead - base.lead)} | {_ms(step_in.gaps - base.gaps)} | "
                         f"{_ms(step_in.tail - base.tail)} | {len(step_in.kernels) - len(base.kernels)} |")
        raw_by_name = {}
        for name, us in raw.kernels:
            raw_by_name.setdefault(name, us)
        lines += ["", "| kernel (step order) | step | raw |", "|---|---|---|"]
        for name, us in s.kernels:
            lines.append(f"| `{name}` | {_ms(us)} | {_ms(raw_by_name[name]) if name in raw_by_name else '—'} |")
        if step_in is not None and base is not None:
            lines += ["", "| kernel in step (step order) | ms | | kernel in step, no op | ms |", "|---|---|---|---|---|"]
            for i in range(max(len(step_in.kernels), len(base.kernels))):
                a = step_in.kernels[i] if i < len(step_in.kernels) else ("", None)
                b = base.kernels[i] if i < len(base.kernels) else ("", None)
                lines.append(f"| {f'`{short_name(a[0])}`' if a[0] else ''} | {_ms(a[1]) if a[1] is not None else ''} | "
                             f"| {f'`{short_name(b[0])}`' if b[0] else ''} | {_ms(b[1]) if b[1] is not None else ''} |")
        big = sorted(s.gap_rows, key=lambda g: -g[2])[:4]
        if big:
            lines += ["", "| gap in the step (largest) | ms | host ops meanwhile (overlap ms) |", "|---|---|---|"]
            for a, b, us, host in big:
                ops = ", ".join(f"`{short_name(h, 40)}` {_ms(o)}" for h, o in host) or "—"
                lines.append(f"| after `{a}`, before `{b}` | {_ms(us)} | {ops} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ops", default="kl:scope,kl:fused,logprob:scope",
                        help="comma-separated op:provider, providers as in bench_ops.py (scope, "
                             "deferred, fused, fused_deferred)")
    parser.add_argument("--sizes", default="64x4096", help="comma-separated TxV")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--markdown", default=None, help="write the tables here too")
    parser.add_argument("--in-step", type=int, default=0, metavar="HIDDEN",
                        help="also profile the op inside a last-layer step of this hidden size, and "
                             "that step without the op (bench_ops.py --in-step-sizes' steps)")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    meta = {"device": _device_name(args.device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "commit": _git_commit()}
    results, failed = [], False
    for size in args.sizes.split(","):
        rows, vocab = (int(x) for x in size.lower().split("x"))
        for spec in args.ops.split(","):
            op, _, provider = spec.partition(":")
            row = dict(op=op, provider=provider or "scope", rows=rows, vocab=vocab, dtype=args.dtype,
                       in_step_hidden=args.in_step)
            try:
                row.update(trace_case(op, row["provider"], rows, vocab, args.dtype, args.device, args.steps,
                                      args.warmup, in_step=args.in_step))
            except Exception as exc:  # one failed case keeps the others' tables
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                failed = True
            results.append(row)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    text = markdown(results, meta, "python tools/trace_step.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
