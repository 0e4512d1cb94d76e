"""Qwen2ForCausalLM (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen): bias on the q, k, v projections
(always, transformers' Qwen2 has no switch), none on o_proj or the MLP."""
from ._decoder import DecoderFamily


class Qwen2(DecoderFamily):
    architecture = "Qwen2ForCausalLM"
    preset = "qwen2"
    qkv_bias = True
