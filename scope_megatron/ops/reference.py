"""Plain-PyTorch references of the ops, on the whole (gathered) vocabulary.

They define the math the kernels must reproduce and serve as the "torch eager" baseline of the
benchmarks (and, compiled, the torch.compile baseline). They are never used as a fallback for
the kernels. Logits are upcast to float32 (float64 stays float64), as typical user code does.
"""
from __future__ import annotations

from typing import Optional

import torch


def _scaled(logits: torch.Tensor, vocab_size: Optional[int], temperature: float) -> torch.Tensor:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits[..., :vocab_size] if vocab_size is not None else logits
    return x.to(acc) / temperature


def logprob_reference(logits: torch.Tensor, target: torch.Tensor, *, vocab_size: Optional[int] = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits[..., :vocab_size] / temperature)[target]; logits [..., V] full vocab."""
    logp = _scaled(logits, vocab_size, temperature).log_softmax(-1)
    return logp.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)


def kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                 vocab_size: Optional[int] = None, direction: str = "reverse",
                 student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(student || teacher) ("reverse") or KL(teacher || student) ("forward")."""
    ls = _scaled(student_logits, vocab_size, student_temperature).log_softmax(-1)
    lt = _scaled(teacher_logits.detach(), vocab_size, teacher_temperature).log_softmax(-1)
    if direction == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    if direction == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")


def sequence_perplexity_reference(token_logprobs: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                                  cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean negative log-prob per sequence (padded [B, L] or packed [N] with cu_seqlens)."""
    if cu_seqlens is None:
        m = torch.ones_like(token_logprobs, dtype=torch.bool) if mask is None else mask
        m = m.to(token_logprobs.dtype)
        return -(token_logprobs * m).sum(-1) / m.sum(-1)
    values = token_logprobs.reshape(-1)
    m = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.reshape(-1)
    out = []
    for b in range(cu_seqlens.numel() - 1):
        s, e = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        sel = values[s:e][m[s:e]]
        out.append(-sel.sum() / sel.numel())
    return torch.stack(out) if out else values.new_zeros(0)


def group_normalized_weights_reference(log_ppl: torch.Tensor, group_ids: torch.Tensor,
                                       member_mask: torch.Tensor, *, sign: int, tau: float = 1.0,
                                       normalize: str = "sum") -> torch.Tensor:
    """PPL^(sign/tau) normalized over the members of each group, written as the paper does."""
    out = torch.zeros_like(log_ppl)
    ppl = log_ppl.exp()
    for g in torch.unique(group_ids):
        sel = (group_ids == g) & member_mask
        if not bool(sel.any()):
            continue
        powered = ppl[sel] ** (sign / tau)
        w = powered / powered.sum()
        if normalize == "mean":
            w = w * sel.sum()
        out[sel] = w
    return out
