"""How far the inference engine's log-probs are from the trainer's for the same tokens.

The engine (SGLang: its own kernels, often bf16, a KV cache) and the trainer (Megatron at the
same temperature) compute log softmax(logits / T) of the same sampled tokens; they should agree
up to numerics. A large gap means the contract is broken somewhere (temperature applied on one
side only, SGLANG_RETURN_ORIGINAL_LOGPROB set, stale weights after a failed sync, a vocabulary
or conversion mismatch) and importance weights built from the two would be wrong. The trainer
calls check_logprobs on its first step(s) and logs logprob_gap as a metric.
"""
from __future__ import annotations

import warnings
from typing import Dict

import torch


def logprob_gap(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor
                ) -> Dict[str, float]:
    """{"mean_abs", "max_abs"} of |engine - trainer| over the masked tokens (float64; 0.0 with
    no masked token). Shapes must match ([B, L])."""
    if engine_logprobs.shape != trainer_logprobs.shape or engine_logprobs.shape != mask.shape:
        raise ValueError(f"logprob_gap: shapes differ: engine {tuple(engine_logprobs.shape)}, "
                         f"trainer {tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool()
    diff = (engine_logprobs.double() - trainer_logprobs.double().to(engine_logprobs.device)).abs()[m.to(engine_logprobs.device)]
    if diff.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0}
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}


def check_logprobs(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor, *,
                   mean_threshold: float = 0.05, max_threshold: float = 1.0, raise_error: bool = False
                   ) -> Dict[str, float]:
    """logprob_gap, with a warning (or a ValueError if raise_error) when the mean gap exceeds
    mean_threshold or the largest exceeds max_threshold. bf16 engines typically show mean gaps of
    1e-3..1e-2; a temperature mismatch shows gaps of the order of the log-probs themselves."""
    gap = logprob_gap(engine_logprobs, trainer_logprobs, mask)
    if gap["mean_abs"] > mean_threshold or gap["max_abs"] > max_threshold:
        message = (f"engine and trainer log-probs disagree: mean |diff| {gap['mean_abs']:.4g} "
                   f"(threshold {mean_threshold:g}), max |diff| {gap['max_abs']:.4g} (threshold "
                   f"{max_threshold:g}); check the sampling temperature on both sides, "
                   "SGLANG_RETURN_ORIGINAL_LOGPROB, the weight sync and the vocabulary")
        if raise_error:
            raise ValueError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return gap
