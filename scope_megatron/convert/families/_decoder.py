"""The mapping shared by the Llama-style decoder families (Llama, Qwen2, Qwen3).

A family turns a Hugging Face config.json into a `ModelConfig` and lists `TensorRule`s: one per
Megatron tensor (per layer for the decoder layers), naming the HF tensors it is made of and the
two transforms between them. Megatron tensors are named by their dist_checkpointing keys, in which
the decoder layers are stacked on a leading axis (`decoder.layers.<module>` of shape
[num_layers, ...]); a rule's transforms see one layer's slice.

Megatron's local layer spec stores the two RMSNorms of a layer under TransformerEngine's names
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`), so one
checkpoint serves both the local and the TE layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from scope_megatron.training.models import ModelConfig

from .. import transforms
from ..errors import ConversionError

LAYER = "{layer}"  # placeholder of the layer index in a layered rule's HF names


@dataclass(frozen=True)
class VocabRows:
    """Rows of the vocabulary tables (embedding, output layer) on each side: `hf` = config.json's
    vocab_size, `megatron` = the padded vocabulary. Row r maps to row r; a row only one side has
    is zero on the other side when created there, and dropped when the other side lacks it."""

    hf: int
    megatron: int


@dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor and the HF tensors it is made of.

    megatron_key: the dist_checkpointing key; `layered` rules have one slice per decoder layer.
    hf_names: HF tensor names, with "{layer}" standing for the layer index in layered rules.
    to_megatron(*hf_tensors) -> the Megatron tensor (one layer's slice when layered).
    to_hf(megatron_tensor) -> the HF tensors, in the order of hf_names.
    Both are pure and work on meta tensors too (used to derive shapes without data).
    """

    megatron_key: str
    hf_names: Tuple[str, ...]
    layered: bool
    to_megatron: Callable[..., torch.Tensor]
    to_hf: Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]

    def hf_for(self, layer: Optional[int]) -> Tuple[str, ...]:
        """The HF names of this rule for `layer` (None for a rule outside the layers)."""
        return tuple(name.replace(LAYER, str(layer)) for name in self.hf_names)


@dataclass(frozen=True)
class Rules:
    """A model's rules in Hugging Face order: `pre` (embedding), `per_layer`, `post` (final norm,
    output layer)."""

    pre: Tuple[TensorRule, ...]
    per_layer: Tuple[TensorRule, ...]
    post: Tuple[TensorRule, ...]

    def by_key(self) -> Dict[str, TensorRule]:
        """{Megatron key: rule}."""
        return {r.megatron_key: r for r in self.pre + self.per_layer + self.post}

    def items(self, num_layers: int) -> Iterator[Tuple[TensorRule, Optional[int]]]:
        """(rule, layer) pairs in HF order; layer is None outside the decoder layers."""
        yield from ((r, None) for r in self.pre)
        for layer in range(num_layers):
            yield from ((r, layer) for r in self.per_layer)
        yield from ((r, None) for r in self.post)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _one(t: torch.Tensor) -> Tuple[torch.Tensor]:
    return (t,)


def _same(megatron_key: str, hf_name: str, layered: bool = True) -> TensorRule:
    return TensorRule(megatron_key, (hf_name,), layered, _identity, _one)


def rope_settings(hf: dict) -> Tuple[float, str]:
    """(theta, type) of the RoPE described by config.json, in transformers' 5.x form
    (`rope_parameters`) or the older one (`rope_theta`, `rope_scaling`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


class DecoderFamily:
    """A Llama-style decoder: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, optional qkv
    bias (`qkv_bias`) and q/k RMSNorm (`qk_norm`). Subclasses set the class attributes and may
    add unsupported features to `unsupported`."""

    architecture: str = ""
    preset: str = ""              # ModelConfig.preset family
    qkv_bias: bool = False
    qk_norm: bool = False
    # HF tensors that carry no weights of the model (buffers some exporters save)
    ignored_suffixes: Tuple[str, ...] = ("rotary_emb.inv_freq",)

    # ---- config ---------------------------------------------------------------------------

    def unsupported(self, hf: dict) -> List[str]:
        """Features in config.json that these models lack; each entry says what and why."""
        found = []
        if hf.get("hidden_act", "silu") != "silu":
            found.append(f"hidden_act {hf['hidden_act']!r} (the MLP is SwiGLU with SiLU)")
        _, kind = rope_settings(hf)
        if kind != "default":
            found.append(f"RoPE scaling {kind!r} (ModelConfig has plain RoPE only)")
        if hf.get("mlp_bias"):
            found.append("mlp_bias (Megatron's layers here have no MLP biases)")
        if hf.get("quantization_config"):
            method = (hf["quantization_config"] or {}).get("quant_method", "?")
            found.append(f"quantized weights ({method}; convert the bf16 / fp16 release of the model)")
        if hf.get("use_sliding_window"):
            found.append("use_sliding_window (sliding-window attention)")
        layer_types = set(hf.get("layer_types") or ["full_attention"])
        if layer_types != {"full_attention"}:
            found.append(f"layer_types {sorted(layer_types)} (only full attention)")
        return found

    def model_config(self, hf: dict, *, vocab_size: Optional[int], padded_vocab: Optional[int],
                     make_vocab_size_divisible_by: int,
                     max_position_embeddings: Optional[int] = None) -> ModelConfig:
        """The ModelConfig of the model config.json describes.

        vocab_size: the true vocabulary (None = config.json's vocab_size, every row of HF's
          tables); padded_vocab: Megatron's rows (fixed in the config, so the checkpoint loads at
          every TP dividing it). Raises ConversionError for missing fields or unsupported features.
        """
        missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                               "intermediate_size", "vocab_size") if hf.get(k) is None]
        if missing:
            raise ConversionError(f"config.json of this {self.architecture} lacks {', '.join(missing)}")
        unsupported = self.unsupported(hf)
        if unsupported:
            raise ConversionError(f"this {self.architecture} uses features the converter does not "
                                  f"support: {'; '.join(unsupported)}")
        heads = hf["num_attention_heads"]
        theta, _ = rope_settings(hf)
        if vocab_size is not None and vocab_size > hf["vocab_size"]:
            raise ConversionError(f"vocab_size {vocab_size} exceeds config.json's {hf['vocab_size']}: the rows "
                                  f"beyond it would be zero embeddings trained as real tokens, and the export "
                                  "back would refuse them. Resize the HF model's embeddings first (e.g. "
                                  "model.resize_token_embeddings), or leave vocab_size unset")
        hf_positions = hf.get("max_position_embeddings")
        if max_position_embeddings is not None and hf_positions is not None and max_position_embeddings > hf_positions:
            raise ConversionError(f"max_position_embeddings {max_position_embeddings} exceeds config.json's "
                                  f"{hf_positions}: the model was not trained for longer sequences (RoPE scaling is "
                                  "not supported here), and SGLang serving the export would keep the "
                                  f"config's limit. Pass at most {hf_positions}")
        try:
            return ModelConfig.preset(
                self.preset,
                num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
                ffn_hidden_size=hf["intermediate_size"],
                vocab_size=vocab_size if vocab_size is not None else hf["vocab_size"],
                padded_vocab=padded_vocab, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                max_position_embeddings=max_position_embeddings or hf.get("max_position_embeddings", 4096),
                rotary_base=theta, norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
                add_qkv_bias=self.qkv_bias, qk_layernorm=self.qk_norm,
                untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
                init_method_std=float(hf.get("initializer_range", 0.02)))
        except ValueError as exc:
            raise ConversionError(f"config.json describes no valid model: {exc}") from exc

    # ---- tensors ---------------------------------------------------------------------------

    def rules(self, cfg: ModelConfig, rows: VocabRows) -> Rules:
        """The rules of the model `cfg` describes, with vocabulary tables of `rows` rows."""
        heads, groups = cfg.num_attention_heads, cfg.query_groups
        head_dim = cfg.kv_channels or cfg.hidden_size // heads
        layer = f"model.layers.{LAYER}."
        attn, mlp = "decoder.layers.self_attention.", "decoder.layers.mlp."

        def qkv_rule(kind: str) -> TensorRule:
            return TensorRule(
                f"{attn}linear_qkv.{kind}",
                tuple(f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv"), True,
                lambda q, k, v: transforms.fuse_qkv(q, k, v, groups=groups, head_dim=head_dim),
                lambda qkv: transforms.split_qkv(qkv, heads=heads, groups=groups, head_dim=head_dim))

        def vocab_rule(megatron_key: str, hf_name: str) -> TensorRule:
            return TensorRule(megatron_key, (hf_name,), False,
                              lambda t: transforms.resize_rows(t, rows.megatron),
                              lambda t: (transforms.resize_rows(t, rows.hf),))

        per_layer = [_same(f"{attn}linear_qkv.layer_norm_weight", f"{layer}input_layernorm.weight"),
                     qkv_rule("weight")]
        if self.qkv_bias:
            per_layer.append(qkv_rule("bias"))
        if self.qk_norm:
            per_layer += [_same(f"{attn}q_layernorm.weight", f"{layer}self_attn.q_norm.weight"),
                          _same(f"{attn}k_layernorm.weight", f"{layer}self_attn.k_norm.weight")]
        per_layer += [
            _same(f"{attn}linear_proj.weight", f"{layer}self_attn.o_proj.weight"),
            _same(f"{mlp}linear_fc1.layer_norm_weight", f"{layer}post_attention_layernorm.weight"),
            TensorRule(f"{mlp}linear_fc1.weight",
                       (f"{layer}mlp.gate_proj.weight", f"{layer}mlp.up_proj.weight"), True,
                       transforms.fuse_gate_up, transforms.split_gate_up),
            _same(f"{mlp}linear_fc2.weight", f"{layer}mlp.down_proj.weight"),
        ]
        post = [_same("decoder.final_layernorm.weight", "model.norm.weight", layered=False)]
        if cfg.untie_embeddings_and_output_weights:
            post.append(vocab_rule("output_layer.weight", "lm_head.weight"))
        return Rules(pre=(vocab_rule("embedding.word_embeddings.weight", "model.embed_tokens.weight"),),
                     per_layer=tuple(per_layer), post=tuple(post))

    def ignored(self, hf_name: str, cfg: ModelConfig) -> bool:
        """HF tensors that are not weights of the converted model: saved buffers, and lm_head
        when the output layer is tied to the embedding (transformers ties them at load)."""
        if hf_name.endswith(self.ignored_suffixes):
            return True
        return hf_name == "lm_head.weight" and not cfg.untie_embeddings_and_output_weights


def shapes_of(fn: Callable, shapes: Sequence[Sequence[int]], dtype=torch.float32) -> List[Tuple[int, ...]]:
    """Output shapes of a rule transform for inputs of these shapes, computed on meta tensors."""
    out = fn(*[torch.empty(s, dtype=dtype, device="meta") for s in shapes])
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [tuple(t.shape) for t in out]
