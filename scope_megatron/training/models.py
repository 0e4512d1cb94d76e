"""Megatron GPT models for Llama / Qwen2 / Qwen3-style checkpoints: a validated ModelConfig, the
Megatron vocabulary padding, model construction in the current parallel layout, and the frozen
teacher's helpers.

Every model here is a `megatron.core.models.gpt.GPTModel` with RMSNorm, SwiGLU, RoPE, optional
grouped-query attention, no biases except the optional qkv bias (Qwen2), optional q/k RMSNorm
(Qwen3), tied or untied input/output embeddings. Megatron is imported inside the functions: on a
CPU machine `platform.apply_cpu_shims()` must run before megatron's model modules are imported.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch

from scope_megatron.utils.config_io import option

from . import platform

if TYPE_CHECKING:  # pragma: no cover
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padded vocabulary: the smallest multiple of divisible_by * tp_size that holds
    vocab_size rows, so that every TP rank holds an equal shard of whole blocks."""
    for name, value in (("vocab_size", vocab_size), ("divisible_by", divisible_by), ("tp_size", tp_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"padded_vocab_size: {name} must be a positive integer, got {value!r}")
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


_STYLES = {
    # Llama 3: RoPE base 500000, RMSNorm eps 1e-5, no biases, untied output layer.
    "llama": dict(rotary_base=500000.0, norm_epsilon=1e-5, add_qkv_bias=False, qk_layernorm=False,
                  untie_embeddings_and_output_weights=True),
    # Qwen2 / Qwen2.5: RoPE base 1e6, eps 1e-6, bias on the q, k, v projections.
    "qwen2": dict(rotary_base=1000000.0, norm_epsilon=1e-6, add_qkv_bias=True, qk_layernorm=False),
    # Qwen3: RoPE base 1e6, eps 1e-6, no qkv bias, RMSNorm on queries and keys per head.
    "qwen3": dict(rotary_base=1000000.0, norm_epsilon=1e-6, add_qkv_bias=False, qk_layernorm=True),
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama / Qwen2 / Qwen3-style GPT (layout-independent).

    Required:
      num_layers: transformer layers.
      hidden_size: model width.
      num_attention_heads: query heads.
      vocab_size: the true vocabulary (tokenizer size); the embedding is padded (see
        `padded_vocab_size`) and the padded rows never take part in a softmax of the SCOPE ops.
    Optional (default):
      ffn_hidden_size (None = 4 * hidden_size, Megatron's default): SwiGLU inner width.
      num_query_groups (None = num_attention_heads, i.e. no GQA): key/value heads.
      kv_channels (None = hidden_size // num_attention_heads): width of one head (Qwen3 sets it
        apart from hidden_size / heads).
      make_vocab_size_divisible_by (128): the vocabulary is padded to a multiple of this times TP.
      max_position_embeddings (4096): longest sequence (prompt + response) the model serves;
        GPTModel's max_sequence_length.
      rotary_base (10000.0): RoPE base theta (the presets set the family's value).
      norm_epsilon (1e-5): RMSNorm epsilon.
      add_qkv_bias (False): bias on the q, k, v projections (Qwen2).
      qk_layernorm (False): RMSNorm on queries and keys per head (Qwen3).
      untie_embeddings_and_output_weights (False): separate output layer; False ties it to the
        input embedding (Megatron's default).
      init_method_std (0.02): std of the normal weight initialization.
      hidden_dropout (0.0), attention_dropout (0.0): dropout rates (RL fine-tuning uses none).
    """

    num_layers: int = option(help="transformer layers")
    hidden_size: int = option(help="model width")
    num_attention_heads: int = option(help="query heads")
    vocab_size: int = option(help="the true vocabulary (tokenizer size); the embedding is padded")
    ffn_hidden_size: Optional[int] = option(None, help="SwiGLU inner width; null = 4 * hidden_size")
    num_query_groups: Optional[int] = option(None, help="key/value heads (GQA); null = num_attention_heads")
    kv_channels: Optional[int] = option(None, help="width of one head; null = hidden_size / heads")
    make_vocab_size_divisible_by: int = option(128, help="the vocabulary is padded to a multiple "
                                               "of this times TP (Megatron's rule)")
    padded_vocab: Optional[int] = option(None, help=(
        "embedding / output-layer rows, fixed; null = Megatron's rule above, which depends on "
        "TP. A fixed size (divisible by every TP you use) keeps checkpoints loadable at any TP "
        "and matches a converted checkpoint's rows"))
    max_position_embeddings: int = option(4096, help="longest sequence (prompt + response)")
    rotary_base: float = option(10000.0, help="RoPE base theta (the presets set the family's)")
    norm_epsilon: float = option(1e-5, help="RMSNorm epsilon")
    add_qkv_bias: bool = option(False, help="bias on the q, k, v projections (Qwen2)")
    qk_layernorm: bool = option(False, help="RMSNorm on queries and keys per head (Qwen3)")
    untie_embeddings_and_output_weights: bool = option(False, help="separate output layer "
                                                       "(False ties it to the input embedding)")
    init_method_std: float = option(0.02, help="std of the normal weight initialization")
    hidden_dropout: float = option(0.0, help="hidden dropout (RL fine-tuning uses none)")
    attention_dropout: float = option(0.0, help="attention dropout")

    @classmethod
    def preset(cls, family: str, **overrides) -> "ModelConfig":
        """A config in the style of a model family ("llama", "qwen2", "qwen3"): the family's RoPE
        base, norm epsilon, qkv bias, q/k norm and embedding tying, then `overrides` (which must
        include the sizes: num_layers, hidden_size, num_attention_heads, vocab_size)."""
        if family not in _STYLES:
            raise ValueError(f"ModelConfig.preset: unknown family {family!r}; choose one of "
                             f"{', '.join(sorted(_STYLES))}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"ModelConfig.preset: unknown field(s) {', '.join(unknown)}; the fields "
                             f"are {', '.join(sorted(fields))}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in overrides]
        if missing:
            raise ValueError(f"ModelConfig.preset({family!r}) needs the model size: pass "
                             f"{', '.join(missing)}")
        return cls(**{**_STYLES[family], **overrides})

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "make_vocab_size_divisible_by", "max_position_embeddings"):
            _require_positive_int(name, getattr(self, name))
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ModelConfig: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; change one of them or set kv_channels explicitly")
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"ModelConfig: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_query_groups {self.query_groups}; every key/value head must serve the same "
                "number of query heads")
        if self.padded_vocab is not None:
            _require_positive_int("padded_vocab", self.padded_vocab)
            if self.padded_vocab < self.vocab_size:
                raise ValueError(f"ModelConfig: padded_vocab {self.padded_vocab} is smaller than "
                                 f"vocab_size {self.vocab_size}; it must hold every token")
        for name in ("rotary_base", "norm_epsilon", "init_method_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig: {name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def query_groups(self) -> int:
        """Key/value heads (num_query_groups, or num_attention_heads without GQA)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """SwiGLU inner width (ffn_hidden_size, or 4 * hidden_size)."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    def padded_vocab_size(self, tp_size: int) -> int:
        """Rows of the embedding and output layer at this TP size: padded_vocab if set, else
        Megatron's rule (see the module function `padded_vocab_size`)."""
        if self.padded_vocab is not None:
            if self.padded_vocab % tp_size:
                raise ValueError(f"padded_vocab {self.padded_vocab} is not divisible by TP={tp_size}; "
                                 "choose a size divisible by every TP you use (e.g. a multiple of 128)")
            return self.padded_vocab
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp_size)

    def validate_parallel(self, tp: int, pp: int = 1, vpp: Optional[int] = None) -> None:
        """Raises ValueError, naming the field and the fix, when this model cannot be split into
        `tp` tensor-parallel shards and `pp` pipeline stages of `vpp` chunks each."""
        self.padded_vocab_size(tp)  # a fixed padded_vocab must split into TP shards
        if self.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"TP={tp}: every TP rank holds whole heads; choose a TP that divides it")
        if self.query_groups % tp:
            raise ValueError(f"num_query_groups {self.query_groups} is not divisible by TP={tp}: every "
                             "TP rank holds whole key/value heads; choose a TP that divides it")
        if self.ffn_size % tp:
            raise ValueError(f"ffn_hidden_size {self.ffn_size} is not divisible by TP={tp}; choose a "
                             "TP that divides it")
        chunks = pp * (vpp or 1)
        if self.num_layers % chunks:
            raise ValueError(f"num_layers {self.num_layers} is not divisible by PP={pp}"
                             + (f" x VPP={vpp}" if vpp else "")
                             + f" = {chunks} model chunks; choose PP (and VPP) dividing num_layers")


def _require_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelConfig: {name} must be a positive integer, got {value!r}")


def check_same_vocab(student: ModelConfig, teacher: ModelConfig, tp: int) -> int:
    """Checks that student and teacher logits can be compared shard by shard at this TP size:
    same true vocabulary (same tokenizer) and same padded vocabulary (equal shards). Returns the
    padded vocabulary; raises ValueError naming the fix otherwise."""
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(
            f"student and teacher vocabularies differ ({student.vocab_size} vs {teacher.vocab_size} "
            "tokens): on-policy distillation compares their distributions token by token and needs "
            "the same tokenizer; set vocab_size to the tokenizer's size in both configs")
    s_pad, t_pad = student.padded_vocab_size(tp), teacher.padded_vocab_size(tp)
    if s_pad != t_pad:
        raise ValueError(
            f"student and teacher pad the vocabulary differently at TP={tp} ({s_pad} vs {t_pad} rows; "
            f"make_vocab_size_divisible_by {student.make_vocab_size_divisible_by} vs "
            f"{teacher.make_vocab_size_divisible_by}, padded_vocab {student.padded_vocab} vs "
            f"{teacher.padded_vocab}), so their logit shards would not line up; give both configs the "
            "same padded_vocab (or the same make_vocab_size_divisible_by)")
    return s_pad


def te_available() -> bool:
    """TransformerEngine is importable and the machine has CUDA (its PyTorch layer needs both)."""
    return platform.cuda_available() and importlib.util.find_spec("transformer_engine") is not None


def transformer_config(cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                       **overrides) -> "TransformerConfig":
    """Megatron's TransformerConfig for `cfg` in the current parallel layout (platform.layout()).

    params_dtype: float32, bfloat16, or float16 on GPU (sets Megatron's bf16 / fp16 mode).
    Weights are initialized on the CPU on a CPU machine (which also makes TP=2 weights exactly
    the shards of the TP=1 weights) and on the GPU otherwise. `overrides` are further
    TransformerConfig fields (e.g. recompute_granularity="full", fusion switches); they win.
    """
    lay = platform.layout()
    cfg.validate_parallel(lay.tp, lay.pp, lay.vpp)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be torch.float32, bfloat16 or float16, got {params_dtype}")
    on_cpu = platform.device().type == "cpu"
    if on_cpu and params_dtype == torch.float16:
        raise ValueError("params_dtype torch.float16 needs a GPU (its loss scaler does); use "
                         "torch.bfloat16 or torch.float32 on CPU")
    fields = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.query_groups,
        kv_channels=cfg.kv_channels, normalization="RMSNorm", layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias, qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp, sequence_parallel=lay.sequence_parallel,
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        use_cpu_initialization=on_cpu,
    )
    fields.update(overrides)
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**fields)


def layer_spec(cfg: ModelConfig, use_te: bool):
    """The transformer layer spec of `cfg`: TransformerEngine layers or Megatron's local ones."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization="RMSNorm")


def build_gpt_model(cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    use_te: Optional[bool] = None, vp_stage: Optional[int] = None,
                    **transformer_overrides) -> "GPTModel":
    """Builds this rank's GPTModel (one pipeline chunk) in the current parallel layout.

    pre_process / post_process: whether this chunk holds the embedding / the output layer;
      None asks Megatron's parallel state (first / last pipeline stage, for `vp_stage`).
    use_te: TransformerEngine layers; None uses them when TE is importable on a GPU machine,
      True raises where they cannot run, False uses Megatron's local layers.
    vp_stage: the virtual pipeline stage of this chunk (layout().vpp set), else None.
    transformer_overrides: extra TransformerConfig fields (see `transformer_config`).

    The model lives on platform.device() in params_dtype, with `parallel_output=True`: called
    with labels=None it returns this TP rank's logit shard [b, s, padded_vocab / tp]. Its
    ModelConfig is kept as `model.scope_model_config` (checkpoints record and check it).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if use_te is None:
        use_te = te_available()
    elif use_te and not te_available():
        raise ValueError("use_te=True: TransformerEngine needs CUDA and the transformer_engine "
                         "package (pip install .[gpu]); use use_te=None or False here")
    if platform.layout().sequence_parallel and not use_te:
        raise ValueError("sequence parallelism needs the TransformerEngine layers (use_te); "
                         "Megatron's local layers refuse it")
    config = transformer_config(cfg, params_dtype=params_dtype, **transformer_overrides)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(cfg, use_te),
        vocab_size=cfg.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings, pre_process=pre_process,
        post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope", rotary_base=cfg.rotary_base, vp_stage=vp_stage,
    )
    model.scope_model_config = cfg
    cast_parameters(model, params_dtype)
    return model.to(platform.device())


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Puts every floating-point parameter of `model` in `dtype`, in place (buffers, such as the
    rotary frequencies, are left as they are). Returns the model.

    Why: without TransformerEngine and apex, Megatron's norms are torch.nn.RMSNorm built in
    fp32 whatever params_dtype says (Megatron-LM casts the whole model in Float16Module). Its
    bf16 optimizer assumes every parameter is 16-bit: an fp32 one shifts the optimizer's map
    to the model's checkpoint entries ("Param id N does not match any model sharded param" at
    the first save with megatron-core 0.19), and the norms run on mixed dtypes.
    """
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def build_model_chunks(cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                       use_te: Optional[bool] = None, **transformer_overrides) -> List["GPTModel"]:
    """This rank's model chunks, as Megatron's schedules and optimizer take them: one GPTModel,
    or one per virtual pipeline stage when layout().vpp is set."""
    vpp = platform.layout().vpp
    stages = [None] if vpp is None else list(range(vpp))
    return [build_gpt_model(cfg, params_dtype=params_dtype, use_te=use_te, vp_stage=stage,
                            **transformer_overrides) for stage in stages]


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's DistributedDataParallel (parallel.wrap_ddp; its state dict
    keys carry a `module.` prefix); a bare model as it is."""
    from megatron.core.distributed import DistributedDataParallel

    while isinstance(chunk, DistributedDataParallel):
        chunk = chunk.module
    return chunk


def unwrap_chunks(model_chunks) -> List[torch.nn.Module]:
    """The unwrapped chunks (unwrap) of a list of chunks or of a single model."""
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    return [unwrap(chunk) for chunk in model_chunks]


# ---- the frozen teacher -----------------------------------------------------------------------


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Makes `model` a frozen teacher: no parameter requires grad, eval mode (no dropout).
    Keep it out of DDP and the optimizer. Returns the model."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def offload_to_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Moves the model's parameters and buffers to host memory between uses (frees GPU memory
    for the student's optimizer step). A no-op on a CPU machine. Returns the model."""
    if platform.device().type != "cpu":
        model.to("cpu")
    return model


def load_to_device(model: torch.nn.Module) -> torch.nn.Module:
    """Moves an offloaded model back to platform.device(). A no-op on a CPU machine."""
    if platform.device().type != "cpu":
        model.to(platform.device())
    return model


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..s-1 for every row of [b, s] input_ids."""
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor,
                   position_ids: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One forward of a single-stage model (pre_process and post_process: PP=1) under no_grad.

    input_ids, position_ids: [b, s] int64 (position_ids default 0..s-1 per row).
    attention_mask: None for plain causal attention (right padding needs nothing more: padded
      positions come after every real token); else a bool [b, 1, s, s] mask where True hides a
      key (Megatron's convention), e.g. causal within each packed sequence.
    Returns this TP rank's logit shard [b, s, padded_vocab / tp] in the model's dtype (GPTModel's
    layout with labels=None; the SCOPE loss takes this [B, L, V/tp] layout). Needs model.eval()
    for deterministic output (`freeze` does that).
    """
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError("forward_logits runs a whole model; with pipeline parallelism run the "
                         "teacher through Megatron's schedule (forward_only=True) instead")
    if input_ids.dim() != 2:
        raise ValueError("forward_logits: input_ids must be [batch, seq], got shape "
                         f"{tuple(input_ids.shape)}")
    if position_ids is None:
        position_ids = default_position_ids(input_ids)
    with torch.no_grad():
        return model(input_ids, position_ids, attention_mask)
