"""tools/run_experiment.py end to end with --smoke (2 steps, 2 methods, 1 seed)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_experiment_smoke(tmp_path):
    out = tmp_path / "exp"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "run_experiment.py"), "--smoke", "--out", str(out),
                          "--world", str(REPO / "checkpoints" / "toy")],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = (out / "results.md").read_text()
    assert "| scope |" in report and "| grpo |" in report and "SCOPE minus each method" in report
    for name in ("Avg", "Pass", "Avg_family", "Avg_rest"):
        png = out / f"curves_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.csv").read_text().count("\n") == 3  # header + 2 runs


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_experiment", REPO / "tools" / "run_experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_never_writes_into_the_committed_results():
    tool = _tool()
    smoke = Path(tool.parse_args(["--smoke"]).out).resolve()
    committed = (REPO / "experiments" / "toy_scope_vs_baselines").resolve()
    assert smoke != committed and committed not in smoke.parents
    assert Path(tool.parse_args([]).out).resolve() == committed
    assert tool.parse_args(["--smoke", "--out", "/tmp/x"]).out == "/tmp/x"


def test_runs_are_reused_when_finished_and_rerun_after_a_kill_mid_line(tmp_path, monkeypatch):
    tool = _tool()
    launched = []
    monkeypatch.setattr(tool.subprocess, "run", lambda cmd, **kw: launched.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    args = tool.parse_args(["--smoke", "--out", str(tmp_path)])
    log_dir = tmp_path / "runs" / "scope" / "seed1"
    log_dir.mkdir(parents=True)
    metrics = log_dir / "metrics.jsonl"
    metrics.write_text('{"step": 2, "wall_time": 1.0, "eval/Avg@2": 0.5}\n{"step": 2, "lo')
    assert tool.run_one("scope", 1, args) == log_dir and len(launched) == 1  # no recorded arguments: run
    launched.clear()
    assert tool.run_one("scope", 1, args) == log_dir and not launched  # finished, same arguments: reused
    other = tool.parse_args(["--smoke", "--out", str(tmp_path), "--world", str(tmp_path / "other")])
    assert tool.run_one("scope", 1, other) == log_dir and len(launched) == 1  # another world: run again
    assert launched[0][launched[0].index("--load") + 1] == str(tmp_path / "other" / "student")
    launched.clear()
    tool.run_one("scope", 1, args)  # record the smoke arguments again
    metrics.write_text('{"step": 0, "wall_time": 1.0, "eval/Avg@2": 0.5}\n{"step": 1, "lo')
    assert tool.run_one("scope", 1, args) == log_dir and len(launched) == 2  # killed: run again


def test_the_report_takes_the_evaluation_at_the_requested_step():
    """A run that also holds later evaluations (a longer run before it) reports --steps' one."""
    tool = _tool()
    args = tool.parse_args(["--smoke", "--steps", "2"])
    key = f"eval/Avg@{args.eval_k}"
    run = {"evals": {0: {key: 0.0}, 2: {key: 0.2}, 4: {key: 0.4}}, "train": []}
    tables = tool.aggregate({"scope": {1: run}}, args)
    assert tables["summary"]["scope"]["Avg"][0] == 0.2
