"""group_normalized_weights: SCOPE's per-group perplexity weights."""
from __future__ import annotations

import math

import torch

from scope_megatron._extension import require_device_support

from ._library import ops

_OP = "group_normalized_weights"
NORMALIZATIONS = ("sum", "mean")


def group_normalized_weights(
    log_ppl: torch.Tensor,
    group_ids: torch.Tensor,
    member_mask: torch.Tensor,
    *,
    sign: int,
    tau: float = 1.0,
    normalize: str = "sum",
) -> torch.Tensor:
    """w_i = PPL_i^(sign/tau) / sum_{j in group(i), member} PPL_j^(sign/tau) for members, else 0.

    Computed as a softmax of sign * log_ppl / tau over the members of each group (numerically
    safe for any perplexity). SCOPE uses sign=+1 on the correct rollouts with the student's
    perplexity and sign=-1 on the incorrect rollouts with the teacher's perplexity
    (docs: ../shared/docs/scope-algorithm.md).

    Args:
      log_ppl: [B] log perplexities (e.g. from sequence_perplexity), floating point.
      group_ids: [B] integer id of each sequence's prompt group (any integers).
      member_mask: [B] bool, the sequences on this path (e.g. the correct ones).
      sign: +1 or -1.
      tau: temperature > 0 (tau -> inf gives uniform weights).
      normalize: "sum" (weights of a group's members sum to 1; the paper) or "mean" (they average
        1, i.e. "sum" times the number of members; the reference code).

    Returns [B] weights, float32 (float64 for float64 input), carrying no gradient: the weights
    are detached by definition. Groups without members contribute nothing.
    """
    if not isinstance(log_ppl, torch.Tensor) or not log_ppl.dtype.is_floating_point or log_ppl.dim() != 1:
        raise TypeError(f"{_OP}: log_ppl must be a 1-D floating-point tensor [B], got "
                        f"{getattr(log_ppl, 'dtype', type(log_ppl).__name__)} "
                        f"{tuple(getattr(log_ppl, 'shape', ()))}")
    n = log_ppl.shape[0]
    if (not isinstance(group_ids, torch.Tensor) or group_ids.dtype.is_floating_point
            or group_ids.dtype == torch.bool or tuple(group_ids.shape) != (n,)):
        raise TypeError(f"{_OP}: group_ids must be an integer tensor of shape [{n}], got "
                        f"{getattr(group_ids, 'dtype', type(group_ids).__name__)} "
                        f"{tuple(getattr(group_ids, 'shape', ()))}")
    if not isinstance(member_mask, torch.Tensor) or member_mask.dtype != torch.bool or tuple(member_mask.shape) != (n,):
        raise TypeError(f"{_OP}: member_mask must be a bool tensor of shape [{n}], got "
                        f"{getattr(member_mask, 'dtype', type(member_mask).__name__)} "
                        f"{tuple(getattr(member_mask, 'shape', ()))}")
    if not (log_ppl.device == group_ids.device == member_mask.device):
        raise ValueError(f"{_OP}: log_ppl, group_ids and member_mask must be on one device, got "
                         f"{log_ppl.device}, {group_ids.device}, {member_mask.device}")
    if sign not in (1, -1):
        raise ValueError(f"{_OP}: sign must be +1 or -1, got {sign!r}")
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{_OP}: tau must be a finite number > 0, got {tau}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"{_OP}: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    require_device_support(log_ppl)
    values = log_ppl.detach()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    bad = member_mask & ~torch.isfinite(values)
    if bool(bad.any()):
        raise FloatingPointError(f"{_OP}: log_ppl is NaN or infinite for member sequence(s) "
                                 f"{torch.nonzero(bad).flatten().tolist()[:8]}")
    # 1/tau in the working precision: a tau so small that it overflows would give 0 * inf = NaN
    if not math.isfinite(float(torch.tensor(1.0 / tau, dtype=values.dtype))):
        raise ValueError(f"{_OP}: tau={tau} is too small: 1/tau overflows {values.dtype}. Any tau below "
                         "about 1e-3 already gives one-hot weights (the most / least perplex member "
                         "alone); use tau >= 1e-30")
    if n == 0:
        return values.new_zeros(0)
    uniq, dense = torch.unique(group_ids, return_inverse=True)
    return ops.group_weights(values.contiguous(), dense.to(torch.int64).contiguous(),
                             member_mask.contiguous(), uniq.numel(), float(sign) / tau,
                             normalize == "mean")
