"""Handles to the torch.ops.scope_megatron operators and their fake (meta) implementations.

The fake implementations describe output shapes and dtypes without computing anything, so that
torch.compile / FakeTensor tracing can go through the custom ops.
"""
from __future__ import annotations

import torch

from scope_megatron._extension import load_extension

load_extension()
ops = torch.ops.scope_megatron

# Widths of the statistics layouts (csrc/include/scope_kernels/softmax_stats.h)
LOGPROB_STATS_WIDTH = 5  # LogprobStatsLayout::kWidth
KL_STATS_WIDTH = 6  # KLStatsLayout::kWidth
LOGPROB_ROW_WIDTH = 2  # LogprobRowLayout::kWidth
KL_ROW_WIDTH = 5  # KLRowLayout::kWidth

# ErrorFlag bits (csrc/include/scope_kernels/types.h)
FLAG_NONFINITE_FIRST = 1
FLAG_NONFINITE_SECOND = 2
FLAG_TARGET_OUT_OF_RANGE = 4
FLAG_SHARD_LAYOUT = 8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / result dtype for a logits dtype: float64 stays float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("scope_megatron::logprob_partial")
def _logprob_partial_fake(logits, target, vocab_start, vocab_size, inv_temperature):
    return logits.new_empty((logits.shape[0], LOGPROB_STATS_WIDTH), dtype=acc_dtype(logits.dtype))


@torch.library.register_fake("scope_megatron::logprob_combine")
def _logprob_combine_fake(stats, inv_temperature):
    rows = stats.shape[1]
    return (stats.new_empty(rows), stats.new_empty((rows, LOGPROB_ROW_WIDTH)),
            stats.new_empty(rows, dtype=torch.int32))


@torch.library.register_fake("scope_megatron::logprob_backward")
def _logprob_backward_fake(grad_out, logits, target, row_stats, vocab_start, vocab_size,
                           inv_temperature):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("scope_megatron::kl_partial")
def _kl_partial_fake(student, teacher, vocab_start, vocab_size, inv_ts, inv_tt, reverse):
    return student.new_empty((student.shape[0], KL_STATS_WIDTH), dtype=acc_dtype(student.dtype))


@torch.library.register_fake("scope_megatron::kl_combine")
def _kl_combine_fake(stats, reverse, inv_ts, inv_tt):
    rows = stats.shape[1]
    return (stats.new_empty(rows), stats.new_empty((rows, KL_ROW_WIDTH)),
            stats.new_empty(rows, dtype=torch.int32))


@torch.library.register_fake("scope_megatron::kl_backward")
def _kl_backward_fake(grad_out, student, teacher, row_stats, vocab_start, vocab_size, inv_ts,
                      inv_tt, reverse):
    return student.new_empty(student.shape)


@torch.library.register_fake("scope_megatron::kl_fused")
def _kl_fused_fake(student, teacher, weight, vocab_size, inv_ts, inv_tt, reverse):
    rows = student.shape[0]
    return (weight.new_empty(rows), weight.new_empty((rows, KL_ROW_WIDTH)),
            weight.new_empty(rows, dtype=torch.int32), student.new_empty(student.shape))


@torch.library.register_fake("scope_megatron::kl_backward_fixup")
def _kl_backward_fixup_fake(grad, grad_out, expected, student, teacher, row_stats, vocab_start,
                            vocab_size, inv_ts, inv_tt, reverse, mismatches=None):
    return None


@torch.library.register_fake("scope_megatron::sequence_logppl")
def _sequence_logppl_fake(values, mask, offsets):
    seqs = offsets.shape[0] - 1
    return values.new_empty(seqs), values.new_empty(seqs, dtype=torch.int64)


@torch.library.register_fake("scope_megatron::sequence_logppl_backward")
def _sequence_logppl_backward_fake(grad_out, mask, offsets, count, num_values):
    return grad_out.new_empty(num_values)


@torch.library.register_fake("scope_megatron::group_weights")
def _group_weights_fake(log_ppl, group_index, member, num_groups, sign_over_tau, mean_scale):
    return log_ppl.new_empty(log_ppl.shape)
