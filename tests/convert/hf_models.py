"""Tiny random Hugging Face models built locally from transformers configs (no downloads), and a
streaming writer of a larger random Llama for the memory test."""
from __future__ import annotations

from pathlib import Path

import torch

# name -> (architecture, config fields, save_pretrained max_shard_size or None, dtype)
TINY = {
    # GQA (4 heads, 2 groups), untied, vocabulary 50 (padded to 128 / 256 rows)
    "llama_gqa_untied": ("LlamaForCausalLM", dict(vocab_size=50, num_key_value_heads=2,
                                                  rope_theta=500000.0, tie_word_embeddings=False), None,
                         torch.float32),
    # no GQA, tied output layer, odd vocabulary
    "llama_tied": ("LlamaForCausalLM", dict(vocab_size=37, num_key_value_heads=4,
                                            tie_word_embeddings=True, rms_norm_eps=1e-5), None,
                   torch.float32),
    # q/k/v bias, GQA, tied, saved in several shards with an index
    "qwen2_bias_sharded": ("Qwen2ForCausalLM", dict(vocab_size=50, num_key_value_heads=2,
                                                    tie_word_embeddings=True, rope_theta=1e6), "40KB",
                           torch.float32),
    # q/k RMSNorm, head_dim 32 != hidden / heads, GQA, untied
    "qwen3_qknorm": ("Qwen3ForCausalLM", dict(vocab_size=61, num_key_value_heads=2, head_dim=32,
                                              tie_word_embeddings=False, rope_theta=1e6), None,
                     torch.float32),
    # stored in bfloat16: the checkpoint keeps bfloat16, a float32 model loads it
    "qwen3_bf16": ("Qwen3ForCausalLM", dict(vocab_size=61, num_key_value_heads=2, head_dim=32), None,
                   torch.bfloat16),
}
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)


def build_hf_model(out: Path, architecture: str, fields: dict, seed: int, *, max_shard_size=None,
                   dtype=torch.float32) -> Path:
    """save_pretrained of a random model: every weight N(0, 0.05) (norm weights 1 + that, biases
    too), so that a wrong transform of any tensor shows."""
    import transformers

    cls = getattr(transformers, architecture)
    config = cls.config_class(**{**BASE, **fields})
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.05)
            if "norm" in name:
                p.add_(1.0)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return out


def write_random_llama(out: Path, *, layers: int, hidden: int, heads: int, groups: int, ffn: int,
                       vocab: int, seed: int, shard_bytes: int) -> dict:
    """A random untied LlamaForCausalLM written tensor by tensor (never in memory as a whole);
    returns {"model_bytes", "largest_hf_tensor", "largest_megatron_tensor"}."""
    import json

    from scope_megatron.convert.hf_io import PlannedTensor, SafetensorsWriter

    out.mkdir(parents=True)
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                       p + "self_attn.k_proj.weight": (groups * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (groups * head_dim, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                       p + "post_attention_layernorm.weight": (hidden,),
                       p + "mlp.gate_proj.weight": (ffn, hidden),
                       p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    plan = [PlannedTensor(n, s, torch.float32) for n, s in shapes.items()]
    writer = SafetensorsWriter(out, plan, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for t in plan:
        writer.write(t.name, torch.randn(t.shape, generator=gen) * 0.05)
    writer.close()
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
                  intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=groups, vocab_size=vocab, rms_norm_eps=1e-5,
                  rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
                  max_position_embeddings=128, torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config))
    return {"model_bytes": sum(t.nbytes for t in plan),
            "largest_hf_tensor": max(t.nbytes for t in plan),
            "largest_megatron_tensor": 2 * ffn * hidden * 4}
