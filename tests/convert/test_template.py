"""The toy model's Hugging Face template: the tokenizer has the toy ids, the exported model runs
in transformers with the same logits, and what Llama cannot express is refused."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scope_megatron.convert import ConversionError, llama_config, write_toy_template
from scope_megatron.data.toy_arithmetic import ToyArithmetic
from scope_megatron.training.checkpoint import checkpoint_info
from tests.conftest import SESSION_SEED

REPO = Path(__file__).resolve().parents[2]
STUDENT = REPO / "checkpoints/toy/student"


def test_tokenizer_has_the_toy_ids(tmp_path):
    from transformers import AutoTokenizer

    world = ToyArithmetic()
    write_toy_template(checkpoint_info(STUDENT)["model_config"], tmp_path / "t")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    g = torch.Generator().manual_seed(SESSION_SEED)
    for problem in world.sample_train(40, g):
        assert tok(world.prompt_text(problem))["input_ids"] == world.prompt_ids(problem)
        solution = world.solution_ids(problem)  # ends with <eos>
        assert tok(world.solution_text(problem), add_special_tokens=False)["input_ids"] == solution[:-1]
        assert tok.decode(solution, skip_special_tokens=True) == world.solution_text(problem)


def test_exported_toy_model_matches_in_transformers(tmp_path):
    """tools/convert_megatron_to_hf.py --hf-template toy, then the logit comparison tool."""
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(STUDENT),
                        "--hf-template", "toy", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    r = subprocess.run([sys.executable, "tools/compare_hf_megatron.py", "--hf-dir", str(out), "--megatron-dir",
                        str(STUDENT), "--seq-len", "16"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "PASS: 32 positions x 18 tokens" in r.stdout, r.stdout + r.stderr


def test_what_llama_cannot_express_is_refused(tmp_path):
    cfg = dict(checkpoint_info(STUDENT)["model_config"])
    with pytest.raises(ConversionError, match="qk_layernorm .*Qwen3 template"):
        llama_config(dict(cfg, qk_layernorm=True))
    with pytest.raises(ConversionError, match="model vocab_size 50 != the tokenizer's 18 tokens"):
        write_toy_template(dict(cfg, vocab_size=50), tmp_path / "t")
    write_toy_template(cfg, tmp_path / "t")
    with pytest.raises(ConversionError, match="already holds a config.json"):
        write_toy_template(cfg, tmp_path / "t")
