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
