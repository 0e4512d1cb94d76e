"""The benchmark tools on this machine: bench_ops.py end to end on the CPU at a tiny size, the
parent logic of tune_kernels.py (variant choice, table, JSON) with stubbed child runs, and
gpu_check.sh's refusal without a GPU."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_ops_cpu_rows_for_every_provider(tmp_path):
    out = tmp_path / "ops.csv"
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_ops.py"), "--sizes", "64x1000", "--dtypes", "bf16",
         "--providers", "scope,fused,eager", "--repeats", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    got = {(r["op"], r["provider"]) for r in rows}
    # fused is a KL provider only
    assert got == {("kl", "scope"), ("kl", "fused"), ("kl", "eager"), ("logprob", "scope"),
                   ("logprob", "eager")}
    for r in rows:
        assert "error" not in r or not r["error"], r
        assert float(r["p50_ms"]) > 0 and float(r["peak_extra_gib"]) >= 0
    markdown = out.with_suffix(".md").read_text()
    assert "| kl | 64 x 1000 | bf16 | fused |" in markdown


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin",
                                                     "PYTHON": sys.executable})
    assert res.returncode == 2 and "no CUDA device" in res.stderr
