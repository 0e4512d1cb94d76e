"""The per-family mapping without Megatron or files: config.json -> ModelConfig (public configs of
the supported families), the q/k/v and gate/up layouts, vocabulary padding and the refusals."""
import pytest
import torch

from scope_megatron.convert import ConversionError, SUPPORTED_ARCHITECTURES, family_for, hf_model_config
from scope_megatron.convert import transforms

# config.json of public checkpoints (fields that matter; older transformers' RoPE form)
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
                head_dim=128, hidden_act="silu", hidden_size=4096, intermediate_size=12288,
                max_position_embeddings=40960, num_attention_heads=32, num_hidden_layers=36,
                num_key_value_heads=8, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1000000,
                sliding_window=None, tie_word_embeddings=False, use_sliding_window=False,
                vocab_size=151936)
QWEN3_0_6B = dict(QWEN3_8B, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                  num_hidden_layers=28, tie_word_embeddings=True)
R1_DISTILL_QWEN_7B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                          hidden_size=3584, intermediate_size=18944, max_position_embeddings=131072,
                          num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
                          rms_norm_eps=1e-6, rope_theta=10000, sliding_window=4096,
                          tie_word_embeddings=False, use_sliding_window=False, vocab_size=152064)
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
                 hidden_act="silu", hidden_size=4096, intermediate_size=14336,
                 max_position_embeddings=8192, mlp_bias=False, num_attention_heads=32,
                 num_hidden_layers=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                 rope_scaling=None, rope_theta=500000.0, tie_word_embeddings=False, vocab_size=128256)


def test_qwen3_config():
    _, cfg = hf_model_config(QWEN3_8B, tp=2)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups) == (36, 4096, 32, 8)
    assert (cfg.kv_channels, cfg.ffn_size, cfg.rotary_base, cfg.norm_epsilon) == (128, 12288, 1e6, 1e-6)
    assert cfg.qk_layernorm and not cfg.add_qkv_bias and cfg.untie_embeddings_and_output_weights
    assert (cfg.vocab_size, cfg.padded_vocab) == (151936, 152064)   # multiple of 128 * TP=2
    _, small = hf_model_config(QWEN3_0_6B)
    assert small.kv_channels == 128 != small.hidden_size // small.num_attention_heads
    assert not small.untie_embeddings_and_output_weights and small.padded_vocab == 151936


def test_qwen2_and_llama_configs():
    _, qwen2 = hf_model_config(R1_DISTILL_QWEN_7B, tp=4)
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm and qwen2.kv_channels == 128
    assert qwen2.rotary_base == 10000.0 and qwen2.padded_vocab == 152064
    _, llama = hf_model_config(LLAMA3_8B, tp=8, pp=4)
    assert (llama.rotary_base, llama.norm_epsilon, llama.query_groups) == (500000.0, 1e-5, 8)
    assert not llama.add_qkv_bias and not llama.qk_layernorm and llama.padded_vocab == 129024


def test_transformers_5_rope_form_and_explicit_padding():
    config = dict(LLAMA3_8B, rope_parameters={"rope_theta": 123.0, "rope_type": "default"})
    del config["rope_theta"]
    _, cfg = hf_model_config(config, padded_vocab=128512, vocab_size=128000)
    assert (cfg.rotary_base, cfg.vocab_size, cfg.padded_vocab) == (123.0, 128000, 128512)
    _, cfg = hf_model_config(config, make_vocab_size_divisible_by=64, tp=2)
    assert cfg.padded_vocab == 128256 and cfg.make_vocab_size_divisible_by == 64


@pytest.mark.parametrize("change,message", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "RoPE scaling 'llama3'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_unsupported_llama_features_are_named(change, message):
    with pytest.raises(ConversionError, match=message):
        hf_model_config(dict(LLAMA3_8B, **change))


def test_unsupported_qwen_features_are_named():
    with pytest.raises(ConversionError, match="use_sliding_window"):
        hf_model_config(dict(R1_DISTILL_QWEN_7B, use_sliding_window=True))
    with pytest.raises(ConversionError, match="attention_bias"):
        hf_model_config(dict(QWEN3_8B, attention_bias=True))


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, "num_attention_heads 32 is not divisible by TP=3"),
    (16, 1, "num_query_groups 8 is not divisible by TP=16"),
    (1, 5, "num_layers 36 is not divisible by PP=5"),
])
def test_layouts_that_do_not_divide_the_model_name_the_numbers(tp, pp, message):
    with pytest.raises(ConversionError, match=f"--tp {tp} --pp {pp}: {message}"):
        hf_model_config(QWEN3_8B, tp=tp, pp=pp)


def test_padding_errors():
    with pytest.raises(ConversionError, match="padded_vocab 151937 is not divisible by TP=2"):
        hf_model_config(QWEN3_8B, tp=2, padded_vocab=151937)
    with pytest.raises(ConversionError, match="smaller than vocab_size"):
        hf_model_config(QWEN3_8B, padded_vocab=1000)
    with pytest.raises(ConversionError, match="not both"):
        hf_model_config(QWEN3_8B, padded_vocab=151936, make_vocab_size_divisible_by=64)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ConversionError) as err:
        family_for({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    assert "unsupported architecture MistralForCausalLM" in str(err.value)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)
    assert family_for({"model_type": "qwen2"}).architecture == "Qwen2ForCausalLM"


def test_qkv_is_grouped_per_key_value_head():
    """Megatron's linear_qkv rows: for each group g, its query heads, then k_g, then v_g."""
    heads, groups, hd, hidden = 4, 2, 3, 5
    q = torch.arange(heads * hd * hidden, dtype=torch.float32).reshape(heads * hd, hidden)
    k = -1 - torch.arange(groups * hd * hidden, dtype=torch.float32).reshape(groups * hd, hidden)
    v = 1000 + torch.arange(groups * hd * hidden, dtype=torch.float32).reshape(groups * hd, hidden)
    fused = transforms.fuse_qkv(q, k, v, groups=groups, head_dim=hd)
    per_group = heads // groups
    expected = []
    for g in range(groups):
        expected += [q[(g * per_group + j) * hd:(g * per_group + j + 1) * hd] for j in range(per_group)]
        expected += [k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    assert torch.equal(fused, torch.cat(expected))
    for got, want in zip(transforms.split_qkv(fused, heads=heads, groups=groups, head_dim=hd), (q, k, v)):
        assert torch.equal(got, want) and got.is_contiguous()
    bias = [t[:, 0].contiguous() for t in (q, k, v)]   # biases follow the row layout
    assert torch.equal(transforms.fuse_qkv(*bias, groups=groups, head_dim=hd), fused[:, 0])


def test_gate_up_and_vocabulary_rows():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = transforms.fuse_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(transforms.split_gate_up(fc1), (gate, up)))
    table = torch.randn(5, 3)
    padded = transforms.resize_rows(table, 8)
    assert torch.equal(padded[:5], table) and not padded[5:].any()
    assert torch.equal(transforms.resize_rows(padded, 5), table)
