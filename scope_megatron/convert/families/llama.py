"""LlamaForCausalLM (Llama 2 / 3 with plain RoPE): no biases, untied output layer by default, RoPE
base from config.json (Llama 3: 500000). Llama 3.1's "llama3" RoPE scaling (also used by
DeepSeek-R1-Distill-Llama) is refused (ModelConfig has plain RoPE)."""
from typing import List

from ._decoder import DecoderFamily


class Llama(DecoderFamily):
    architecture = "LlamaForCausalLM"
    preset = "llama"

    def unsupported(self, hf: dict) -> List[str]:
        found = super().unsupported(hf)
        if hf.get("attention_bias"):
            found.append("attention_bias (biases on q/k/v and o_proj; Megatron's add_qkv_bias "
                         "covers q/k/v only)")
        return found
