"""ModelConfig, the vocabulary padding and the student/teacher checks (plain Python), and the
Megatron models built and trained in real gloo groups (the checks of mc_workers' launches):
the three presets at TP=2, TP=2 logits equal to TP=1, training at TP=2 / PP=2 (with and without
interleaving) / DP=2 with a decreasing loss, the frozen teacher."""
import pytest
import torch

import tests.training.mc_megatron_src  # noqa: F401  (first: may redirect `import megatron`)
from scope_megatron.training import models, platform
from tests.training import mc_launches

SIZES = dict(num_layers=4, hidden_size=64, num_attention_heads=8, vocab_size=1000)


@pytest.mark.parametrize("vocab,divisible_by,tp,expected", [
    (250, 64, 1, 256), (250, 64, 2, 256), (250, 128, 2, 256), (256, 128, 2, 256), (257, 128, 2, 512),
    (151665, 128, 1, 151680), (151665, 128, 2, 151808), (151665, 128, 8, 152576), (1, 1, 1, 1),
])
def test_padded_vocab_size_is_megatrons_rule(vocab, divisible_by, tp, expected):
    assert models.padded_vocab_size(vocab, divisible_by, tp) == expected
    assert expected % (divisible_by * tp) == 0 and expected - vocab < divisible_by * tp


def test_padded_vocab_size_rejects_bad_input():
    with pytest.raises(ValueError, match="tp_size must be a positive integer"):
        models.padded_vocab_size(100, 128, 0)


@pytest.mark.parametrize("family,expected", [
    ("llama", dict(rotary_base=500000.0, norm_epsilon=1e-5, add_qkv_bias=False, qk_layernorm=False,
                   untie_embeddings_and_output_weights=True)),
    ("qwen2", dict(rotary_base=1e6, norm_epsilon=1e-6, add_qkv_bias=True, qk_layernorm=False)),
    ("qwen3", dict(rotary_base=1e6, norm_epsilon=1e-6, add_qkv_bias=False, qk_layernorm=True)),
])
def test_presets(family, expected):
    cfg = models.ModelConfig.preset(family, **SIZES, num_query_groups=2)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.query_groups == 2 and cfg.ffn_size == 256
    assert models.ModelConfig.preset(family, **SIZES, rotary_base=42.0).rotary_base == 42.0


def test_defaults_are_megatrons():
    cfg = models.ModelConfig(**SIZES)
    assert cfg.make_vocab_size_divisible_by == 128 and cfg.query_groups == 8
    assert cfg.ffn_size == 4 * 64 and not cfg.untie_embeddings_and_output_weights
    assert cfg.padded_vocab_size(2) == 1024


@pytest.mark.parametrize("call,message", [
    (lambda: models.ModelConfig.preset("gpt2", **SIZES), "unknown family 'gpt2'"),
    (lambda: models.ModelConfig.preset("llama", num_layers=2), "needs the model size: pass hidden_size"),
    (lambda: models.ModelConfig.preset("llama", **SIZES, hiden_size=3), "unknown field(s) hiden_size"),
    (lambda: models.ModelConfig(**{**SIZES, "hidden_size": 60}),
     "hidden_size 60 is not divisible by num_attention_heads 8"),
    (lambda: models.ModelConfig(**SIZES, num_query_groups=3), "not a multiple of num_query_groups 3"),
    (lambda: models.ModelConfig(**{**SIZES, "vocab_size": 0}), "vocab_size must be a positive integer"),
    (lambda: models.ModelConfig(**SIZES, hidden_dropout=1.0), "hidden_dropout must be in [0, 1)"),
    (lambda: models.ModelConfig(**SIZES, norm_epsilon=0.0), "norm_epsilon must be > 0"),
])
def test_config_errors_name_the_field(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_kv_channels_may_differ_from_hidden_over_heads():
    cfg = models.ModelConfig.preset("qwen3", **{**SIZES, "hidden_size": 60}, kv_channels=16)
    assert cfg.kv_channels == 16


@pytest.mark.parametrize("overrides,tp,pp,vpp,message", [
    ({}, 3, 1, None, "num_attention_heads 8 is not divisible by TP=3"),
    ({"num_query_groups": 2}, 4, 1, None, "num_query_groups 2 is not divisible by TP=4"),
    ({"ffn_hidden_size": 100}, 8, 1, None, "ffn_hidden_size 100 is not divisible by TP=8"),
    ({}, 1, 3, None, "num_layers 4 is not divisible by PP=3"),
    ({}, 1, 2, 4, "PP=2 x VPP=4 = 8 model chunks"),
])
def test_parallel_errors_name_the_field_and_fix(overrides, tp, pp, vpp, message):
    with pytest.raises(ValueError) as info:
        models.ModelConfig(**SIZES, **overrides).validate_parallel(tp, pp, vpp)
    assert message in str(info.value)


def test_check_same_vocab():
    student = models.ModelConfig.preset("qwen2", **SIZES)
    teacher = models.ModelConfig.preset("qwen2", **{**SIZES, "num_layers": 8, "hidden_size": 128})
    assert models.check_same_vocab(student, teacher, tp=2) == 1024
    with pytest.raises(ValueError, match="same tokenizer; set vocab_size"):
        models.check_same_vocab(student, models.ModelConfig(**{**SIZES, "vocab_size": 999}), tp=2)
    with pytest.raises(ValueError, match="give both configs the same padded_vocab"):
        models.check_same_vocab(student, models.ModelConfig(**SIZES, make_vocab_size_divisible_by=384), tp=2)


def test_fixed_padded_vocab_is_the_same_at_every_tp():
    cfg = models.ModelConfig(**SIZES, padded_vocab=1024)
    assert [cfg.padded_vocab_size(tp) for tp in (1, 2, 4)] == [1024, 1024, 1024]
    with pytest.raises(ValueError, match="padded_vocab 1024 is not divisible by TP=3"):
        cfg.padded_vocab_size(3)
    with pytest.raises(ValueError, match="smaller than vocab_size"):
        models.ModelConfig(**SIZES, padded_vocab=SIZES["vocab_size"] - 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_params_need_a_gpu_bf16_do_not(monkeypatch):
    monkeypatch.setitem(platform._STATE, "layout", platform.ParallelLayout(1, 1, 1, 1))
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        models.transformer_config(models.ModelConfig(**SIZES), params_dtype=torch.float16)
    assert models.transformer_config(models.ModelConfig(**SIZES), params_dtype=torch.bfloat16).bf16


def test_cast_parameters_leaves_buffers():
    module = torch.nn.RMSNorm(8)
    module.register_buffer("inv_freq", torch.rand(4))
    models.cast_parameters(module, torch.bfloat16)
    assert module.weight.dtype == torch.bfloat16 and isinstance(module.weight, torch.nn.Parameter)
    assert module.inv_freq.dtype == torch.float32


def test_forward_logits_refuses_a_pipeline_stage():
    stage = torch.nn.Module()
    stage.pre_process, stage.post_process = True, False
    with pytest.raises(ValueError, match="forward_only=True"):
        models.forward_logits(stage, torch.zeros(1, 4, dtype=torch.long))


# ---- in gloo groups -----------------------------------------------------------------------------

LAUNCH_CHECKS = [f"build_{family}_{tie}_tp2"
                 for family in ("llama", "qwen2", "qwen3") for tie in ("tied", "untied")] + [
    "tp2_logits_for_tp1_comparison",
    "tp1_logits_equal_gathered_tp2",
    "train_tp2_frozen_teacher",
    "pp2_stages_initialize_differently",
    "train_pp2_activation_recompute",
    "train_pp2_vpp2_interleaved",
    "train_dp2_distributed_optimizer",
    "accumulated_step_overlap_grad_reduce",
    "bf16_dp2_regular_optimizer",
    "bf16_dp2_distributed_optimizer",
    "bad_config_heads_not_divisible_by_tp",
    "bad_config_tp_not_dividing_world_size",
]


@pytest.mark.parametrize("check", LAUNCH_CHECKS)
def test_in_gloo_groups(check):
    mc_launches.assert_check("train", check)
