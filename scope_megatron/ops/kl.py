"""vocab_parallel_kl: full-vocabulary KL between student and teacher from sharded logits."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from scope_megatron._extension import require_device_support

from ._checks import (check_logits, check_same_placement, check_temperature, flatten_rows,
                      raise_on_flags, resolve_vocab_size)
from ._dist import ShardInfo, gather_stats, shard_info
from ._library import FLAG_NONFINITE_FIRST, FLAG_NONFINITE_SECOND, ops

_OP = "vocab_parallel_kl"
DIRECTIONS = ("reverse", "forward")


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, shard: ShardInfo,
                vocab_size: int, inv_ts: float, inv_tt: float, reverse: bool) -> torch.Tensor:
        stats = ops.kl_partial(student, teacher, shard.vocab_start, vocab_size, inv_ts, inv_tt,
                               reverse)
        kl, row_stats, flags = ops.kl_combine(gather_stats(stats, shard), reverse, inv_ts, inv_tt)
        raise_on_flags(_OP, flags, {FLAG_NONFINITE_FIRST: "student logits",
                                    FLAG_NONFINITE_SECOND: "teacher logits"})
        ctx.save_for_backward(student, teacher, row_stats)
        ctx.args = (shard.vocab_start, vocab_size, inv_ts, inv_tt, reverse)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: torch.Tensor):
        student, teacher, row_stats = ctx.saved_tensors
        # Exact gradient of the replicated KL w.r.t. this rank's student shard; no collective.
        grad = ops.kl_backward(grad_kl.to(row_stats.dtype).contiguous(), student, teacher,
                               row_stats, *ctx.args)
        return grad, None, None, None, None, None, None


def vocab_parallel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    direction: str = "reverse",
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL divergence between the student's and the teacher's full-vocabulary softmax.

    direction="reverse" (SCOPE / on-policy distillation default): KL(student || teacher)
      = sum_v p_S(v) (log p_S(v) - log p_T(v)), the expectation under the student.
    direction="forward": KL(teacher || student).
    p_S = softmax(student_logits / student_temperature), p_T likewise for the teacher.

    Args:
      student_logits, teacher_logits: this rank's vocabulary shards, same shape [..., V_local],
        dtype and device (float32 / bfloat16 / float16; float64 for gradcheck). Both models must
        be sharded identically: the same padded vocabulary and tensor-parallel size (build the
        teacher with the student's padded vocabulary size if their embedding tables differ).
        Not copied; nothing of size [..., V_local] is allocated in float32.
      tp_group: tensor-parallel group the vocabulary is sharded over (default: Megatron's
        tensor-model-parallel group if initialized, else none).
      vocab_size: true vocabulary size; padded columns (global id >= vocab_size) are excluded
        from both softmaxes. Default: V_local * tp_size.

    Returns:
      float32 (float64 for float64 inputs) KL of shape [...], identical on every rank of the
      group. Backward: the exact gradient w.r.t. this rank's student shard, in the student
      logits' dtype (zero on padding columns). The teacher is treated as frozen: its gradient is
      None even if it requires grad.

    Raises:
      ValueError / TypeError for mismatched shapes, dtypes or devices, an unknown direction, bad
      temperatures or vocab_size; FloatingPointError if either logits contain NaN or Inf.
    """
    check_logits(_OP, "student_logits", student_logits)
    check_logits(_OP, "teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{_OP}: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape. If the models' embedding "
            "tables are padded differently, build both with the same padded vocabulary size "
            "(the true vocabulary is given by vocab_size)."
        )
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(f"{_OP}: student_logits ({student_logits.dtype}) and teacher_logits "
                        f"({teacher_logits.dtype}) must have the same dtype; cast the teacher's")
    check_same_placement(_OP, "student_logits", student_logits, "teacher_logits", teacher_logits)
    if direction not in DIRECTIONS:
        raise ValueError(f"{_OP}: direction must be one of {DIRECTIONS}, got {direction!r}")
    require_device_support(student_logits)
    inv_ts = 1.0 / check_temperature(_OP, "student_temperature", student_temperature)
    inv_tt = 1.0 / check_temperature(_OP, "teacher_temperature", teacher_temperature)
    local_vocab = student_logits.shape[-1]
    shard = shard_info(tp_group, local_vocab, _OP)
    vocab_size = resolve_vocab_size(_OP, vocab_size, shard.padded_vocab, local_vocab, shard.world_size)
    out = _VocabParallelKL.apply(flatten_rows(student_logits), flatten_rows(teacher_logits.detach()),
                                 shard, vocab_size, inv_ts, inv_tt, direction == "reverse")
    return out.reshape(student_logits.shape[:-1])
