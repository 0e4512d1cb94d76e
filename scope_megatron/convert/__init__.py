"""Hugging Face <-> Megatron checkpoint conversion (Llama, Qwen2, Qwen3) and a logit check.

    from scope_megatron.convert import convert_hf_to_megatron, export_hf

    ckpt = convert_hf_to_megatron("Qwen3-1.7B", "ckpt/qwen3", tp=2)   # one process, streaming
    # ... train with --config ckpt/qwen3/scope_model.yaml --load ckpt/qwen3 ...
    export_hf("runs/x/checkpoints", "Qwen3-1.7B", "hf/qwen3-trained")  # from a checkpoint
    export_hf(model_chunks, "Qwen3-1.7B", "hf/step")   # from a running trainer (collective)

Modules: `families` (per-family config and tensor mapping), `transforms` (q/k/v and gate/up
fusion, vocabulary rows), `hf_io` / `megatron_io` (streaming readers and writers), `output`
(atomic output directories), `compare` (logits of both sides), `template` (an HF template for
the toy model). Tools: tools/convert_*.py,
tools/compare_hf_megatron.py; details and measurements: docs/conversion.md.
"""
from .errors import ConversionError
from .families import SUPPORTED_ARCHITECTURES, family_for
from .hf_to_megatron import ConvertedCheckpoint, convert_hf_to_megatron, hf_model_config
from .megatron_to_hf import ExportedModel, export_hf, hf_named_tensors
from .template import llama_config, save_char_tokenizer, write_toy_template

__all__ = ["ConversionError", "ConvertedCheckpoint", "ExportedModel", "SUPPORTED_ARCHITECTURES",
           "convert_hf_to_megatron", "export_hf", "family_for", "hf_named_tensors", "hf_model_config", "llama_config",
           "save_char_tokenizer", "write_toy_template"]
