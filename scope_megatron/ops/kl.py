"""vocab_parallel_kl: full-vocabulary KL between student and teacher from sharded logits."""
from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from scope_megatron._extension import require_device_support

from ._checks import (check_flags, check_logits, check_same_placement, check_temperature, defers_error_check,
                      flat_vector, flatten_rows, raise_on_flags, resolve_vocab_size)
from ._dist import ShardInfo, gather_stats, shard_info
from ._library import FLAG_NONFINITE_FIRST, FLAG_NONFINITE_SECOND, acc_dtype, ops

_OP = "vocab_parallel_kl"
DIRECTIONS = ("reverse", "forward")
_FLAG_NAMES = {FLAG_NONFINITE_FIRST: "student logits", FLAG_NONFINITE_SECOND: "teacher logits"}


class _VocabParallelKL(torch.autograd.Function):
    """Two passes: the forward's row statistics (all-gathered over the group), then the gradient
    in backward. Takes and returns the caller's shapes ([..., V_local] -> [...]) and flattens
    inside, so the graph holds this one node (no view nodes around it: each costs the host a
    node's worth of autograd time per call)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, shard: ShardInfo,
                vocab_size: int, inv_ts: float, inv_tt: float, reverse: bool,
                deferred: bool) -> torch.Tensor:
        s, t = flatten_rows(student), flatten_rows(teacher)
        stats = ops.kl_partial(s, t, shard.vocab_start, vocab_size, inv_ts, inv_tt, reverse)
        kl, row_stats, flags = ops.kl_combine(gather_stats(stats, shard), reverse, inv_ts, inv_tt)
        ctx.check = check_flags(_OP, flags, _FLAG_NAMES, deferred=deferred)
        ctx.save_for_backward(s, t, row_stats)
        ctx.args = (shard.vocab_start, vocab_size, inv_ts, inv_tt, reverse)  # kl_backward's trailing arguments
        ctx.shape = student.shape
        return kl.view(student.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: torch.Tensor):
        s, t, row_stats = ctx.saved_tensors
        # Exact gradient of the replicated KL w.r.t. this rank's student shard; no collective.
        grad = ops.kl_backward(flat_vector(grad_kl, row_stats.dtype), s, t, row_stats, *ctx.args)
        if ctx.check is not None:  # after the launch: the kernel runs while the host waits
            ctx.check.check()
        return (grad.view(ctx.shape), *(None,) * 7)


class _FusedKL(torch.autograd.Function):
    """KL and gradient in one pass (ops.kl_fused) for logits holding the whole vocabulary, with
    the gradient backward is expected to receive given up front. Shapes as _VocabParallelKL.

    Its backward launches only the fix-up (a few microseconds), so it reads what it needs on the
    host at once: the deferred error flags and the count of recomputed rows (one short wait, no
    pinned copies or events queued in the forward, which cost the host more than that)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, expected_grad: torch.Tensor,
                vocab_size: int, inv_ts: float, inv_tt: float, reverse: bool,
                deferred: bool) -> torch.Tensor:
        s, t = flatten_rows(student), flatten_rows(teacher)
        # Not checked for NaN here (a host sync): a non-finite expected_grad can only fail to
        # match in backward, which then recomputes the gradient from the one it receives.
        expected = flat_vector(expected_grad, acc_dtype(s.dtype))
        kl, row_stats, flags, grad = ops.kl_fused(s, t, expected, vocab_size, inv_ts, inv_tt, reverse)
        if not deferred:
            raise_on_flags(_OP, flags, _FLAG_NAMES)
        ctx.flags = flags if deferred else None  # checked in backward
        ctx.save_for_backward(s, t, row_stats, expected)
        ctx.grad = grad  # not a saved tensor: backward hands it over without a copy
        ctx.args = (0, vocab_size, inv_ts, inv_tt, reverse)
        ctx.shape = student.shape
        return kl.view(student.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: torch.Tensor):
        s, t, row_stats, expected = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # handed over once; a second backward (retain_graph) recomputes
        got = flat_vector(grad_kl, expected.dtype)
        counter = None
        if grad is None:
            grad = ops.kl_backward(got, s, t, row_stats, *ctx.args)
        else:
            # The rows where the received gradient differs from expected_grad are rewritten on
            # the device (the KL gradient is linear in each row's upstream gradient): no host
            # decision; where they are equal (the usual case) nothing moves.
            counter = _MISMATCHES.counter(got.device)
            ops.kl_backward_fixup(grad, got, expected, s, t, row_stats, *ctx.args, counter)
        if ctx.flags is not None:  # after the launches: they run while the host waits
            raise_on_flags(_OP, ctx.flags, _FLAG_NAMES)
        if counter is not None:
            _MISMATCHES.report(counter, got.numel())
        return (grad.view(ctx.shape), *(None,) * 7)


class _MismatchCount:
    """Reports, with a RuntimeWarning, fused backwards whose received gradient differed from
    expected_grad (a cost, not an error: those rows were recomputed). kl_backward_fixup adds the
    number of differing tokens to a running count per device (no allocation per call); backward
    reads it and reports its growth."""

    def __init__(self):
        self.counters = {}  # device -> 0-d int64 running count
        self.seen = {}  # device -> the count at the last read
        self.lock = threading.Lock()  # backward runs on autograd's device threads

    def counter(self, device: torch.device) -> torch.Tensor:
        with self.lock:
            if device not in self.counters:
                self.counters[device] = torch.zeros((), dtype=torch.int64, device=device)
            return self.counters[device]

    def report(self, counter: torch.Tensor, tokens: int) -> None:
        value = int(counter)  # waits for the fix-up just launched (microseconds)
        with self.lock:
            seen = self.seen.get(counter.device, 0)
            self.seen[counter.device] = max(seen, value)
        if value > seen:  # outside the lock: a warning filter may raise
            warnings.warn(
                f"{_OP}: the gradient backward received differed from expected_grad on "
                f"{value - seen} of {tokens} tokens; those rows of the gradient were recomputed (two "
                "more reads of their logits). Pass the gradient the loss actually backpropagates "
                "into the KL (loss scale and averaging included) as expected_grad.",
                RuntimeWarning, stacklevel=2)


_MISMATCHES = _MismatchCount()


def vocab_parallel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    direction: str = "reverse",
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    expected_grad: Optional[torch.Tensor] = None,
    error_check: str = "forward",
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
      expected_grad: the gradient that backward will receive for the result (shape [...],
        i.e. d loss / d KL per token), when it is known before the forward: for a weighted sum
        (kl * w).sum() it is w. Without tensor parallelism the forward then computes the KL and
        its gradient in one pass over the logits (ops.kl_fused: each row pair is read once
        instead of twice), keeps the gradient until backward (the same bf16 [..., V] tensor
        the backward would allocate, held from the forward on) and returns it there. The
        gradient is always exact for the gradient backward actually receives: on the tokens
        where that differs from expected_grad (a loss scale, say), backward recomputes those
        rows on the device and a RuntimeWarning reports them (backward reads their count: one
        short wait for its few-microsecond fix-up kernel). Ignored under tensor parallelism (a
        shard's gradient needs the statistics of every shard first).
      error_check: "forward" (default): NaN / Inf logits raise in the forward, which waits for
        the device to know (one host sync per call). "backward", when the result will be
        differentiated (grad enabled, student logits requiring grad): the forward does not wait,
        the affected tokens' KL is NaN, and backward raises the same error before it returns a
        gradient (it waits for the forward's flags only, not for its own kernel; with
        expected_grad, whose backward kernel is the fix-up above, for that too). For loops that
        always backpropagate the result and want the host to run ahead of the device; otherwise
        the same as "forward".

    Returns:
      float32 (float64 for float64 inputs) KL of shape [...], identical on every rank of the
      group. Backward: the exact gradient w.r.t. this rank's student shard, in the student
      logits' dtype (zero on padding columns). The teacher is treated as frozen: its gradient is
      None even if it requires grad.

    Raises:
      ValueError / TypeError for mismatched shapes, dtypes or devices, an unknown direction, bad
      temperatures or vocab_size or error_check; FloatingPointError if either logits contain
      NaN or Inf (in backward, with error_check="backward").
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
    deferred = defers_error_check(_OP, error_check, student_logits)
    # Whether the result will be differentiated: what "backward" defers on (one definition, in
    # _checks), and what makes the fused kernel's gradient worth computing.
    differentiated = defers_error_check(_OP, "backward", student_logits)
    require_device_support(student_logits)
    inv_ts = 1.0 / check_temperature(_OP, "student_temperature", student_temperature)
    inv_tt = 1.0 / check_temperature(_OP, "teacher_temperature", teacher_temperature)
    local_vocab = student_logits.shape[-1]
    shard = shard_info(tp_group, local_vocab, _OP)
    vocab_size = resolve_vocab_size(_OP, vocab_size, shard.padded_vocab, local_vocab, shard.world_size)
    # The teacher is frozen: detached, so that no graph edge leads to it.
    teacher = teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits
    reverse = direction == "reverse"
    if expected_grad is not None and shard.world_size == 1 and differentiated:
        _check_expected_grad(expected_grad, student_logits)
        return _FusedKL.apply(student_logits, teacher, expected_grad.detach(), vocab_size, inv_ts, inv_tt,
                              reverse, deferred)
    return _VocabParallelKL.apply(student_logits, teacher, shard, vocab_size, inv_ts, inv_tt, reverse,
                                  deferred)


def _check_expected_grad(expected_grad: torch.Tensor, student_logits: torch.Tensor) -> None:
    """expected_grad must be a tensor of the result's shape [...], on the logits' device."""
    shape = student_logits.shape[:-1]
    if not isinstance(expected_grad, torch.Tensor) or expected_grad.shape != shape:
        raise ValueError(f"{_OP}: expected_grad must be a tensor of shape {tuple(shape)} (one value per "
                         f"token, like the result), got "
                         f"{tuple(getattr(expected_grad, 'shape', ())) or type(expected_grad).__name__}")
    if expected_grad.device != student_logits.device:
        raise ValueError(f"{_OP}: expected_grad is on {expected_grad.device}, the logits on "
                         f"{student_logits.device}")
