"""A Hugging Face template directory (config.json + tokenizer, no weights) for a model that was
never on the Hub: the embedded toy model. export_hf needs such a template to write a checkpoint
in HF form (config.json and tokenizer are copied from it), which is how the toy student runs in
transformers, in SGLang, and in tools/evaluate.py --hf-dir.

    write_toy_template(checkpoint_info(ckpt)["model_config"], "toy-template")
    export_hf(ckpt, "toy-template", "toy-hf")

The config is a LlamaForCausalLM (our toy GPTModel: RMSNorm, SwiGLU, RoPE, no biases); the
tokenizer is the toy CharTokenizer as a `tokenizers` WordLevel model with the same ids, a
"<bos> text" template and "<eos>" as end of sequence.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional, Union

from .errors import ConversionError


def llama_config(model_config: Mapping) -> dict:
    """The LlamaForCausalLM config.json fields of a ModelConfig (as a dict, e.g. the
    checkpoint's recorded "model_config"). Raises ConversionError for what Llama cannot express."""
    c = dict(model_config)
    bad = []
    if c.get("add_qkv_bias"):
        bad.append("add_qkv_bias (Llama has no q/k/v biases; use a Qwen2 template)")
    if c.get("qk_layernorm"):
        bad.append("qk_layernorm (Llama has no q/k norms; use a Qwen3 template)")
    if bad:
        raise ConversionError("the model cannot be written as LlamaForCausalLM: " + "; ".join(bad))
    heads = c["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c["vocab_size"],
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["ffn_hidden_size"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": c.get("num_query_groups") or heads,
        "head_dim": c.get("kv_channels") or c["hidden_size"] // heads,
        "hidden_act": "silu",
        "max_position_embeddings": c["max_position_embeddings"],
        "rms_norm_eps": c["norm_epsilon"],
        "rope_theta": c["rotary_base"],
        "tie_word_embeddings": not c["untie_embeddings_and_output_weights"],
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": c.get("init_method_std", 0.02),
    }


def save_char_tokenizer(tokenizer, out_dir: Union[str, Path], *, model_max_length: Optional[int] = None) -> Path:
    """Writes a CharTokenizer (scope_megatron.data.tokenizer) as a Hugging Face fast tokenizer
    with identical ids: encode("504+591=") == [bos] + char ids, decode drops special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(tokenizer.tokens)
    pad, bos, eos = tokens[tokenizer.pad_id], tokens[tokenizer.bos_id], tokens[tokenizer.eos_id]
    symbols = [t for t in tokens if t not in (pad, bos, eos)]
    # longest symbol first, as CharTokenizer matches; the split keeps every piece as one word
    pattern = "|".join(re.escape(s) for s in sorted(symbols, key=len, reverse=True))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=pad))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tokenizer.bos_id)])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   model_max_length=model_max_length or 10**9)
    out = Path(out_dir)
    fast.save_pretrained(str(out))
    return out


def write_toy_template(model_config: Mapping, out_dir: Union[str, Path], tokenizer=None) -> Path:
    """config.json (LlamaForCausalLM of `model_config`), generation_config.json and the toy
    tokenizer (default: the toy arithmetic world's) in `out_dir`, which must not hold a model."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise ConversionError(f"{out} already holds a config.json; give an empty or new directory")
    if tokenizer is None:
        from scope_megatron.data.toy_arithmetic import ToyArithmetic

        tokenizer = ToyArithmetic().tokenizer
    config = llama_config(model_config)
    if config["vocab_size"] != len(tokenizer.tokens):
        raise ConversionError(f"model vocab_size {config['vocab_size']} != the tokenizer's "
                              f"{len(tokenizer.tokens)} tokens: this is not the toy model")
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                  dtype="float32")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id},
        indent=2) + "\n")
    save_char_tokenizer(tokenizer, out, model_max_length=config["max_position_embeddings"])
    return out
