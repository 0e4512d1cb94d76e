"""Per-token and per-rollout losses: the four reverse-KL estimators of the teacher (OPD) path, the
PPO-clip surrogate they and GRPO share, and GRPO's group-normalized advantage.

Reduction, for every loss here: per-token terms are averaged over each rollout's counted
response tokens (token mean per sequence, RolloutBatch.token_mean); algorithm.compute_loss then
takes the weighted sum over rollouts and divides by the number of groups. The MLE path is the
token-mean NLL, i.e. the rollout's log perplexity (RolloutBatch.log_perplexity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from scope_megatron.ops import vocab_parallel_kl

from ._tp import TensorParallel
from .batch import RolloutBatch
from .config import ScopeConfig
from .topk import topk_reverse_kl, topk_reverse_kl_given

# Overflow guard only: exp() of a float32 log-ratio above ~88.7 is inf, which turns the masked
# branch of the clipped objective into 0 * inf = NaN gradients. Below it the objective is PPO's
# exactly; a negative-advantage token keeps its (unclipped) push-down up to ratios of e^80.
MAX_LOG_RATIO = 80.0
# GRPO: (r - mean) / (std + eps), as in the usual implementations.
GRPO_STD_EPS = 1e-6


@dataclass(frozen=True)
class PathLoss:
    """Per-rollout result of a policy path. losses: [B] differentiable token-mean losses (0 for
    rollouts off the path); kl: [B] detached token-mean KL estimate (None for GRPO);
    clipped_tokens / path_tokens: 0-d counts for the clip fraction (None without PPO clip)."""

    losses: torch.Tensor
    kl: Optional[torch.Tensor] = None
    clipped_tokens: Optional[torch.Tensor] = None
    path_tokens: Optional[torch.Tensor] = None


def ppo_clip_token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                          advantages: torch.Tensor, clip_eps: float):
    """PPO's clipped surrogate per token: max(-A r, -A clip(r, 1 - eps, 1 + eps)) with
    r = exp(logprobs - old_logprobs). All arguments have the same shape; old_logprobs and
    advantages are treated as constants. Returns (losses, clipped) where clipped (bool) marks the
    tokens whose clipped branch is active (no gradient)."""
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def k3_token_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) - d - 1 with d = log p_T(y) - log p_S(y): a non-negative per-token estimate
    of KL(student || teacher) under student samples; differentiable w.r.t. the student."""
    d = teacher_logprobs.detach() - student_logprobs
    return torch.expm1(d) - d


def opd_path_loss(config: ScopeConfig, batch: RolloutBatch, members: torch.Tensor, *,
                  student_logprobs: torch.Tensor, teacher_logprobs: Optional[torch.Tensor],
                  student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                  tp: TensorParallel, vocab_size: Optional[int],
                  kl_grad: Optional[torch.Tensor] = None) -> PathLoss:
    """The teacher path's per-rollout reverse-KL loss L_OPD(y_i) with config.kl_estimator, for
    the rollouts in `members` ([B] bool).

    student_logprobs: log p_S(y_t), shaped like batch.response_ids, differentiable.
    teacher_logprobs: log p_T(y_t) (same shape, detached); read only at the members' tokens.
      Required by "sampled", "k3" and "topk" (its normalizer; compute_loss derives it from the
      teacher logits).
    student_logits / teacher_logits: the vocabulary shards aligned with the response tokens
      ([B, L, V_local] padded, [N, V_local] packed); teacher logits for "full" and "topk".

    Per estimator, the per-token term averaged over the rollout's tokens:
      sampled: the PPO-clip surrogate with advantage A_t = log p_T(y_t) - log p_S_old(y_t) (the
        k1 reward). The rollout weight w_i >= 0 multiplies the whole surrogate in compute_loss,
        which equals using the advantage w_i * A_t of the spec (min(w a, w b) = w min(a, b)).
      k3: exp(d) - d - 1, d = log p_T(y_t) - log p_S(y_t).
      full: the exact full-vocabulary KL(p_S || p_T) (vocab_parallel_kl, direction="reverse";
        kl_grad, the gradient the loss will send to the per-token KL, lets it compute the KL and
        its gradient in one pass: its expected_grad).
      topk: the teacher's top-k ids plus a tail bucket (topk.topk_reverse_kl; from
        batch.teacher_top_ids / teacher_top_logprobs when there are no teacher logits).
    """
    tokens = batch.counted(members)
    zero = torch.zeros((), dtype=student_logprobs.dtype, device=student_logprobs.device)
    estimator = config.kl_estimator
    if teacher_logprobs is not None:
        # Rows without teacher log-probs may hold anything; they are not on the path.
        teacher_logprobs = torch.where(tokens, teacher_logprobs.detach().to(student_logprobs.dtype), zero)
    t_temp = config.resolved_teacher_temperature
    if estimator == "sampled":
        old = student_logprobs.detach() if config.old_logprobs == "recomputed" else batch.old_logprobs
        old = torch.where(tokens, old.to(student_logprobs.dtype), zero)
        losses, clipped = ppo_clip_token_losses(student_logprobs, old, teacher_logprobs - old,
                                                config.clip_eps)
        kl = (student_logprobs - teacher_logprobs).detach()
        return PathLoss(batch.token_mean(losses, tokens), batch.token_mean(kl, tokens),
                        (clipped & tokens).sum(), tokens.sum())
    if estimator == "k3":
        per_token = k3_token_kl(student_logprobs, teacher_logprobs)
    elif estimator == "full":
        per_token = vocab_parallel_kl(student_logits, teacher_logits, tp_group=tp.group,
                                      vocab_size=vocab_size, direction="reverse",
                                      student_temperature=config.student_temperature,
                                      teacher_temperature=t_temp, expected_grad=kl_grad)
    elif teacher_logits is None:  # a served teacher's top-k ids and log-probs (batch.teacher_top_*)
        top_ids, top_logprobs = _served_topk(batch, tokens, tp, vocab_size, student_logits.shape[-1],
                                             student_logprobs.dtype)
        per_token = topk_reverse_kl_given(student_logits, top_ids, top_logprobs,
                                          batch.safe_response_ids, student_logprobs, tp=tp,
                                          student_temperature=config.student_temperature)
    else:
        per_token = topk_reverse_kl(student_logits, teacher_logits, batch.safe_response_ids,
                                    student_logprobs, teacher_logprobs, k=config.topk_k, tp=tp,
                                    vocab_size=vocab_size,
                                    student_temperature=config.student_temperature,
                                    teacher_temperature=t_temp)
    losses = batch.token_mean(per_token, tokens)
    return PathLoss(losses, losses.detach())


def _served_topk(batch: RolloutBatch, tokens: torch.Tensor, tp: TensorParallel,
                 vocab_size: Optional[int], local_vocab: int, dtype: torch.dtype):
    """The served teacher's top-k ids and log-probs at the path's tokens, checked against the
    student's vocabulary; elsewhere (padding, rollouts off the path or without teacher scores,
    which may hold anything, NaN or -inf included) a finite stand-in that is never counted: a
    non-finite value there would turn the masked tokens' zero gradient into NaN."""
    ids, logprobs = batch.teacher_top_ids, batch.teacher_top_logprobs
    keep = tokens.unsqueeze(-1)
    vocab = tp.true_vocab("compute_loss", vocab_size, local_vocab)
    # RolloutBatch checked the entries of the scored rollouts (has_teacher_logprobs: ids >= 0,
    # finite log-probs <= 0); the path may read no other (compute_loss's _require_teacher ensures
    # it; a direct caller of opd_path_loss may not), and the ids' upper bound is checked here.
    unscored = tokens & ~batch.has_teacher_logprobs[batch.token_rollout]
    outside = (keep & (ids >= vocab)).any(-1)
    if bool((unscored | outside).any()):  # one host sync for both
        if bool(unscored.any()):
            r = int(batch.token_rollout.flatten()[torch.nonzero(unscored.flatten())[0]])
            kind = "correct" if bool(batch.correct[r]) else "incorrect"
            raise ValueError(
                f"opd_path_loss: rollout {r} (group {int(batch.group_ids[r])}, {kind}) is on the teacher "
                "path but has no served teacher scores (batch.has_teacher_logprobs is False): its "
                "teacher_top_ids / teacher_top_logprobs were never checked. Score every teacher-path "
                "rollout, or leave this one off the path.")
        bad = outside.flatten()
        idx = int(torch.nonzero(bad)[0])
        row = ids.reshape(-1, ids.shape[-1])[idx]
        raise ValueError(
            f"compute_loss: batch.teacher_top_ids at {batch.describe_token(idx)} holds ids "
            f"{row.tolist()[:8]}, outside the student's vocabulary [0, {vocab}) "
            f"({int(bad.sum())} such tokens). The served teacher must use the student's tokenizer "
            "(ids >= vocab_size are embedding padding); pass the true vocab_size.")
    k = ids.shape[-1]
    ids = torch.where(keep, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
    stand_in = torch.full((), -math.log(k + 1), dtype=dtype, device=logprobs.device)
    return ids, torch.where(keep, logprobs.detach().to(dtype), stand_in)


def grpo_advantages(batch: RolloutBatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + 1e-6) with r = batch.correct, the mean and the
    (Bessel-corrected) standard deviation taken over all rollouts of i's group. A group of one
    rollout has no baseline: its advantage is 0. [B], no gradient."""
    r = batch.correct.to(dtype)
    g = batch.group_ids.to(torch.int64)
    n = torch.zeros(batch.num_groups, dtype=dtype, device=r.device).index_add(0, g, torch.ones_like(r))
    mean = torch.zeros_like(n).index_add(0, g, r) / n
    centered = r - mean[g]
    var = torch.zeros_like(n).index_add(0, g, centered ** 2) / (n - 1).clamp(min=1)
    adv = centered / (var.sqrt()[g] + GRPO_STD_EPS)
    return torch.where(n[g] > 1, adv, torch.zeros_like(adv))


def grpo_path_loss(config: ScopeConfig, batch: RolloutBatch, members: torch.Tensor,
                   advantages: torch.Tensor, student_logprobs: torch.Tensor) -> PathLoss:
    """GRPO's per-rollout loss: the PPO-clip surrogate with the rollout's advantage on every
    token, averaged over its tokens (members: [B] bool, advantages: [B])."""
    tokens = batch.counted(members)
    zero = torch.zeros((), dtype=student_logprobs.dtype, device=student_logprobs.device)
    old = student_logprobs.detach() if config.old_logprobs == "recomputed" else batch.old_logprobs
    old = torch.where(tokens, old.to(student_logprobs.dtype), zero)
    losses, clipped = ppo_clip_token_losses(student_logprobs, old,
                                            batch.per_token(advantages.to(student_logprobs.dtype)),
                                            config.clip_eps)
    return PathLoss(batch.token_mean(losses, tokens), None, (clipped & tokens).sum(), tokens.sum())
