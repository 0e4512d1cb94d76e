"""Random SCOPE problems and an independent float64 reference of every loss, written from the
spec (docs/scope-algorithm.md) with plain loops over groups and rollouts and full-vocabulary
log-softmaxes: no ops, no vectorized routing, no shared code with scope_megatron.scope.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from scope_megatron.scope import RolloutBatch, ScopeConfig
from tests.helpers import random_logits


@dataclass
class Problem:
    """Padded tensors of a batch of rollouts with full-vocabulary logits [B, L, V_padded]."""

    ids: torch.Tensor
    mask: torch.Tensor
    group_ids: torch.Tensor
    correct: torch.Tensor
    student: torch.Tensor
    teacher: torch.Tensor
    vocab_size: int
    old_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor


def make_problem(gen: torch.Generator, *, group_sizes=(3, 1, 4, 2, 3), correct=None, length=6,
                 padded_vocab=48, pad=5, dtype=torch.float64, student_temperature=1.0,
                 teacher_temperature=1.0, old_noise=0.0, allow_empty=False) -> Problem:
    """Unequal groups; by default group 0 all correct, group 2 all wrong, the others mixed (the
    singleton group 1 correct). Old log-probs are the student's own at student_temperature
    (ratio 1), plus N(0, old_noise^2) noise; teacher log-probs at teacher_temperature."""
    b = sum(group_sizes)
    group_ids = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    if correct is None:
        correct = torch.rand(b, generator=gen) > 0.5
        correct[group_ids == 0] = True
        correct[group_ids == 1] = True
        correct[group_ids == 2] = False
        for g in range(3, len(group_sizes)):
            rows = torch.nonzero(group_ids == g).flatten()
            if len(rows) > 1:
                correct[rows[0]], correct[rows[1]] = True, False
    correct = torch.as_tensor(correct, dtype=torch.bool)
    lengths = torch.randint(0 if allow_empty else 1, length + 1, (b,), generator=gen)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    vocab_size = padded_vocab - pad
    ids = torch.randint(0, vocab_size, (b, length), generator=gen)
    student = random_logits((b, length, padded_vocab), dtype, gen, scale=2.0)
    teacher = random_logits((b, length, padded_vocab), dtype, gen, scale=2.0)
    old = token_logprobs(student, ids, vocab_size, student_temperature)
    if old_noise:
        old = old + old_noise * torch.randn(old.shape, generator=gen, dtype=torch.float64)
        old = old.clamp(max=0.0)
    return Problem(ids, mask, group_ids, correct, student, teacher, vocab_size, old,
                   token_logprobs(teacher, ids, vocab_size, teacher_temperature))


def fresh_leaf(t: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """A new leaf copy of t (never t itself: gradients must not accumulate across calls)."""
    return t.detach().to(dtype, copy=True).requires_grad_()


def token_logprobs(logits, ids, vocab_size, temperature):
    ls = (logits[..., :vocab_size].double() / temperature).log_softmax(-1)
    return ls.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def make_batch(p: Problem, *, packed=False, teacher_logprobs=False, has_teacher=None,
               allow_empty=False) -> RolloutBatch:
    tl = p.teacher_logprobs if teacher_logprobs else None
    if not packed:
        return RolloutBatch(p.ids, p.group_ids, p.correct, p.old_logprobs,
                            response_mask=p.mask, teacher_logprobs=tl,
                            has_teacher_logprobs=has_teacher, allow_empty_responses=allow_empty)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), p.mask.sum(-1).cumsum(0)])
    return RolloutBatch(p.ids[p.mask], p.group_ids, p.correct, p.old_logprobs[p.mask],
                        cu_seqlens=cu, teacher_logprobs=None if tl is None else tl[p.mask],
                        has_teacher_logprobs=has_teacher, allow_empty_responses=allow_empty)


def served_topk_batch(p: Problem, k: int, *, packed=False, teacher_temperature=1.0) -> RolloutBatch:
    """The batch a served teacher gives for the top-k estimator: its log-probs of the sampled
    tokens and its top-k ids / log-probs at every position (float64, from p.teacher over the real
    vocabulary at teacher_temperature), no logits."""
    lt = (p.teacher[..., :p.vocab_size].double() / teacher_temperature).log_softmax(-1)
    top_lp, top_ids = lt.topk(k, dim=-1)
    sel = (lambda t: t[p.mask]) if packed else (lambda t: t)
    kw = dict(teacher_logprobs=sel(p.teacher_logprobs), teacher_top_ids=sel(top_ids),
              teacher_top_logprobs=sel(top_lp))
    if packed:
        cu = torch.cat([torch.zeros(1, dtype=torch.long), p.mask.sum(-1).cumsum(0)])
        return RolloutBatch(p.ids[p.mask], p.group_ids, p.correct, p.old_logprobs[p.mask], cu_seqlens=cu, **kw)
    return RolloutBatch(p.ids, p.group_ids, p.correct, p.old_logprobs, response_mask=p.mask, **kw)


def layout(p: Problem, tensor: torch.Tensor, packed: bool) -> torch.Tensor:
    """[B, L, ...] -> the batch layout ([N, ...] packed)."""
    return tensor[p.mask] if packed else tensor


# ---- the reference ------------------------------------------------------------------------------

def reference_loss(config: ScopeConfig, p: Problem, student: torch.Tensor,
                   old_logprobs: Optional[torch.Tensor] = None) -> dict:
    """The spec's loss in float64 from full logits `student` [B, L, V_padded] (differentiable).

    Returns {"loss", "w_stu", "w_tea" ([B] float64), "mle", "kl" ([B], per rollout, detached),
    "clipped", "path_tokens"}."""
    old = p.old_logprobs if old_logprobs is None else old_logprobs
    ts, tt = config.student_temperature, config.resolved_teacher_temperature
    v = p.vocab_size
    ls = (student[..., :v].double() / ts).log_softmax(-1)
    lt = (p.teacher[..., :v].double() / tt).log_softmax(-1)
    lps = ls.gather(-1, p.ids.unsqueeze(-1)).squeeze(-1)
    lpt = lt.gather(-1, p.ids.unsqueeze(-1)).squeeze(-1)
    b = p.ids.shape[0]
    groups = int(p.group_ids.max()) + 1
    w_stu = torch.zeros(b, dtype=torch.float64)
    w_tea = torch.zeros(b, dtype=torch.float64)
    mle = torch.zeros(b, dtype=torch.float64)
    kl = torch.zeros(b, dtype=torch.float64)
    clipped = path_tokens = 0
    total = torch.zeros((), dtype=torch.float64)
    eps = config.clip_eps

    def ppo(i, adv):
        nonlocal clipped, path_tokens
        out = []
        for t in range(p.ids.shape[1]):
            if p.mask[i, t]:
                ratio = (lps[i, t] - old[i, t]).exp()
                a = adv if not torch.is_tensor(adv) or adv.dim() == 0 else adv[t]
                un, cl = -a * ratio, -a * ratio.clamp(1 - eps, 1 + eps)
                clipped += int(cl > un)
                path_tokens += 1
                out.append(torch.maximum(un, cl))
        return torch.stack(out).mean()

    def opd(i, w):
        toks = p.mask[i]
        est = config.kl_estimator
        if est == "full":
            per_tok = (ls[i].exp() * (ls[i] - lt[i])).sum(-1)
        elif est == "k3":
            d = lpt[i] - lps[i]
            per_tok = d.exp() - d - 1
        elif est == "topk":
            k = min(config.topk_k, v)
            top = p.teacher[i, :, :v].double().topk(k, dim=-1).indices
            ps, pt = ls[i].exp().gather(-1, top), lt[i].exp().gather(-1, top)
            tail_s, tail_t = 1 - ps.sum(-1), 1 - pt.sum(-1)
            per_tok = (ps * (ps.log() - pt.log())).sum(-1) + tail_s * (tail_s.log() - tail_t.log())
        else:  # sampled: the spec's advantage w * (log p_T - log p_S_old) inside PPO-clip
            kl[i] = (lps[i] - lpt[i])[toks].mean().detach()
            return ppo(i, w * (lpt[i] - old[i]))
        kl[i] = per_tok[toks].mean().detach()
        return w * per_tok[toks].mean()

    def path_weights(rows, log_ppl, sign, mode):
        if not rows:
            return []
        if mode == "uniform":
            w = torch.full((len(rows),), 1.0 / len(rows), dtype=torch.float64)
        else:
            powered = torch.stack([log_ppl[i].exp() ** (sign / config.tau) for i in rows])
            w = powered / powered.sum()
        return list(w * len(rows) if config.normalize == "mean" else w)

    log_ppl_s = torch.stack([-lps[i][p.mask[i]].mean() if p.mask[i].any()
                             else torch.zeros((), dtype=torch.float64) for i in range(b)])
    log_ppl_t = torch.stack([-lpt[i][p.mask[i]].mean() if p.mask[i].any()
                             else torch.zeros((), dtype=torch.float64) for i in range(b)])
    for g in range(groups):
        rows = [i for i in range(b) if int(p.group_ids[i]) == g]
        live = [i for i in rows if p.mask[i].any()]
        if config.algorithm == "grpo":
            r = torch.tensor([float(p.correct[i]) for i in rows], dtype=torch.float64)
            if len(rows) > 1:
                adv = dict(zip(rows, ((r - r.mean()) / (r.std() + 1e-6)).tolist()))
            else:
                adv = {rows[0]: 0.0}
            for i in live:
                u = 1.0 if config.normalize == "mean" else 1.0 / len(live)
                total = total + u * ppo(i, torch.tensor(adv[i], dtype=torch.float64))
            continue
        if config.algorithm == "opd" or not config.routing:
            stu, tea = [], live
        else:
            stu = [i for i in live if p.correct[i]] if config.student_path != "off" else []
            tea = [i for i in live if not p.correct[i]] if config.teacher_path != "off" else []
        s_sign = -1 if config.flip_student_direction else 1
        t_sign = 1 if config.flip_teacher_direction else -1
        ws = path_weights(stu, log_ppl_s.detach(), s_sign,
                          "uniform" if config.algorithm != "scope" else config.student_path)
        wt = path_weights(tea, log_ppl_t, t_sign,
                          "uniform" if config.algorithm != "scope" else config.teacher_path)
        for i, w in zip(stu, ws):
            w_stu[i] = w
            mle[i] = log_ppl_s[i].detach()
            total = total + w * log_ppl_s[i]
        for i, w in zip(tea, wt):
            w_tea[i] = w
            total = total + opd(i, w)
    return dict(loss=total / groups, w_stu=w_stu, w_tea=w_tea, mle=mle, kl=kl, clipped=clipped,
                path_tokens=path_tokens, lps=lps, lpt=lpt, groups=groups)


def sampled_kl_policy_gradient_loss(p: Problem, student: torch.Tensor, weights: torch.Tensor,
                                    teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """sum_i w_i mean_t sg(log p_S(y_t) - log p_T(y_t)) log p_S(y_t) / #groups: its gradient is
    the weighted policy gradient of the sampled-token reverse KL (temperature 1)."""
    lps = student[..., :p.vocab_size].double().log_softmax(-1).gather(-1, p.ids.unsqueeze(-1)).squeeze(-1)
    score = (lps - teacher_logprobs).detach() * lps
    per_rollout = (score * p.mask).sum(-1) / p.mask.sum(-1)
    return (weights * per_rollout).sum() / (int(p.group_ids.max()) + 1)
