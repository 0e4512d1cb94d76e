"""Top-k reverse KL from vocabulary-sharded logits.

Per token, the partition of the vocabulary into the teacher's top-k ids K plus one tail bucket
(every other id, holding the remaining mass):
    KL_k = sum_{j in K} p_S(j) (log p_S(j) - log p_T(j)) + p_S(tail) (log p_S(tail) - log p_T(tail))
    log p(tail) = log(1 - sum_{j in K} p(j))
It equals the full reverse KL when K covers the vocabulary, and is a lower bound of it otherwise
(the KL of a coarsening).

Tensor parallelism: each rank takes the top-k of its shard (padding columns excluded), one
all-gather of (value, global id) pairs, with the teacher's logit x_y of the sampled token y from
the rank owning it, gives every rank the same global top-k. Log-probs at the chosen ids need each
model's log-normalizer, obtained from its log-prob of y (the vocab_parallel_logprob op):
log p(j) = (x_j - x_y) / T + log p(y). The student's logits x_j, x_y are gathered from the owning
ranks with one differentiable sum over the group (backward: identity).

teacher_top_k gives the teacher's side alone (ids and log-probs, as a served teacher's
top_logprobs do): a colocated teacher keeps k values per token instead of its logit shard, and
topk_reverse_kl_given takes either.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from scope_megatron.ops._checks import check_logits, check_same_placement, check_temperature

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
    vocab = tp.true_vocab("topk_reverse_kl", vocab_size, teacher_logits.shape[-1])
    top_ids, top_logprobs = _teacher_top_k(teacher_logits, target, teacher_logprobs, k=int(k), tp=tp,
                                           vocab=vocab, teacher_temperature=teacher_temperature,
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
      target: [...] integer global ids of the sampled tokens, each in [0, vocab_size).
      teacher_logprobs: [...] log p_T(target) at teacher_temperature (vocab_parallel_logprob of
        the same logits): it supplies the log-normalizer.
      k: >= 1, capped at vocab_size; vocab_size: true vocabulary (None: V_local * world_size);
        padded ids are never chosen.
      teacher_temperature: finite, > 0.
      tp_group: the tensor-parallel group the vocabulary is sharded over (default: Megatron's
        tensor-model-parallel group if initialized, else none).
      dtype: of the returned log-probs (float32, or float64 for float64 logits).

    Returns (ids [..., k] int64 global ids in descending order of probability, log-probs [..., k]
    at teacher_temperature), identical on every rank of the group. No gradient.

    Raises ValueError / TypeError for a k < 1, misaligned shapes, a bad temperature or vocab_size,
    or a target outside the vocabulary (checking it waits for the device once).
    """
    op = "teacher_top_k"
    check_logits(op, "teacher_logits", teacher_logits)
    try:
        valid_k = int(k) == k and int(k) >= 1
    except (TypeError, ValueError):
        valid_k = False
    if not valid_k:
        raise ValueError(f"{op}: k must be an integer >= 1, got {k!r}; pass the number of teacher top ids "
                         "per token (ScopeConfig.topk_k)")
    shape = tuple(teacher_logits.shape[:-1])
    for name, value in (("target", target), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {tuple(value.shape)}; it must be {shape}, one value "
                             f"per token of teacher_logits {tuple(teacher_logits.shape)} (its shape without "
                             "the vocabulary dimension)")
        check_same_placement(op, name, value, "teacher_logits", teacher_logits)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{op}: target must hold integer token ids, got {target.dtype}")
    if not teacher_logprobs.dtype.is_floating_point:
        raise TypeError(f"{op}: teacher_logprobs must be floating point log-probs, got "
                        f"{teacher_logprobs.dtype}")
    temperature = check_temperature(op, "teacher_temperature", teacher_temperature)
    tp = resolve_tp(tp_group)
    vocab = tp.true_vocab(op, vocab_size, teacher_logits.shape[-1])
    # Outside [0, vocab) no shard (or a padding column) holds the target's logit and the log-probs
    # come out shifted, even positive. The one host sync of this entry; the internal path of
    # topk_reverse_kl has none (its targets were checked by vocab_parallel_logprob).
    bad = ((target < 0) | (target >= vocab)).flatten()
    if bool(bad.any()):
        idx = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{op}: target ids must be in [0, {vocab}) (vocab_size); {int(bad.sum())} of {bad.numel()} "
            f"tokens are outside it (first: flattened token {idx}, target {int(target.flatten()[idx])}). "
            "Replace padding / ignore ids by a valid id and mask those tokens' results instead.")
    return _teacher_top_k(teacher_logits, target, teacher_logprobs, k=int(k), tp=tp, vocab=vocab,
                          teacher_temperature=temperature, dtype=dtype)


@torch.no_grad()
def _teacher_top_k(teacher_logits, target, teacher_logprobs, *, k, tp, vocab, teacher_temperature, dtype):
    """teacher_top_k on validated arguments (vocab: the resolved true vocabulary size; targets in
    [0, vocab)); one collective, no host sync."""
    local_vocab = teacher_logits.shape[-1]
    shape = teacher_logits.shape[:-1]
    t = teacher_logits.detach().reshape(-1, local_vocab)
    rows = t.shape[0]
    start = tp.rank * local_vocab
    k = min(k, vocab)

    # One all-gather of float64 rows [values (k) | ids (k) | x_y]: the shard's top-k over its real
    # (non-padding) columns, their global ids (exact below 2^53), and the teacher's logit x_y of
    # the sampled token from the shard owning y (0 on the others, so that the sum over the shards
    # is x_y exactly: no all-reduce of its own).
    real = max(0, min(local_vocab, vocab - start))
    k_local = min(k, real)
    y = target.reshape(-1, 1).to(torch.int64)
    owned = (y >= start) & (y < start + local_vocab)
    cand = torch.empty((rows, 2 * k + 1), dtype=torch.float64, device=t.device)
    cand[:, :k] = float("-inf")
    cand[:, k:2 * k] = -1.0
    x_y = t.gather(-1, (y - start).clamp(0, local_vocab - 1)).to(torch.float64)
    cand[:, 2 * k:] = torch.where(owned, x_y, torch.zeros((), dtype=torch.float64, device=t.device))
    if k_local > 0:
        values, idx = t[:, :real].topk(k_local, dim=-1)
        cand[:, :k_local] = values.to(torch.float64)
        cand[:, k:k + k_local] = (idx + start).to(torch.float64)
    gathered = gather_ranks(cand, tp)  # [world, rows, 2k + 1]
    all_values = gathered[:, :, :k].permute(1, 0, 2).reshape(rows, -1)
    all_ids = gathered[:, :, k:2 * k].permute(1, 0, 2).reshape(rows, -1)
    x_y = gathered[:, :, 2 * k:].sum(0)  # [rows, 1], one non-zero term
    top_values, pos = all_values.topk(k, dim=-1)
    top_ids = all_ids.gather(-1, pos).to(torch.int64)

    # log p_T(j) = (x_j - x_y) / T + log p_T(y)
    logprobs = (top_values.to(dtype) - x_y.to(dtype)) / teacher_temperature \
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
