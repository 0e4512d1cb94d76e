"""The three command-line tools as a user runs them (separate processes): exit status, output,
and refusals on stderr without a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _run(tool, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def teacher_ckpt(workspace):
    out = workspace / "cli" / "qwen2-teacher"
    r = _run("convert_hf_to_megatron.py", "--hf-dir", workspace / "hf" / "qwen2_bias_sharded",
             "--out", out, "--tp", "2", "--role", "teacher")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    return out


def test_convert_writes_checkpoint_and_teacher_section(teacher_ckpt):
    text = (teacher_ckpt / "scope_model.yaml").read_text()
    assert "\nteacher:\n" in text and f"--teacher-load {teacher_ckpt}" in text
    assert "padded_vocab: 256" in text and "add_qkv_bias: true" in text
    assert (teacher_ckpt / "latest").read_text() == "iter_0000000\n"


def test_convert_refusal_is_a_message_on_stderr(workspace):
    out = workspace / "cli" / "x"
    r = _run("convert_hf_to_megatron.py", "--hf-dir", workspace / "hf" / "qwen2_bias_sharded",
             "--out", out, "--tp", "8")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("convert_hf_to_megatron: error: --tp 8 --pp 1: num_attention_heads 4 "
                               "is not divisible by TP=8"), r.stderr
    assert not out.exists()


def test_export_sharded_bfloat16_loads_in_transformers(workspace, teacher_ckpt):
    from transformers import AutoModelForCausalLM

    hf, out = workspace / "hf" / "qwen2_bias_sharded", workspace / "cli" / "qwen2-bf16"
    r = _run("convert_megatron_to_hf.py", "--megatron-dir", teacher_ckpt, "--hf-template", hf,
             "--out", out, "--dtype", "bfloat16", "--max-shard-size", "30KB")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    original = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    assert exported.dtype == torch.bfloat16
    want = original.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, want[name].to(torch.bfloat16)), name


def test_compare_passes_at_tp2(workspace, teacher_ckpt):
    r = _run("compare_hf_megatron.py", "--hf-dir", workspace / "hf" / "qwen2_bias_sharded",
             "--megatron-dir", teacher_ckpt, "--tp", "2", "--seq-len", "16")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("PASS: 32 positions x 50 tokens") == 1, r.stdout
    assert "top-1 agreement 100.00%" in r.stdout
