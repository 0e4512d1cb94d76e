"""sequence_perplexity: per-sequence mean negative log-likelihood (log perplexity)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from scope_megatron._extension import require_device_support

from ._checks import check_same_placement
from ._library import ops

_OP = "sequence_perplexity"


class _SequenceLogPPL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, mask: Optional[torch.Tensor], offsets: torch.Tensor):
        log_ppl, count = ops.sequence_logppl(values, mask, offsets)
        ctx.save_for_backward(mask, offsets, count)
        ctx.num_values = values.numel()
        ctx.mark_non_differentiable(count)
        return log_ppl, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_ppl: torch.Tensor, _grad_count):
        mask, offsets, count = ctx.saved_tensors
        grad = ops.sequence_logppl_backward(grad_log_ppl.contiguous(), mask, offsets, count,
                                            ctx.num_values)
        return grad, None, None


def _as_float(op: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{op}: token_logprobs must be a floating-point tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_mask(op: str, mask: torch.Tensor, shape) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (True = token counts), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}; convert with mask.bool()")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} must equal token_logprobs shape "
                         f"{tuple(shape)}")


def sequence_perplexity(
    token_logprobs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """log PPL(y) = -(1/|y|) sum_t log pi(y_t) for each sequence, over the tokens in `mask`.

    Padded batch: token_logprobs [B, L], mask [B, L] bool (None: every position counts).
    Packed batch: token_logprobs [N] (or [1, N]) holding B sequences back to back, cu_seqlens
      [B + 1] integer offsets (sequence b = positions cu_seqlens[b]:cu_seqlens[b+1]), mask [N]
      optional (e.g. to drop prompt tokens).
    Log-probs are replicated across tensor-parallel ranks (the output of vocab_parallel_logprob),
    so no process group is involved.

    Returns the log perplexity, shape [B], float32 (float64 for float64 input). It is
    differentiable w.r.t. token_logprobs (it is also the token-mean NLL of the MLE loss); detach
    it where it only weights sequences. Raises ValueError if a sequence has no counted token and
    FloatingPointError if a counted log-prob is NaN or infinite.
    """
    values = _as_float(_OP, token_logprobs)
    require_device_support(values)
    if cu_seqlens is None:
        if values.dim() != 2:
            raise ValueError(f"{_OP}: padded token_logprobs must be 2-D [batch, length], got shape "
                             f"{tuple(values.shape)}; for packed sequences pass cu_seqlens")
        batch, length = values.shape
        if mask is not None:
            _check_mask(_OP, mask, values.shape)
            check_same_placement(_OP, "token_logprobs", values, "mask", mask)
        offsets = torch.arange(batch + 1, device=values.device, dtype=torch.int64) * length
    else:
        if values.dim() == 2 and values.shape[0] == 1:
            values = values[0]
            mask = mask[0] if mask is not None and mask.dim() == 2 else mask
        if values.dim() != 1:
            raise ValueError(f"{_OP}: packed token_logprobs must be 1-D [tokens] (or [1, tokens]), "
                             f"got shape {tuple(token_logprobs.shape)}")
        if mask is not None:
            _check_mask(_OP, mask, values.shape)
            check_same_placement(_OP, "token_logprobs", values, "mask", mask)
        offsets = _check_cu_seqlens(cu_seqlens, values)
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    log_ppl, count = _SequenceLogPPL.apply(values.reshape(-1).contiguous(), flat_mask, offsets)
    _check_result(log_ppl, count)
    return log_ppl


def _check_cu_seqlens(cu_seqlens: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
            or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool):
        raise ValueError(f"{_OP}: cu_seqlens must be a 1-D integer tensor [sequences + 1], got "
                         f"{getattr(cu_seqlens, 'shape', cu_seqlens)}")
    offsets = cu_seqlens.to(device=values.device, dtype=torch.int64).contiguous()
    host = offsets.cpu()
    if int(host[0]) < 0 or bool((host[1:] < host[:-1]).any()) or int(host[-1]) > values.numel():
        raise ValueError(f"{_OP}: cu_seqlens must start >= 0, be non-decreasing and end <= the "
                         f"number of tokens ({values.numel()}), got {host.tolist()}")
    return offsets


def _check_result(log_ppl: torch.Tensor, count: torch.Tensor) -> None:
    empty = count == 0
    if bool(empty.any()):
        idx = torch.nonzero(empty).flatten().tolist()
        raise ValueError(
            f"{_OP}: sequence(s) {idx[:8]}{'...' if len(idx) > 8 else ''} have no counted tokens "
            "(empty response or an all-False mask). A response needs at least one token (its EOS "
            "counts): drop empty responses, or fix the mask."
        )
    bad = ~torch.isfinite(log_ppl)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        raise FloatingPointError(
            f"{_OP}: token log-probs of sequence(s) {idx[:8]} contain NaN or -inf; a log-prob of "
            "-inf means the model gives a sampled token probability 0 (check temperatures, and "
            "that the log-probs come from the same vocabulary)."
        )
