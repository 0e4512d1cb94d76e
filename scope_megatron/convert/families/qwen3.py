"""Qwen3ForCausalLM (dense Qwen3): RMSNorm on each query and key head before RoPE (q_norm,
k_norm -> Megatron's q_layernorm, k_layernorm), head_dim from config.json (128, also where it
differs from hidden_size / heads), no biases."""
from typing import List

from ._decoder import DecoderFamily


class Qwen3(DecoderFamily):
    architecture = "Qwen3ForCausalLM"
    preset = "qwen3"
    qk_norm = True

    def unsupported(self, hf: dict) -> List[str]:
        found = super().unsupported(hf)
        if hf.get("attention_bias"):
            found.append("attention_bias (biases on q/k/v and o_proj)")
        return found
