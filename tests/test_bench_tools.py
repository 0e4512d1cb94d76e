"""The benchmark tools on this machine: bench_ops.py end to end on the CPU at a tiny size, the
parent logic of tune_kernels.py (variant choice, table, JSON) with stubbed child runs,
trace_step.py's timeline split (on made-up spans, and on a real CPU profile), and gpu_check.sh's
refusal without a GPU."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_ops_cpu_rows_for_every_provider(tmp_path):
    out = tmp_path / "ops.csv"
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_ops.py"), "--sizes", "64x1000", "--dtypes", "bf16",
         "--providers", "scope,deferred,fused,fused_deferred,eager", "--repeats", "2", "--warmup", "1",
         "--in-step-sizes", "64x1000", "--hidden", "32", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    got = {(r["op"], r["provider"]) for r in rows}
    # fused and fused_deferred are KL providers only
    assert got == {("kl", "scope"), ("kl", "deferred"), ("kl", "fused"), ("kl", "fused_deferred"),
                   ("kl", "eager"), ("logprob", "scope"), ("logprob", "deferred"), ("logprob", "eager")}
    for r in rows:
        assert "error" not in r or not r["error"], r
        assert float(r["p50_ms"]) > 0 and float(r["peak_extra_gib"]) >= 0
        # in the last-layer step: our providers, not the plain-PyTorch reference
        if r["provider"] == "eager":
            assert not r["in_step_marginal_ms"], r
        else:
            step, base = float(r["in_step_p50_ms"]), float(r["in_step_base_p50_ms"])
            assert step > 0 and base > 0 and r["in_step_marginal_ms"] not in ("", None)
    markdown = out.with_suffix(".md").read_text()
    assert "| kl | 64 x 1000 | bf16 | fused |" in markdown
    assert "| kl | 64 x 1000 | fused_deferred |" in markdown.split("In a last-layer step")[1]


def test_in_step_marginal_is_the_median_paired_difference():
    """What an op adds to the step: the median of (step with the op - step without it) over the
    repeats that timed them side by side, not the difference of the two medians."""
    bench_ops = _load("bench_ops")
    # a clock drift: both steps slow down together through the run
    res = {"in_step_ms": [11.0, 21.0, 31.0, 41.0], "in_step_base_ms": [10.0, 20.0, 30.0, 40.5]}
    assert bench_ops._in_step_marginal(res) == pytest.approx(1.0)
    res = {"in_step_ms": [12.0, 10.5, 10.2], "in_step_base_ms": [10.0, 10.0, 10.0]}
    assert bench_ops._in_step_marginal(res) == pytest.approx(0.5)


def test_in_step_steps_backpropagate_through_both_matmuls():
    """bench_ops.in_step_steps: the op step backpropagates through the op the gradient the
    chain rule gives, and the base step runs without it."""
    bench_ops = _load("bench_ops")
    from scope_megatron.ops import vocab_parallel_kl

    teacher = torch.randn(6, 40, dtype=torch.float64)
    weights = torch.rand(6, dtype=torch.float64)
    student = torch.empty(6, 40, dtype=torch.float64)
    seen = {}

    def fn(logits):
        logits.register_hook(lambda g: seen.__setitem__("grad_logits", g.clone()))
        seen["logits"] = logits.detach().clone()
        return vocab_parallel_kl(logits, teacher)

    op_step, base_step = bench_ops.in_step_steps(student, weights, hidden=8)
    op_step(fn)()
    logits = seen["logits"].requires_grad_()
    (vocab_parallel_kl(logits, teacher) * weights).sum().backward()
    torch.testing.assert_close(seen["grad_logits"], logits.grad)
    base_step()  # runs without the op


def test_tune_kernels_picks_the_fastest_variant(tmp_path, monkeypatch, capsys):
    tune = _load("tune_kernels")
    sizes = ["16384x151936", "16384x18992"]
    times = {"128": 1.0, "512": 0.9, "2048": 1.1}  # 512 fastest everywhere

    class Done:
        returncode = 0
        stderr = ""

        def __init__(self, variant):
            res = {s: {"kl": times[variant] * 2, "logprob": times[variant], "kl_fused": 1.5} for s in sizes}
            self.stdout = json.dumps(res)

    def fake_run(cmd, env, **kw):
        if env.get("SCOPE_CUDA_FUSED_CLUSTER") == "1":
            done = Done("128")
            done.stdout = json.dumps({"16384x151936": {"kl_fused": 6.0}})
            return done
        if env.get("SCOPE_CUDA_FUSED_THREADS"):  # the fused KL alone, at the sizes one block holds
            assert cmd[cmd.index("--sizes") + 1] == "16384x18992"
            done = Done("128")
            done.stdout = json.dumps({"16384x18992": {"kl_fused": 0.7}})
            return done
        return Done(env["SCOPE_CUDA_PACKS_PER_WARP"])

    monkeypatch.setattr(tune, "copy_bandwidth", lambda device: 3.0e12)
    monkeypatch.setattr(tune.subprocess, "run", fake_run)
    report = tmp_path / "tune.json"
    assert tune.main(["--variants", "128,512,2048", "--sizes", ",".join(sizes), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| 512 (best) |" in printed and "fused KL" in printed
    saved = json.loads(report.read_text())
    assert saved["best"] == "512" and set(saved["results"]) == {"128", "512", "2048"}
    assert "clusters of 4" in printed and saved["fused_clusters"] == {"16384x151936": {"kl_fused": 6.0}}
    assert "SCOPE_CUDA_FUSED_THREADS=512" in printed
    assert saved["fused_threads"] == {"512": {"16384x18992": {"kl_fused": 0.7}}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin",
                                                     "PYTHON": sys.executable})
    assert res.returncode == 2 and "no CUDA device" in res.stderr


def test_trace_split_on_made_up_spans():
    trace = _load("trace_step")
    Span = trace.Span
    window = Span("step", 0.0, 100.0)
    # a and b overlap (one busy stretch 10-40), then a gap 40-55, c until 80, tail 80-100
    work = [Span("b", 20.0, 40.0), Span("a", 10.0, 30.0), Span("c", 55.0, 80.0),
            Span("outside", 120.0, 130.0)]
    host = [Span("autograd", 35.0, 50.0), Span("sync", 48.0, 60.0), Span("early", 0.0, 5.0)]
    split = trace.split_step(window, work, host)
    assert [k.name for k in split.kernels] == ["a", "b", "c"]
    assert (split.wall, split.busy, split.lead, split.tail) == (100.0, 55.0, 10.0, 20.0)
    assert len(split.gaps) == 1
    after, before, us, ops = split.gaps[0]
    assert (after, before, us) == ("b", "c", 15.0)
    assert ops == [("autograd", 10.0), ("sync", 7.0)]  # overlap with 40-55, longest first
    assert split.busy + split.lead + split.gap_total + split.tail == split.wall
    # no work at all: everything is lead
    empty = trace.split_step(window, [], host)
    assert (empty.busy, empty.lead, empty.gaps) == (0.0, 100.0, [])
    assert trace.short_name("void scope::kl_partial_kernel<__nv_bfloat16, 8>(Args<float>)") == \
        "scope::kl_partial_kernel"


def test_trace_step_cpu_profile(tmp_path):
    trace = _load("trace_step")
    out = tmp_path / "trace.md"
    assert trace.main(["--sizes", "33x1000", "--steps", "3", "--warmup", "1", "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "## kl scope, 33 x 1000 bf16" in text and "## kl fused, 33 x 1000 bf16" in text
    res = trace.trace_case("kl", "deferred", 33, 1000, "fp32", "cpu", steps=3, warmup=1)
    names = ["scope_megatron::kl_partial", "scope_megatron::kl_combine", "scope_megatron::kl_backward"]
    for part in ("step", "raw"):
        summary = res[part]
        assert [n for n, _ in summary.kernels] == names, part
        assert all(us > 0 for _, us in summary.kernels)
        assert summary.wall >= summary.busy > 0
    fused = trace.trace_case("kl", "fused", 33, 1000, "fp32", "cpu", steps=3, warmup=1)
    assert [n for n, _ in fused["step"].kernels] == ["scope_megatron::kl_fused",
                                                      "scope_megatron::kl_backward_fixup"]
    lp = trace.trace_case("logprob", "scope", 33, 1000, "fp32", "cpu", steps=3, warmup=1)
    assert [n for n, _ in lp["step"].kernels][-1] == "scope_megatron::logprob_backward"
    # --in-step: the op inside a last-layer step, and that step without it
    res = trace.trace_case("kl", "fused_deferred", 33, 1000, "fp32", "cpu", steps=3, warmup=1, in_step=16)
    assert [n for n, _ in res["in_step"].kernels] == ["scope_megatron::kl_fused",
                                                      "scope_megatron::kl_backward_fixup"]
    assert res["in_step_base"].kernels == [] and res["in_step_base"].wall > 0  # matmuls only
    assert trace.main(["--sizes", "33x1000", "--ops", "kl:deferred", "--steps", "2", "--warmup", "1",
                       "--in-step", "16", "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "| in step (hidden 16) |" in text and "| in step − no op |" in text


SASS = """
        code for sm_90
                Function : _ZN13scope_kernels4cuda50_GLOBAL__N__f34c5ca8_11_kl_fused_cu_d4086c52_2972215kl_fused_kernelIfLb1ELi1EEEvi
        .headerflags    @"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 BRA 0x90 ;                                 /* 0x000000000000094c */
        /*0020*/                   FADD.FTZ R2, R3, R4 ;
        /*10000*/            @P1 STL [R1], R2 ;
        /*10010*/                   EXIT ;
                ..........
                Function : _Z5otherv
        /*0000*/                   MUFU.EX2 R0, R0 ;
        /*0010*/                   EXIT ;
"""


def test_sass_report_parses_cuobjdump_output():
    sass = _load("sass_report")
    kernels = sass.parse_sass(SASS)
    assert len(kernels) == 2
    name = next(k for k in kernels if "kl_fused" in k)
    assert kernels[name] == {"LDC": 1, "BRA": 1, "FADD": 1, "STL": 1, "EXIT": 1}  # 5-digit address too
    assert kernels["_Z5otherv"] == {"MUFU": 1, "EXIT": 1}
    assert sass.stable_name(name) == ("_ZN13scope_kernels4cuda50_GLOBAL__N_kl_fused_kernelIfLb1ELi1EEEvi")


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cuobjdump")), reason="needs nvcc and cuobjdump")
def test_sass_report_on_the_fused_kernel(capsys):
    sass = _load("sass_report")
    assert sass.main(["csrc/cuda/kl_fused.cu", "--match", "BFloat16ELb1ELi1E"]) == 0
    out = capsys.readouterr().out
    assert "kl_fused_kernel" in out and " 0 spill loads/stores" in out


def test_trace_classifies_cuda_profiler_events():
    """The CUDA side of a profile, made up: the step's record_function also appears as a device
    annotation spanning its kernels (neither a window nor work); runtime calls count as host."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    trace = _load("trace_step")
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA

    def ev(name, dev, start, end, parent=None, annotation=False):
        return SimpleNamespace(name=name, device_type=dev, time_range=SimpleNamespace(start=start, end=end),
                               cpu_parent=parent, is_user_annotation=annotation)

    step = ev("trace_step_0", cpu, 0.0, 100.0, annotation=True)
    fwd = ev("_VocabParallelKL", cpu, 2.0, 30.0, parent=step)
    events = [
        step, fwd,
        ev("aten::empty", cpu, 3.0, 4.0, parent=fwd),  # nested: not listed
        ev("cudaLaunchKernel", cpu, 5.0, 8.0, parent=fwd),
        ev("trace_step_0", gpu, 10.0, 90.0, annotation=True),
        ev("void scope::kl_partial_kernel<float>(int)", gpu, 10.0, 40.0),
        ev("autograd::engine::evaluate_function: X", cpu, 41.0, 55.0),  # the engine's thread
        ev("cudaStreamSynchronize", cpu, 60.0, 99.0, parent=step),
        ev("void scope::kl_backward_kernel<float>(int)", gpu, 60.0, 90.0),
    ]
    split, = trace.split_events(events, "cuda")
    assert [k.name for k in split.kernels] == ["scope::kl_partial_kernel", "scope::kl_backward_kernel"]
    assert (split.wall, split.busy, split.lead, split.tail) == (100.0, 60.0, 10.0, 10.0)
    (after, before, us, host), = split.gaps
    assert (after, before, us) == ("scope::kl_partial_kernel", "scope::kl_backward_kernel", 20.0)
    assert host == [("autograd::engine::evaluate_function: X", 14.0)]


def test_targets_from_the_committed_h100_run():
    """tools/targets.py on run 4's results (benchmarks/results: ops_cuda.csv, tune_cuda.json, and
    kernels_cuda.csv, run 4b's kernels timed back to back): the statuses the notes record."""
    targets = _load("targets")
    results = ROOT / "benchmarks" / "results"
    rows = list(csv.DictReader((results / "ops_cuda.csv").open()))
    kernel_rows = list(csv.DictReader((results / "kernels_cuda.csv").open()))
    tune = json.loads((results / "tune_cuda.json").read_text())
    got = {t.name: t for t in targets.evaluate(rows, tune, kernel_rows)}

    def status(prefix):
        match, = [t for name, t in got.items() if name.startswith(prefix)]
        return match.status

    assert status("KL fwd+bwd through autograd (scope)") == "not met"  # 1.12x (1.07x in run 3)
    assert status("KL (scope) against torch.compile") == "not met"  # 2.62x
    assert status("KL fwd+bwd through autograd (deferred)") == "met"  # 1.03x
    assert status("KL (deferred) against torch.compile") == "met"  # 2.83x
    assert status("KL extra memory") == "met"
    assert status("fused KL kernel alone, 16384 x 37984") == "met"  # 1.16x, back to back
    assert status("fused KL kernel alone, 16384 x 18992") == "not met"  # 1.28x
    assert status("fused KL through autograd (fused), V/4") == "not met"
    assert status("fused KL through autograd (fused_deferred), V/4") == "not met"  # 1.57x
    assert status("fused KL on clusters") == "not met"  # 1.50x
    assert status("log-prob fwd+bwd through autograd (scope)") == "not met"  # 1.16x
    assert status("log-prob fwd+bwd through autograd (deferred)") == "met"  # 1.06x
    assert status("TP shards") == "met"
    assert [n for n in got if n.startswith("fused KL kernel alone")] == [
        "fused KL kernel alone, 16384 x 37984 (V/4): x one-pass floor (kernels run)",
        "fused KL kernel alone, 16384 x 18992 (V/8): x one-pass floor (kernels run)"]
    # the TP shards need all four widths from one run: run 4b lacks V/2, so run 4's are used
    assert [n for n in got if n.startswith("TP shards")] == [
        "TP shards V, V/2, V/4, V/8: per-rank KL kernels x two-pass floor (worst)"]
    # without the second run, the first run's single-call times (launch latency included) count
    got = {t.name: t for t in targets.evaluate(rows, tune)}
    assert status("fused KL kernel alone, 16384 x 37984") == "not met"  # 1.30x
    # without the deferred rows and the clusters (run 2's shape) those targets are not measured
    older = [r for r in rows if "deferred" not in r["provider"]]
    got = {t.name: t for t in targets.evaluate(older, {**tune, "fused_clusters": {}})}
    assert status("KL fwd+bwd through autograd (deferred)") == "not measured"
    assert status("fused KL on clusters") == "not measured"


def test_bench_host_cpu(tmp_path):
    """tools/bench_host.py: a row per provider with step = trivial + raw + overhead, all > 0."""
    out = tmp_path / "host.md"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_host.py"), "--calls", "20", "--rounds", "2",
                          "--shape", "3x2x50", "--markdown", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| kl |")
            or line.startswith("| logprob |")]
    assert [(op.strip(), p.strip()) for op, p, *_ in rows] == [
        ("kl", "scope"), ("kl", "deferred"), ("kl", "fused"), ("kl", "fused_deferred"),
        ("logprob", "scope"), ("logprob", "deferred")]
    for _, _, step, trivial, raw, overhead in rows:
        step, trivial, raw, overhead = map(float, (step, trivial, raw, overhead))
        assert step > 0 and trivial > 0 and raw > 0
        assert overhead == pytest.approx(step - trivial - raw, abs=0.15)


def test_bench_host_profile_cpu():
    """tools/bench_host.py --profile: the op's own entry point shows in the profile of its steps,
    and an unknown provider is refused by name."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench_host.py"), "--calls", "8", "--shape", "3x2x50"]
    res = subprocess.run(cmd + ["--profile", "kl:fused_deferred"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cProfile of 8 steps of kl:fused_deferred" in res.stdout
    assert "vocab_parallel_kl" in res.stdout and "kl_fused" in res.stdout
    res = subprocess.run(cmd + ["--profile", "logprob:fused"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode != 0 and "logprob:fused" in res.stderr
