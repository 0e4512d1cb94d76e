#!/usr/bin/env python
"""The GPU performance targets (issue 8) against a benchmark run: reads tools/bench_ops.py's CSV
(and tools/tune_kernels.py's JSON for the cluster kernel) and prints one row per target with the
measured value, the limit and met / not met / not measured. Floors come from the copy bandwidth
measured in the same run; with two variants of an entry (scope / deferred, fused /
fused_deferred) each is listed. Rows marked "(beside)" are not the issue's targets but the same
limit on another measure (bench_ops.py --in-step-sizes: what the op adds to a training step).

  python tools/targets.py --bench benchmarks/results/ops_cuda.csv --tune benchmarks/results/tune_cuda.json \
      --kernels benchmarks/results/kernels_cuda.csv

--kernels: a second bench_ops.py CSV whose "kernels alone" times replace the --bench run's for the
rows it holds (a run of the kernels alone, e.g. after a change of how they are timed); the
targets that use them say so.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from typing import Optional

ROWS = 16384
FULL = 151936
# O(T) allowance of the memory target: per-token statistics, results and flags (a few dozen
# bytes each) with room to spare
PER_TOKEN_BYTES = 1024


@dataclass
class Target:
    name: str
    measured: str
    limit: str
    status: str  # "met", "not met", "not measured"


def _status(value: Optional[float], limit: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "not measured"
    ok = value >= limit if higher_is_better else value <= limit
    return "met" if ok else "not met"


def _num(row: dict, key: str) -> Optional[float]:
    value = row.get(key, "") if row else ""
    return float(value) if value not in ("", None) else None


def _ratio_target(name: str, row: Optional[dict], ms_key: str, ratio_key: str, limit: float) -> Target:
    """A time target: row[ms_key] ms = row[ratio_key] x a floor, at most `limit`."""
    ratio = _num(row, ratio_key)
    measured = f"{_num(row, ms_key):.2f} ms = {ratio:.2f}x" if ratio is not None else "—"
    return Target(name, measured, f"≤ {limit:.2f}x", _status(ratio, limit))


def _index(rows: list) -> dict:
    return {(r["op"], r["provider"], int(r["tokens"]), int(r["vocab"])): r for r in rows
            if r.get("dtype", "bf16") == "bf16" and not r.get("error")}


def evaluate(bench_rows: list, tune: Optional[dict] = None, kernel_rows: Optional[list] = None) -> list:
    """[Target] from bench_ops.py's CSV rows (dicts) and tune_kernels.py's JSON; kernel_rows: the
    rows of a second run whose kernels-alone times take precedence (see --kernels)."""
    index, kernels = _index(bench_rows), _index(kernel_rows or [])

    def row(op, provider, vocab, tokens=ROWS):
        return index.get((op, provider, tokens, vocab))

    def kernel_row(op, provider, vocab, tokens=ROWS):
        """(row, note): the kernels-alone row, from the second run where it has one."""
        key = (op, provider, tokens, vocab)
        if _num(kernels.get(key), "kernels_p50_ms") is not None:
            return kernels[key], " (kernels run)"
        return index.get(key), ""

    out = []
    compile_kl = _num(row("kl", "compile", FULL), "p50_ms")
    for provider in ("scope", "deferred"):
        r = row("kl", provider, FULL)
        out.append(_ratio_target(f"KL fwd+bwd through autograd ({provider}), {ROWS} x {FULL}: x two-pass "
                                 "floor", r, "p50_ms", "ratio_to_two_pass_floor", 1.10))
        speedup = compile_kl / _num(r, "p50_ms") if r and compile_kl else None
        out.append(Target(f"KL ({provider}) against torch.compile ({compile_kl or '—'} ms)",
                          f"{speedup:.2f}x" if speedup else "—", "≥ 2.8x", _status(speedup, 2.8, True)))
    r = row("kl", "scope", FULL)
    extra = _num(r, "peak_extra_gib")
    budget = (ROWS * FULL * 2 + ROWS * PER_TOKEN_BYTES) / 2**30
    out.append(Target(f"KL extra memory, {ROWS} x {FULL}", f"{extra:.3f} GiB" if extra is not None else "—",
                      f"≤ {budget:.3f} GiB (bf16 gradient + {PER_TOKEN_BYTES} B/token)", _status(extra, budget)))
    for vocab, shard in ((FULL // 4, "V/4"), (FULL // 8, "V/8")):
        kernel, note = kernel_row("kl", "fused", vocab)
        out.append(_ratio_target(f"fused KL kernel alone, {ROWS} x {vocab} ({shard}): x one-pass floor{note}",
                                 kernel, "kernels_p50_ms", "kernels_ratio_to_one_pass_floor", 1.25))
        for provider in ("fused", "fused_deferred"):
            out.append(_ratio_target(f"fused KL through autograd ({provider}), {shard}: x one-pass floor",
                                     row("kl", provider, vocab), "p50_ms", "ratio_to_one_pass_floor", 1.25))
        for provider in ("fused", "fused_deferred"):
            # Not the measure (an isolated step): what the entry adds to a last-layer step,
            # where its host time before the first kernel overlaps the matmul. Listed beside it.
            out.append(_ratio_target(f"(beside) fused KL added to a last-layer step ({provider}), {shard}: "
                                     "x one-pass floor", row("kl", provider, vocab), "in_step_marginal_ms",
                                     "in_step_ratio_to_one_pass_floor", 1.25))
    clusters = ((tune or {}).get("fused_clusters") or {}).get(f"{ROWS}x{FULL}", {})
    cluster_ms = clusters.get("kl_fused") if isinstance(clusters, dict) else None
    bandwidth = (tune or {}).get("bandwidth")
    one_pass_ms = 3 * 2 * ROWS * FULL / bandwidth * 1e3 if bandwidth else None
    cluster = {"ms": cluster_ms, "ratio": cluster_ms / one_pass_ms} if cluster_ms and one_pass_ms else None
    out.append(_ratio_target(f"fused KL on clusters (stretch), {ROWS} x {FULL}: x one-pass floor", cluster,
                             "ms", "ratio", 1.25))
    for provider in ("scope", "deferred"):
        out.append(_ratio_target(f"log-prob fwd+bwd through autograd ({provider}), {ROWS} x {FULL}: x two-pass "
                                 "floor", row("logprob", provider, FULL), "p50_ms", "ratio_to_two_pass_floor", 1.10))
    # one run for all four widths: the second run's where it has them all, else the first's
    shards = [kernel_row("kl", "scope", FULL // n) for n in (1, 2, 4, 8)]
    note = shards[0][1] if len({n for _, n in shards}) == 1 else ""
    shards = [r for r, _ in shards] if note else [row("kl", "scope", FULL // n) for n in (1, 2, 4, 8)]
    ratios = [_num(r, "kernels_ratio_to_two_pass_floor") for r in shards]
    measured = None if None in ratios else max(ratios)
    out.append(Target(f"TP shards V, V/2, V/4, V/8: per-rank KL kernels x two-pass floor (worst){note}",
                      " / ".join(f"{_num(r, 'kernels_p50_ms'):.2f}" for r in shards) + f" ms, worst {measured:.2f}x"
                      if measured else "—", "≤ 1.10x each", _status(measured, 1.10)))
    return out


def markdown(targets: list) -> str:
    lines = ["| target | measured | limit | status |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {t.measured} | {t.limit} | {t.status} |" for t in targets]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True, help="tools/bench_ops.py CSV (CUDA run)")
    parser.add_argument("--tune", default=None, help="tools/tune_kernels.py JSON of the same run")
    parser.add_argument("--kernels", default=None,
                        help="a second bench_ops.py CSV whose kernels-alone times take precedence")
    args = parser.parse_args(argv)
    with open(args.bench, newline="") as f:
        rows = list(csv.DictReader(f))
    kernel_rows = None
    if args.kernels:
        with open(args.kernels, newline="") as f:
            kernel_rows = list(csv.DictReader(f))
    tune = None
    if args.tune:
        with open(args.tune) as f:
            tune = json.load(f)
    print(markdown(evaluate(rows, tune, kernel_rows)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
