"""Top-k reverse KL from vocabulary-sharded logits.

Per token, the partition of the vocabulary into the teacher's top-k ids K plus one tail bucket
(every other id, holding the remaining mass):
    KL_k = sum_{j in K} p_S(j) (log p_S(j) - log p_T(j)) + p_S(tail) (log p_S(tail) - log p_T(tail))
    log p(tail) = log(1 - sum_{j in K} p(j))
It equals the full reverse KL when K covers the vocabulary, and is a lower bound of it otherwise
(the KL of a coarsening).

Tensor parallelism: each rank takes the top-k of its shard (padding columns excluded), one
all-gather of (value, global id) pairs gives every rank the same global top-k. Log-probs at the
chosen ids need each model's log-normalizer, obtained from its log-prob of the sampled token y
(the vocab_parallel_logprob op): log p(j) = (x_j - x_y) / T + log p(y). The logits x_j, x_y are
gathered from the owning ranks with a differentiable sum over the group (backward: identity).

teacher_top_k gives the teacher's side alone (ids and log-probs, as a served teacher's
top_logprobs do): a colocated teacher keeps k values per token instead of its logit shard, and
topk_reverse_kl_given takes either.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ._tp import TensorParallel, gather_ranks, resolve_tp, sum_over_ranks


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    k: int,
    tp: TensorParallel,
    vocab_size: Optional[int],
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """Per-token top-k-plus-tail KL(student || teacher).

    Args:
      student_logits, teacher_logits: this rank's vocabulary shards [..., V_local], identically
        sharded over tp.group (rank r holds ids [r * V_local, (r + 1) * V_local)).
      target: [...] global ids of the sampled tokens, valid ids (< vocab_size) everywhere.
      student_logprobs: [...] log p_S(target) at student_temperature from vocab_parallel_logprob
        on the same logits, differentiable (it carries the normalizer's gradient).
      teacher_logprobs: [...] log p_T(target) at teacher_temperature (no gradient).
      k: number of teacher top ids (capped at vocab_size).
      vocab_size: true vocabulary size (None: V_local * world_size); padded ids are never chosen.

    Returns the KL [...] in the dtype of student_logprobs (float32, float64 for float64 input),
    replicated on the group, differentiable w.r.t. this rank's student shard (and
    student_logprobs). The teacher gets no gradient.
    """
    top_ids, top_logprobs = _teacher_top_k(teacher_logits, target, teacher_logprobs, k=k, tp=tp,
                                           vocab_size=vocab_size, teacher_temperature=teacher_temperature,
                                           dtype=student_logprobs.dtype)
    return topk_reverse_kl_given(student_logits, top_ids, top_logprobs, target, student_logprobs, tp=tp,
                                 student_temperature=student_temperature)


def teacher_top_k(
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    k: int,
    vocab_size: Optional[int],
    teacher_temperature: float,
    tp_group: Optional[dist.ProcessGroup] = None,
    dtype: torch.dtype = torch.float32,
):
    """The teacher's k most likely ids per token and their log-probs, from its vocabulary shards:
    what a served teacher's top_logprobs give (RolloutBatch.teacher_top_ids / _logprobs), so that
    a colocated teacher can keep [..., k] values per token instead of its [..., V_local] logits.

    Args:
      teacher_logits: this rank's shard [..., V_local] (rank r holds ids [r * V_local, ...)).
      target: [...] global ids of the sampled tokens, valid ids (< vocab_size) everywhere.
      teacher_logprobs: [...] log p_T(target) at teacher_temperature (vocab_parallel_logprob of
        the same logits): it supplies the log-normalizer.
      k: capped at vocab_size; vocab_size: true vocabulary (None: V_local * world_size); padded
        ids are never chosen.
      tp_group: the tensor-parallel group the vocabulary is sharded over (default: Megatron's
        tensor-model-parallel group if initialized, else none).
      dtype: of the returned log-probs (float32, or float64 for float64 logits).

    Returns (ids [..., k] int64 global ids in descending order of probability, log-probs [..., k]
    at teacher_temperature), identical on every rank of the group. No gradient.
    """
    return _teacher_top_k(teacher_logits, target, teacher_logprobs, k=k, tp=resolve_tp(tp_group),
                          vocab_size=vocab_size, teacher_temperature=teacher_temperature, dtype=dtype)


@torch.no_grad()
def _teacher_top_k(teacher_logits, target, teacher_logprobs, *, k, tp, vocab_size, teacher_temperature, dtype):
    local_vocab = teacher_logits.shape[-1]
    shape = teacher_logits.shape[:-1]
    t = teacher_logits.detach().reshape(-1, local_vocab)
    rows = t.shape[0]
    start = tp.rank * local_vocab
    vocab = local_vocab * tp.world_size if vocab_size is None else int(vocab_size)
    k = min(int(k), vocab)

    # Per shard over its real (non-padding) columns, then across shards. Values and ids travel
    # together as float64 (ids < 2^53 are exact) in one all-gather.
    real = max(0, min(local_vocab, vocab - start))
    k_local = min(k, real)
    cand = torch.full((rows, 2, k), float("-inf"), dtype=torch.float64, device=t.device)
    cand[:, 1] = -1.0
    if k_local > 0:
        values, idx = t[:, :real].topk(k_local, dim=-1)
        cand[:, 0, :k_local] = values.to(torch.float64)
        cand[:, 1, :k_local] = (idx + start).to(torch.float64)
    gathered = gather_ranks(cand, tp)  # [world, rows, 2, k]
    all_values = gathered[:, :, 0].permute(1, 0, 2).reshape(rows, -1)
    all_ids = gathered[:, :, 1].permute(1, 0, 2).reshape(rows, -1)
    top_values, pos = all_values.topk(k, dim=-1)
    top_ids = all_ids.gather(-1, pos).to(torch.int64)

    # log p_T(j) = (x_j - x_y) / T + log p_T(y), with x_y from the rank owning y.
    y = target.reshape(-1, 1).to(torch.int64)
    owned = (y >= start) & (y < start + local_vocab)
    x_y = torch.where(owned, t.gather(-1, (y - start).clamp(0, local_vocab - 1)).to(dtype),
                      torch.zeros((), dtype=dtype, device=t.device))
    x_y = sum_over_ranks(x_y, tp)
    logprobs = (top_values.to(dtype) - x_y) / teacher_temperature \
        + teacher_logprobs.detach().reshape(-1, 1).to(dtype)
    return top_ids.reshape(*shape, k), logprobs.reshape(*shape, k)


def topk_reverse_kl_given(
    student_logits: torch.Tensor,
    teacher_top_ids: torch.Tensor,
    teacher_top_logprobs: torch.Tensor,
    target: torch.Tensor,
    student_logprobs: torch.Tensor,
    *,
    tp: TensorParallel,
    student_temperature: float,
) -> torch.Tensor:
    """The same top-k-plus-tail KL when the teacher's top-k ids and their log-probs are given
    (a served teacher's top_logprobs) instead of its logits.

    teacher_top_ids: [..., k] global ids (any order, distinct, valid for the student's
    vocabulary); teacher_top_logprobs: [..., k] their log-probs at the teacher temperature (no
    gradient). The teacher's tail is the mass the k ids leave. Other arguments and the result as
    topk_reverse_kl."""
    local_vocab = student_logits.shape[-1]
    shape = student_logits.shape[:-1]
    acc = student_logprobs.dtype
    k = teacher_top_ids.shape[-1]
    s = student_logits.reshape(-1, local_vocab)
    y = target.reshape(-1, 1).to(torch.int64)
    ids = torch.cat([teacher_top_ids.reshape(-1, k).to(torch.int64), y], dim=-1)
    x_s_top, x_s_y = _logits_at(s, ids, tp, tp.rank * local_vocab, acc)
    logp_s = (x_s_top - x_s_y) / student_temperature + student_logprobs.reshape(-1, 1)
    logp_t = teacher_top_logprobs.detach().reshape(-1, k).to(acc)
    return _topk_tail_kl(logp_s, logp_t).reshape(shape)


def _logits_at(s, ids, tp, start, acc):
    """Student logits at ids [rows, k + 1] (the last column: the sampled token y), each from the
    rank owning the id, summed over the group (differentiable for the student)."""
    local_vocab = s.shape[-1]
    k = ids.shape[-1] - 1
    owned = (ids >= start) & (ids < start + local_vocab)
    local = (ids - start).clamp(0, local_vocab - 1)
    zero = torch.zeros((), dtype=acc, device=s.device)
    summed = sum_over_ranks(torch.where(owned, s.gather(-1, local).to(acc), zero), tp)
    return summed[:, :k], summed[:, k:k + 1]


def _topk_tail_kl(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    tail_s, tail_t = _log_tail(logp_s), _log_tail(logp_t)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1) + tail_s.exp() * (tail_s - tail_t)


def _log_tail(logp_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(logp_top)) computed stably; when the top ids hold all the mass (up to
    rounding) the tail is clamped to one ulp of mass instead of -inf, so that both models' tails
    contribute ~0 rather than NaN."""
    eps = torch.finfo(logp_top.dtype).eps
    covered = torch.logsumexp(logp_top, dim=-1).clamp(max=-eps)
    return torch.log(-torch.expm1(covered))
