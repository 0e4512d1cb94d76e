"""The metrics returned with every loss: a flat dict of Python floats, computed from detached,
TP-replicated tensors (so identical on every rank) and moved to the host together at the end.

Keys (a mean over an empty set is left out rather than reported as a made-up number):
  loss                              the loss value
  rollouts/total, rollouts/empty    rollouts in the batch; of them with no counted token
  rollouts/student_path             members of the student (MLE) path
  rollouts/teacher_path             members of the teacher (OPD) path (every rollout for OPD)
  groups/total, groups/all_correct, groups/all_wrong
  reward/mean                       fraction of correct rollouts
  {path}/ppl_student, {path}/ppl_teacher   mean PPL_S / PPL_T of the path's members
                                    (ppl_teacher only where every member has teacher log-probs)
  {path}/weight_entropy             mean over groups with members of the entropy of the path's
                                    weights rescaled to sum 1 in the group (uniform: log n)
  {path}/weight_max                 largest weight on the path, in the configured scale
  mle/mean                          mean over student-path rollouts of L_MLE (token-mean NLL)
  kl/mean                           mean over teacher-path rollouts of the token-mean KL estimate
                                    (sampled: k1 = log p_S - log p_T; k3; full; topk)
  clip_fraction                     "sampled" and GRPO: share of path tokens whose PPO ratio is
                                    clipped
  grpo/advantage_abs_mean           GRPO: mean |A_i| over its rollouts
  logprob_diff/mean, logprob_diff/max   |log p_S (this forward, at old_logprobs' temperature)
                                    - old_logprobs (rollout engine)|
                                    over counted tokens: ~0 when the engine and the trainer
                                    agree (same weights and temperature)
{path} is student_path or teacher_path.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from .batch import RolloutBatch
from .losses import PathLoss


def collect_metrics(
    batch: RolloutBatch,
    *,
    loss: torch.Tensor,
    student_logprobs: torch.Tensor,
    student_log_ppl: torch.Tensor,
    teacher_log_ppl: Optional[torch.Tensor] = None,
    teacher_rows: Optional[torch.Tensor] = None,
    student_members: Optional[torch.Tensor] = None,
    student_weights: Optional[torch.Tensor] = None,
    teacher_members: Optional[torch.Tensor] = None,
    teacher_weights: Optional[torch.Tensor] = None,
    teacher_path: Optional[PathLoss] = None,
    policy_path: Optional[PathLoss] = None,
    advantages: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """Builds the metric dict (see the module docstring). Members are [B] bool, weights [B],
    log perplexities [B]; teacher_rows [B] bool marks the rollouts with teacher log-probs."""
    def f64(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(torch.float64)

    out: Dict[str, Union[float, torch.Tensor]] = {}
    out["loss"] = f64(loss)
    none = torch.zeros_like(batch.nonempty)
    student_members = none if student_members is None else student_members
    teacher_members = none if teacher_members is None else teacher_members
    out["rollouts/total"] = float(batch.num_rollouts)
    out["rollouts/empty"] = f64((~batch.nonempty).sum())
    out["rollouts/student_path"] = f64(student_members.sum())
    out["rollouts/teacher_path"] = f64(teacher_members.sum())

    out.update(_group_metrics(batch, student_members, student_weights, teacher_members, teacher_weights))
    out["reward/mean"] = f64(batch.correct.to(torch.float64).mean())
    ppl_s = f64(student_log_ppl).exp()
    for path, members in (("student_path", student_members), ("teacher_path", teacher_members)):
        if bool(members.any()):
            out[f"{path}/ppl_student"] = ppl_s[members].mean()
            if teacher_log_ppl is not None and bool(teacher_rows[members].all()):
                out[f"{path}/ppl_teacher"] = f64(teacher_log_ppl)[members].exp().mean()
    if bool(student_members.any()):
        out["mle/mean"] = f64(student_log_ppl)[student_members].mean()
    if teacher_path is not None and bool(teacher_members.any()):
        out["kl/mean"] = f64(teacher_path.kl)[teacher_members].mean()
    for path in (teacher_path, policy_path):
        if path is not None and path.path_tokens is not None and int(path.path_tokens) > 0:
            out["clip_fraction"] = f64(path.clipped_tokens) / f64(path.path_tokens)
    if advantages is not None and bool(batch.nonempty.any()):
        out["grpo/advantage_abs_mean"] = f64(advantages)[batch.nonempty].abs().mean()

    counted = batch.response_mask
    if bool(counted.any()):
        diff = (f64(student_logprobs) - f64(batch.old_logprobs)).abs()[counted]
        out["logprob_diff/mean"] = diff.mean()
        out["logprob_diff/max"] = diff.max()
    return _as_floats(out)


def _as_floats(out: Dict[str, Union[float, torch.Tensor]]) -> Dict[str, float]:
    """`out` with its tensor values as Python floats, moved to the host together (one sync)."""
    keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
    if keys:
        out.update(zip(keys, torch.stack([out[k].reshape(()) for k in keys]).cpu().tolist()))
    return out


def is_group_metric(key: str) -> bool:
    """Whether a metric describes whole prompt groups (groups/*, {path}/weight_*): what a batch
    holding part of some groups gets wrong, and group_metrics gives."""
    return key.startswith("groups/") or "/weight_" in key


def group_metrics(batch: RolloutBatch, *, student_members: Optional[torch.Tensor] = None,
                  student_weights: Optional[torch.Tensor] = None, teacher_members: Optional[torch.Tensor] = None,
                  teacher_weights: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """The group metrics (is_group_metric) of collect_metrics for whole groups, from the rollouts'
    path memberships and weights alone (no logits): what a caller that splits the groups over
    micro-batches reports for the step. Arguments as collect_metrics'."""
    return _as_floats(_group_metrics(batch, student_members, student_weights, teacher_members, teacher_weights))


def _group_metrics(batch, student_members, student_weights, teacher_members,
                   teacher_weights) -> Dict[str, Union[float, torch.Tensor]]:
    def f64(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(torch.float64)

    none = torch.zeros_like(batch.nonempty)
    student_members = none if student_members is None else student_members
    teacher_members = none if teacher_members is None else teacher_members
    out: Dict[str, Union[float, torch.Tensor]] = {}
    g = batch.group_ids.to(torch.int64)
    size = torch.bincount(g, minlength=batch.num_groups)
    n_correct = torch.bincount(g, weights=batch.correct.to(torch.float64), minlength=batch.num_groups)
    out["groups/total"] = float(batch.num_groups)
    out["groups/all_correct"] = f64((n_correct == size).sum())
    out["groups/all_wrong"] = f64((n_correct == 0).sum())
    for path, members, weights in (("student_path", student_members, student_weights),
                                   ("teacher_path", teacher_members, teacher_weights)):
        if weights is not None and bool(members.any()):
            out[f"{path}/weight_entropy"] = _mean_group_entropy(batch, members, f64(weights))
            out[f"{path}/weight_max"] = f64(weights)[members].max()
    return out


def _mean_group_entropy(batch: RolloutBatch, members: torch.Tensor, weights: torch.Tensor):
    g = batch.group_ids.to(torch.int64)
    w = torch.where(members, weights, torch.zeros_like(weights))
    total = torch.zeros(batch.num_groups, dtype=w.dtype, device=w.device).index_add(0, g, w)
    p = w / total[g].clamp(min=torch.finfo(w.dtype).tiny)
    terms = torch.where(p > 0, -p * p.clamp(min=torch.finfo(w.dtype).tiny).log(), torch.zeros_like(p))
    entropy = torch.zeros_like(total).index_add(0, g, terms)
    has = torch.zeros_like(total).index_add(0, g, members.to(w.dtype)) > 0
    return entropy[has].mean()
