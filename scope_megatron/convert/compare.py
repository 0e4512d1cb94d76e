"""Logits of an HF model (transformers) and of its converted Megatron checkpoint on the same
tokens: max / mean absolute difference over the true vocabulary and top-1 agreement."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from scope_megatron.training import checkpoint, models, platform
from scope_megatron.training.models import ModelConfig

from .errors import ConversionError

# fp32 defaults: pass when max|diff| <= ATOL + RTOL * max|HF logit| and every top-1 disagreement
# is a near-tie (HF's logit of Megatron's top token within that tolerance of HF's maximum)
ATOL = 1e-4
RTOL = 1e-4


@dataclass(frozen=True)
class LogitComparison:
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_logit: float
    top1_agreement: float      # fraction of positions whose argmax agrees
    top1_real_disagreements: int  # disagreements that are not near-ties within the tolerance
    tolerance: float
    positions: int
    vocab_size: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_real_disagreements == 0

    def summary(self) -> str:
        return (f"{'PASS' if self.passed else 'FAIL'}: {self.positions} positions x {self.vocab_size} "
                f"tokens: max |diff| {self.max_abs_diff:.3e} (tolerance {self.tolerance:.3e}), mean "
                f"|diff| {self.mean_abs_diff:.3e}, max |logit| {self.max_abs_logit:.3e}, top-1 "
                f"agreement {100 * self.top1_agreement:.2f}% ({self.top1_real_disagreements} "
                "disagreements beyond near-ties)")


def compare_logits(hf_logits: torch.Tensor, megatron_logits: torch.Tensor, *, atol: float = ATOL,
                   rtol: float = RTOL) -> LogitComparison:
    """Compares [..., V] logits over the same true vocabulary V (computed in float64)."""
    a, b = hf_logits.double(), megatron_logits.double()
    diff = (a - b).abs()
    scale = float(a.abs().max())
    tol = atol + rtol * scale
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    agree = top_a == top_b
    gap = a.max(-1).values - a.gather(-1, top_b.unsqueeze(-1)).squeeze(-1)
    return LogitComparison(float(diff.max()), float(diff.mean()), scale, float(agree.double().mean()),
                           int((~agree & (gap > tol)).sum()), tol, agree.numel(), a.shape[-1])


def hf_logits(hf_dir, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 logits [b, s, vocab_size] of the HF model (transformers, eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids).logits[..., :vocab_size].float()


def megatron_logits(megatron_dir, input_ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [b, s, vocab_size] of the checkpoint's model in the current parallel layout
    (PP=1; TP shards gathered; platform.initialize_parallel and seed_everything done). Collective
    over the TP group."""
    from scope_megatron.training.schedule import gather_vocab_shards

    meta = checkpoint.checkpoint_info(megatron_dir)
    cfg = ModelConfig(**meta["model_config"])
    model = models.freeze(models.build_gpt_model(cfg))
    checkpoint.load_checkpoint(megatron_dir, [model])
    logits = gather_vocab_shards(models.forward_logits(model, input_ids.to(platform.device())))
    return logits[..., :cfg.vocab_size].float().cpu()


def compare_hf_megatron(hf_dir, megatron_dir, input_ids: torch.Tensor, *, atol: float = ATOL,
                        rtol: float = RTOL) -> LogitComparison:
    """Runs both models on input_ids [b, s] and compares their logits over the true vocabulary
    (the checkpoint's vocab_size). Collective: every rank of the current layout (PP=1, any TP)
    calls it; rank 0 also runs the HF model; every rank returns the comparison."""
    if platform.layout().pp != 1:
        raise ConversionError("compare with PP=1 (any TP): the logits come from one forward pass")
    meta = checkpoint.checkpoint_info(megatron_dir)
    vocab = meta["model_config"]["vocab_size"]
    if input_ids.dim() != 2 or int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ConversionError(f"tokens must be a [batch, seq] tensor of ids in [0, {vocab})")
    ours = megatron_logits(megatron_dir, input_ids)
    result = [None]
    if dist.get_rank() == 0:
        try:
            result[0] = ("ok", compare_logits(hf_logits(Path(hf_dir), input_ids, vocab), ours,
                                              atol=atol, rtol=rtol))
        except Exception as exc:  # shared with the other ranks, raised everywhere below
            result[0] = ("error", f"running the HF model failed: {type(exc).__name__}: {exc}")
    dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise ConversionError(value)
    return value
