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
gathered from the owning ranks with one differentiable sum over the group (backward: identity).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._tp import TensorParallel, gather_ranks, sum_over_ranks


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
    local_vocab = student_logits.shape[-1]
    shape = student_logits.shape[:-1]
    acc = student_logprobs.dtype
    s = student_logits.reshape(-1, local_vocab)
    t = teacher_logits.detach().reshape(-1, local_vocab)
    y = target.reshape(-1, 1).to(torch.int64)
    rows = s.shape[0]
    start = tp.rank * local_vocab
    vocab = local_vocab * tp.world_size if vocab_size is None else int(vocab_size)
    k = min(int(k), vocab)

    # Teacher top-k: per shard over its real (non-padding) columns, then across shards. Values
    # and ids travel together as float64 (ids < 2^53 are exact) in one all-gather.
    real = max(0, min(local_vocab, vocab - start))
    k_local = min(k, real)
    cand = torch.full((rows, 2, k), float("-inf"), dtype=torch.float64, device=s.device)
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

    # x_S at K and y, x_T at y: from the owning rank, summed over the group (zeros elsewhere).
    ids = torch.cat([top_ids, y], dim=-1)
    x_s_top, x_s_y, x_t_y = _logits_at(s, t, ids, tp, start, acc)
    logp_s = (x_s_top - x_s_y) / student_temperature + student_logprobs.reshape(-1, 1)
    logp_t = (top_values.to(acc) - x_t_y) / teacher_temperature \
        + teacher_logprobs.reshape(-1, 1).to(acc).detach()
    return _topk_tail_kl(logp_s, logp_t).reshape(shape)


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
    x_s_top, x_s_y, _ = _logits_at(s, None, ids, tp, tp.rank * local_vocab, acc)
    logp_s = (x_s_top - x_s_y) / student_temperature + student_logprobs.reshape(-1, 1)
    logp_t = teacher_top_logprobs.detach().reshape(-1, k).to(acc)
    return _topk_tail_kl(logp_s, logp_t).reshape(shape)


def _logits_at(s, t, ids, tp, start, acc):
    """Student logits at ids [rows, k + 1] (the last column: the sampled token y) and, with
    teacher shard t, the teacher's logit at y; each from the rank owning the id, summed over the
    group (differentiable for the student)."""
    local_vocab = s.shape[-1]
    k = ids.shape[-1] - 1
    owned = (ids >= start) & (ids < start + local_vocab)
    local = (ids - start).clamp(0, local_vocab - 1)
    zero = torch.zeros((), dtype=acc, device=s.device)
    parts = [torch.where(owned, s.gather(-1, local).to(acc), zero)]
    if t is not None:
        parts.append(torch.where(owned[:, -1:], t.gather(-1, local[:, -1:]).to(acc), zero))
    summed = sum_over_ranks(torch.cat(parts, dim=-1), tp)
    return summed[:, :k], summed[:, k:k + 1], (summed[:, k + 1:] if t is not None else None)


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
