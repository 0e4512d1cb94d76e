"""Opt-in: the SGLang engine, teacher and disk weight sync against a REAL SGLang server serving
the toy model. Skipped unless `import sglang` works (in this interpreter, or in
SCOPE_SGLANG_PYTHON's when sglang has its own environment) and there is a CUDA device, or
SCOPE_SGLANG_CPU=1 asks for the unsupported CPU setup of docs/sglang-api.md (sgl_kernel stub on
PYTHONPATH via SCOPE_SGLANG_STUB, torchvision shim installed; startup takes ~1 minute).

  SCOPE_SGLANG_DETERMINISTIC=1  launch with --enable-deterministic-inference and also check that
                                the same (seed, key) reproduces the rollouts.

What this checks that the test server cannot: SGLang's own answer shapes (stop token in
output_ids, output log-probs at the sampling temperature before top-k/top-p, the alignment of
input_token_logprobs with logprob_start_len = P - 1, weight_version after a disk update,
/get_weights_by_name rows) against the float64 Hugging Face model.
"""
import os
import subprocess
import sys

import pytest
import torch

CPU = os.environ.get("SCOPE_SGLANG_CPU") == "1"
DETERMINISTIC = os.environ.get("SCOPE_SGLANG_DETERMINISTIC") == "1"
# the interpreter that runs the server: sglang often lives in its own environment
PYTHON = os.environ.get("SCOPE_SGLANG_PYTHON", sys.executable)


def _sglang_importable() -> bool:
    # sglang is optional and heavy; any import failure means "not available here"
    env = dict(os.environ)
    stub = os.environ.get("SCOPE_SGLANG_STUB")
    if CPU and stub:
        env.update(PYTHONPATH=os.pathsep.join([stub, env.get("PYTHONPATH", "")]), SGLANG_USE_CPU_ENGINE="1")
    try:
        return subprocess.run([PYTHON, "-c", "import sglang"], env=env, capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_SGLANG = (torch.cuda.is_available() or CPU) and _sglang_importable()

pytestmark = pytest.mark.skipif(not _SGLANG, reason="needs sglang (in SCOPE_SGLANG_PYTHON's environment) and a "
                                                    "CUDA device (or SCOPE_SGLANG_CPU=1)")

from scope_megatron.rollout import SamplingParams  # noqa: E402
from scope_megatron.rollout.sglang import (DiskWeightSync, SGLangClient, SGLangEngine, SGLangServers,  # noqa: E402
                                           SGLangTeacher, check_logprobs)
from tests.rollout.fake_sglang_server import perturbed_copy, reference_logprobs, toy_hf_dir  # noqa: E402
from tests.rollout.test_sglang_servers import _free_ports  # noqa: E402

EOS = 2
PROMPTS = [[1, 9, 12, 11, 13, 5, 12, 9, 14], [1, 5, 4, 9, 13, 10, 3, 10, 14], [1, 9, 6, 10, 13, 8, 8, 8, 14]]
ATOL = 2e-3  # float32 server kernels vs the float64 reference


def _launch_args():
    args = ["--dtype", "float32", "--attention-backend", "torch_native", "--skip-server-warmup",
            "--disable-cuda-graph", "--log-level", "warning"]
    env = {"HF_HUB_OFFLINE": "1"}
    if CPU:
        args += ["--device", "cpu", "--max-total-tokens", "4096"]
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        stub = os.environ.get("SCOPE_SGLANG_STUB")
        if stub:
            env["PYTHONPATH"] = os.pathsep.join([stub, os.environ.get("PYTHONPATH", "")])
    return args, env


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    args, env = _launch_args()
    log_dir = tmp_path_factory.mktemp("sglang-logs")
    with SGLangServers.launch(toy_hf_dir(), num_servers=1, base_port=_free_ports(1), tp_size=1,
                              mem_fraction_static=None if CPU else 0.2, deterministic=DETERMINISTIC,
                              extra_args=args, env=env, log_dir=log_dir, startup_timeout=600,
                              command=(PYTHON, "-m", "sglang.launch_server")) as s:
        yield s


@pytest.fixture(scope="module")
def engine(servers):
    eng = SGLangEngine(SGLangClient(servers.urls, timeout=300, retries=1), pad_id=0)
    yield eng
    eng.close()


@pytest.mark.parametrize("temperature,top_k", [(0.7, 5), (1.0, 0), (0.0, 0)])
def test_rollout_logprobs_match_the_model(engine, temperature, top_k):
    params = SamplingParams(n=2, temperature=temperature, top_k=top_k, max_new_tokens=40,
                            stop_token_ids=(EOS,), seed=3)
    out = engine.generate(PROMPTS, params, key=1)
    trainer = torch.zeros_like(out.logprobs)
    for r, resp in enumerate(out.responses()):
        if out.finished[r]:
            assert resp[-1] == EOS and EOS not in resp[:-1]
        trainer[r, :len(resp)] = reference_logprobs(toy_hf_dir(), PROMPTS[r // 2], resp,
                                                    params.logprob_temperature).float()
    gap = check_logprobs(out.logprobs, trainer, out.response_mask, raise_error=True)
    assert gap["max_abs"] < ATOL, gap
    assert bool(out.finished.any())


def test_teacher_scores_are_aligned(engine, servers):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=30, stop_token_ids=(EOS,), seed=5)
    out = engine.generate(PROMPTS, params, key=2)
    scores = SGLangTeacher(engine.client, top_logprobs_num=3).score(out)
    for r, resp in enumerate(out.responses()):
        ref, top = reference_logprobs(toy_hf_dir(), PROMPTS[r // 2], resp, top_k=3)
        torch.testing.assert_close(scores.logprobs[r, :len(resp)].double(), ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(scores.top_logprobs[r, :len(resp)].double(), top.values, rtol=0, atol=ATOL)
    # same model, T = 1: the teacher's scores are the sampling log-probs
    assert (scores.logprobs - out.logprobs)[out.response_mask].abs().max() < ATOL


@pytest.mark.skipif(not DETERMINISTIC, reason="sampling_seed is honoured only with deterministic inference")
def test_same_seed_and_key_reproduce(engine):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=20, stop_token_ids=(EOS,), seed=9)
    a, b = engine.generate(PROMPTS, params, key=4), engine.generate(PROMPTS, params, key=4)
    assert a.responses() == b.responses()


def test_disk_weight_sync(servers, tmp_path):
    sync = DiskWeightSync(lambda p: perturbed_copy(toy_hf_dir(), p, scale=1.3, shift=0.0), tmp_path, num_verify=21)
    engine = SGLangEngine(SGLangClient(servers.urls, timeout=300), pad_id=0, weight_sync=sync)
    engine.update_weights(step=1)  # raises unless every server reports step-1 and the new values
    assert engine.weight_version == "step-1"
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=20, stop_token_ids=(EOS,))
    out = engine.generate(PROMPTS, params)
    for r, resp in enumerate(out.responses()):
        ref = reference_logprobs(tmp_path / "step-1", PROMPTS[r], resp)
        torch.testing.assert_close(out.logprobs[r, :len(resp)].double(), ref, rtol=0, atol=ATOL)
    # back to the original weights for the other tests of the module
    DiskWeightSync(lambda p: perturbed_copy(toy_hf_dir(), p, scale=1.0, shift=0.0), tmp_path / "back").update(
        engine.client, 2)
    engine.close()


def test_disk_weight_sync_to_a_qwen2_server(tmp_path):
    # sglang 0.5.21's Qwen2 class has no get_weights_by_name (400 for every name): the sync must still
    # succeed (checked by weight_version, with a warning) and the server must sample from the new weights
    import shutil

    import transformers

    config = transformers.Qwen2Config(vocab_size=18, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    model = tmp_path / "qwen2"
    transformers.Qwen2ForCausalLM(config).save_pretrained(model)
    for f in toy_hf_dir().iterdir():  # the toy tokenizer (same 18 ids)
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model / f.name)
    args, env = _launch_args()
    with SGLangServers.launch(model, num_servers=1, base_port=_free_ports(1), tp_size=1,
                              mem_fraction_static=None if CPU else 0.2, extra_args=args, env=env,
                              log_dir=tmp_path / "logs", startup_timeout=600,
                              command=(PYTHON, "-m", "sglang.launch_server")) as servers:
        sync = DiskWeightSync(lambda p: perturbed_copy(model, p, scale=1.3, shift=0.0), tmp_path / "sync")
        engine = SGLangEngine(SGLangClient(servers.urls, timeout=300), pad_id=0, weight_sync=sync)
        with pytest.warns(RuntimeWarning, match="verified by weight_version only"):
            engine.update_weights(step=1)
        assert engine.weight_version == "step-1"
        out = engine.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=10, stop_token_ids=(EOS,)))
        for r, resp in enumerate(out.responses()):
            ref = reference_logprobs(tmp_path / "sync" / "step-1", PROMPTS[r], resp)
            torch.testing.assert_close(out.logprobs[r, :len(resp)].double(), ref, rtol=0, atol=ATOL)
        engine.close()
