#!/usr/bin/env python
"""SCOPE vs OPD vs GRPO and SCOPE's ablations on the toy world, with paired seeds.

    python tools/run_experiment.py                      # defaults: < 30 min on 2 CPU cores
    python tools/run_experiment.py --smoke              # 2 steps, to check the pipeline (runs/experiment_smoke)

Every (method, seed) is one training run of examples/pretrain_scope.py (one process, one thread;
--parallel runs at a time) from the same starting points (--world: a teacher that is confidently
wrong on one family of problems, a student that answers some problems with a trace and some
directly — see checkpoints/experiment/summary.json), with the same prompts and budget for every
method at a given seed (the prompt stream is a function of the seed). The report pairs seeds
across methods: the difference to SCOPE is computed per seed, then averaged. It writes to --out:
results.md (tables, with command, date, machine and commit), results.csv / results.json, and
curves_*.png (held-out Avg@k / Pass@k over steps, mean with min-max band over seeds). Runs that
already finished are reused (delete --out/runs to start over).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform as host
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# method -> flags of examples/pretrain_scope.py (on top of the common ones)
METHODS = {
    "scope": [],
    "opd": ["--algorithm", "opd"],
    "grpo": ["--algorithm", "grpo", "--teacher-load", "null"],
    "scope_uniform": ["--scope-student-path", "uniform", "--scope-teacher-path", "uniform"],
    "scope_mle_path_only": ["--scope-teacher-path", "off", "--teacher-load", "null"],
    "scope_distill_path_only": ["--scope-student-path", "off"],
    # investigations (not in the default set): flatter weights, inverted teacher-path direction
    "scope_tau4": ["--scope-tau", "4"],
    "scope_flip_teacher": ["--scope-flip-teacher-direction", "true"],
}
DEFAULT_METHODS = ["scope", "opd", "grpo", "scope_uniform", "scope_mle_path_only", "scope_distill_path_only"]
FAMILY = "odd_hundreds_carry"
WEIGHT_KEYS = ["teacher_path/weight_entropy", "teacher_path/weight_max", "student_path/weight_entropy",
               "student_path/weight_max", "rollouts/student_path", "rollouts/teacher_path",
               "groups/all_correct", "groups/all_wrong", "kl/mean", "mle/mean", "reward/mean"]


RUN_ARGS = "run_args.json"  # the training arguments of a run, beside its metrics


def run_one(method: str, seed: int, args) -> Path:
    """Trains one (method, seed); returns its log dir. Skips a run whose log reached the end with
    the same training arguments (recorded in its log dir: another --steps, world, evaluation or
    method flags train again instead of reporting the old run)."""
    from scope_megatron.utils.logging import read_metrics

    log_dir = Path(args.out) / "runs" / method / f"seed{seed}"
    metrics = log_dir / "metrics.jsonl"
    world = Path(args.world)
    train_args = ["--load", str(world / "student"), "--teacher-load", str(world / "teacher"),
                  "--train-iters", str(args.steps), "--eval-interval", str(args.eval_interval),
                  "--eval-num-prompts", str(args.eval_prompts), "--eval-k", str(args.eval_k),
                  "--eval-pass-ks", f"1,{args.eval_k}", "--task-eval-families", FAMILY,
                  "--seed", str(seed), "--save", "null", "--log-dir", str(log_dir),
                  "--logging-overwrite", "true", "--log-interval", "1000000"] + METHODS[method]
    recorded = log_dir / RUN_ARGS
    if metrics.exists() and recorded.exists() and json.loads(recorded.read_text()) == train_args:
        try:  # read_metrics skips the unterminated last line of a run killed mid-write
            records = read_metrics(metrics)
        except ValueError:
            records = []
        if any(r["step"] == args.steps and f"eval/Avg@{args.eval_k}" in r for r in records):
            return log_dir
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(REPO / "examples" / "pretrain_scope.py")] + train_args
    log_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(train_args))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_dir / "stdout.log", "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (log_dir / "stdout.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{method} seed {seed} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return log_dir


def read_run(log_dir: Path) -> dict:
    from scope_megatron.utils.logging import read_metrics

    records = read_metrics(log_dir / "metrics.jsonl")
    evals, train = {}, []
    for r in records:
        if any(k.startswith("eval/") for k in r):
            evals.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k.startswith("eval/")})
        if "loss" in r:
            train.append(r)
    return {"evals": dict(sorted(evals.items())), "train": train}


def _mean_sd(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def aggregate(runs: dict, args) -> dict:
    """runs[method][seed] = read_run(...) -> the tables of the report."""
    k = args.eval_k
    keys = {"Avg": f"eval/Avg@{k}", "Pass": f"eval/Pass@{k}", "Avg_family": f"eval/{FAMILY}/Avg@{k}",
            "Avg_rest": f"eval/not_{FAMILY}/Avg@{k}"}
    final, start = {}, {}
    for method, seeds in runs.items():
        final[method] = {}
        for seed, run in seeds.items():
            last_step = args.steps if args.steps in run["evals"] else max(run["evals"])
            final[method][seed] = {name: run["evals"][last_step].get(key) for name, key in keys.items()}
            start[seed] = {name: run["evals"][min(run["evals"])].get(key) for name, key in keys.items()}
    summary = {}
    for method, seeds in final.items():
        summary[method] = {name: _mean_sd([v[name] for v in seeds.values()]) for name in keys}
    paired = {}
    for method in final:
        if method == "scope" or "scope" not in final:
            continue
        common = sorted(set(final[method]) & set(final["scope"]))
        paired[method] = {name: _mean_sd([final["scope"][s][name] - final[method][s][name] for s in common])
                          for name in keys}
        paired[method]["seeds"] = len(common)
    weights = {}
    for method, seeds in runs.items():
        weights[method] = {}
        for key in WEIGHT_KEYS:
            values = [r[key] for run in seeds.values() for r in run["train"] if key in r]
            weights[method][key] = sum(values) / len(values) if values else None
    start_summary = {name: _mean_sd([v[name] for v in start.values()]) for name in keys}
    return {"final": final, "summary": summary, "paired_vs_scope": paired, "weights": weights,
            "start": start_summary, "keys": keys}


def plot(runs: dict, agg: dict, out: Path, args) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, key in agg["keys"].items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method, seeds in runs.items():
            steps = sorted(set.intersection(*(set(run["evals"]) for run in seeds.values())))
            values = [[run["evals"][s].get(key) for s in steps] for run in seeds.values()]
            mean = [sum(col) / len(col) for col in zip(*values)]
            lo = [min(col) for col in zip(*values)]
            hi = [max(col) for col in zip(*values)]
            line, = ax.plot(steps, mean, label=f"{method} (n={len(values)})", lw=1.8)
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12)
        ax.set_xlabel("step")
        ax.set_ylabel(key.replace("eval/", ""))
        ax.set_title(f"held-out {key.replace('eval/', '')}: mean over seeds, band = min..max")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / (f"curves_{name}.png" if args.report == "results" else f"{args.report}_curves_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(ms, pct=True):
    m, sd = ms
    if m != m:
        return "n/a"
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if pct else f"{m:.3f} ± {sd:.3f}"


def write_report(agg: dict, args, seconds: float, command: str, out: Path) -> None:
    from scope_megatron.utils.logging import plot_curves  # noqa: F401  (matplotlib check)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
    except OSError:
        commit = "unknown"
    k = args.eval_k
    lines = [
        "# SCOPE vs OPD vs GRPO on the toy world (paired seeds)", "",
        f"Command: `{command}`; {datetime.date.today().isoformat()}; commit {commit}; "
        f"{host.processor() or host.machine()} with {os.cpu_count()} cores; {seconds / 60:.1f} min.",
        f"Each run: {args.steps} steps of 16 prompts x 8 rollouts from {args.world} (student and "
        f"teacher: see its summary.json), held-out Avg@{k} / Pass@{k} on {args.eval_prompts} problems "
        f"every {args.eval_interval} steps. Seeds {args.seeds} for every method (same prompt stream "
        f"per seed). `{FAMILY}`: the teacher's blind spot (it drops the carry into the hundreds "
        "when a's hundreds digit is odd).", "",
        f"Start (step 0, same for every method): Avg@{k} {_fmt(agg['start']['Avg'])}, blind-spot "
        f"family {_fmt(agg['start']['Avg_family'])}, rest {_fmt(agg['start']['Avg_rest'])}.", "",
        "## Final held-out accuracy (%, mean ± sd over seeds)", "",
        f"| method | Avg@{k} | Pass@{k} | Avg@{k} on {FAMILY} | Avg@{k} elsewhere |", "|---|---|---|---|---|"]
    for method, s in agg["summary"].items():
        lines.append(f"| {method} | {_fmt(s['Avg'])} | {_fmt(s['Pass'])} | {_fmt(s['Avg_family'])} | "
                     f"{_fmt(s['Avg_rest'])} |")
    lines += ["", "## SCOPE minus each method, paired by seed (points, mean ± sd of the difference)", "",
              f"| method | seeds | Δ Avg@{k} | Δ Pass@{k} | Δ on {FAMILY} | Δ elsewhere |", "|---|---|---|---|---|---|"]
    for method, d in agg["paired_vs_scope"].items():
        lines.append(f"| {method} | {d['seeds']} | {_fmt(d['Avg'])} | {_fmt(d['Pass'])} | "
                     f"{_fmt(d['Avg_family'])} | {_fmt(d['Avg_rest'])} |")
    lines += ["", "## Path and weight statistics (mean over steps and seeds)", "",
              "| method | " + " | ".join(WEIGHT_KEYS) + " |", "|---" * (len(WEIGHT_KEYS) + 1) + "|"]
    for method, w in agg["weights"].items():
        lines.append(f"| {method} | " + " | ".join("" if v is None else f"{v:.3f}" for v in w.values()) + " |")
    prefix = "curves_" if args.report == "results" else f"{args.report}_curves_"
    lines += ["", "Curves: " + ", ".join(f"[{p.name}]({p.name})" for p in sorted(out.glob(prefix + '*.png')))]
    (out / f"{args.report}.md").write_text("\n".join(lines) + "\n")


COMMITTED_OUT = REPO / "experiments" / "toy_scope_vs_baselines"
SMOKE_OUT = REPO / "runs" / "experiment_smoke"  # git-ignored: a smoke test never touches the results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--report", default="results", help="file stem of the report (results.md, ...)")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--eval-k", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--world", default=str(REPO / "checkpoints" / "experiment"))
    parser.add_argument("--out", default=None, help=f"output directory (default: {COMMITTED_OUT.relative_to(REPO)}; "
                        f"with --smoke {SMOKE_OUT.relative_to(REPO)})")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 2 methods, 1 seed, tiny evaluation")
    args = parser.parse_args(argv)
    if args.smoke:
        args.methods, args.seeds, args.steps, args.eval_interval = "scope,grpo", "1", 2, 2
        args.eval_prompts, args.eval_k = 8, 2
    if args.out is None:
        args.out = str(SMOKE_OUT if args.smoke else COMMITTED_OUT)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/run_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.time()
    jobs = [(m, s) for s in seeds for m in methods]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {pool.submit(run_one, m, s, args): (m, s) for m, s in jobs}
        for future in concurrent.futures.as_completed(futures):
            m, s = futures[future]
            future.result()
            print(f"[experiment] {m} seed {s} done ({(time.time() - started) / 60:.1f} min)", flush=True)
    runs = {m: {s: read_run(out / "runs" / m / f"seed{s}") for s in seeds} for m in methods}
    agg = aggregate(runs, args)
    plot(runs, agg, out, args)
    (out / f"{args.report}.json").write_text(json.dumps({k: v for k, v in agg.items() if k != "keys"}, indent=1) + "\n")
    with open(out / f"{args.report}.csv", "w") as f:
        f.write("method,seed," + ",".join(agg["keys"]) + "\n")
        for m, per_seed in agg["final"].items():
            for s, v in per_seed.items():
                f.write(f"{m},{s}," + ",".join("" if v[n] is None else f"{v[n]:.4f}" for n in agg["keys"]) + "\n")
    write_report(agg, args, time.time() - started, command, out)
    print((out / f"{args.report}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
