"""vocab_parallel_logprob: log pi(target) from vocabulary-sharded logits."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from scope_megatron._extension import require_device_support

from ._checks import (check_flags, check_logits, check_same_placement, check_temperature, flat_vector,
                      defers_error_check, flatten_rows, resolve_vocab_size)
from ._dist import ShardInfo, gather_stats, shard_info
from ._library import FLAG_NONFINITE_FIRST, ops

_OP = "vocab_parallel_logprob"


class _VocabParallelLogprob(torch.autograd.Function):
    """Takes and returns the caller's shapes ([..., V_local], [...] -> [...]) and flattens inside,
    so the graph holds this one node (no view nodes around it)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, shard: ShardInfo,
                vocab_size: int, inv_temperature: float, deferred: bool) -> torch.Tensor:
        rows = flatten_rows(logits)
        target = flat_vector(target, torch.int64)
        stats = ops.logprob_partial(rows, target, shard.vocab_start, vocab_size, inv_temperature)
        logprob, row_stats, flags = ops.logprob_combine(gather_stats(stats, shard), inv_temperature)
        ctx.check = check_flags(_OP, flags, {FLAG_NONFINITE_FIRST: "logits"}, deferred=deferred,
                                target=target, vocab_size=vocab_size)
        ctx.save_for_backward(rows, target, row_stats)
        ctx.args = (shard.vocab_start, vocab_size, inv_temperature)
        ctx.shape = logits.shape
        return logprob.view(logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprob: torch.Tensor):
        rows, target, row_stats = ctx.saved_tensors
        # The result is replicated over the TP group and each rank differentiates it w.r.t. its
        # own shard only: no collective here, and no factor of the TP size.
        grad = ops.logprob_backward(flat_vector(grad_logprob, row_stats.dtype), rows,
                                    target, row_stats, *ctx.args)
        if ctx.check is not None:  # after the launch: the kernel runs while the host waits
            ctx.check.check()
        return grad.view(ctx.shape), None, None, None, None, None


def vocab_parallel_logprob(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    error_check: str = "forward",
) -> torch.Tensor:
    """Log-probability of each target token under softmax(logits / temperature).

    Args:
      logits: this rank's vocabulary shard, shape [..., V_local] (e.g. Megatron's [s, b, V/tp]),
        float32 / bfloat16 / float16 (float64 for gradcheck). Rank r holds global vocabulary ids
        [r * V_local, (r + 1) * V_local) of the tensor-parallel group. Not copied.
      target: global token ids, shape [...] (= logits.shape[:-1]), integer, all in
        [0, vocab_size) on every rank.
      tp_group: the tensor-parallel process group over which the vocabulary is sharded. Default:
        Megatron's tensor-model-parallel group if Megatron's parallel state is initialized, else
        no tensor parallelism (logits hold the whole vocabulary).
      vocab_size: the true vocabulary size; columns with a global id >= vocab_size (padding of
        the embedding table) are excluded from the softmax. Default: V_local * tp_size.
      temperature: softmax temperature (> 0).
      error_check: "forward" (default): NaN / Inf logits and out-of-range targets raise in the
        forward, which waits for the device to know (one host sync per call). "backward", when
        the result will be differentiated (grad enabled, logits requiring grad): the forward
        does not wait, the affected tokens' log-prob is NaN, and backward raises the same error
        before it returns a gradient (waiting for the forward's flags only). Otherwise the same
        as "forward".

    Returns:
      float32 (float64 for float64 logits) tensor of shape [...], identical on every rank of
      the group. Backward gives each rank the exact gradient w.r.t. its own shard, in the logits'
      dtype (zero on padding columns). Accumulation is in float32 whatever the input dtype; no
      float32 copy of the logits is made.

    Raises:
      ValueError / TypeError for inconsistent shapes, dtypes, devices, ids out of range or an
      unknown error_check; FloatingPointError if the logits contain NaN or Inf (ids out of range
      and non-finite logits raise in backward with error_check="backward").
    """
    check_logits(_OP, "logits", logits)
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"{_OP}: target must be an integer tensor of token ids, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{_OP}: target shape {tuple(target.shape)} must equal logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    check_same_placement(_OP, "logits", logits, "target", target)
    deferred = defers_error_check(_OP, error_check, logits)
    require_device_support(logits)
    inv_temperature = 1.0 / check_temperature(_OP, "temperature", temperature)
    local_vocab = logits.shape[-1]
    shard = shard_info(tp_group, local_vocab, _OP)
    vocab_size = resolve_vocab_size(_OP, vocab_size, shard.padded_vocab, local_vocab, shard.world_size)
    return _VocabParallelLogprob.apply(logits, target, shard, vocab_size, inv_temperature, deferred)
