"""SCOPE's dual-path routing and group-normalized perplexity weights.

Student path (MLE) over Omega_c, the correct rollouts of each group:
    w_i^stu = PPL_S(y_i)^(+1/tau) / sum_{j in Omega_c} PPL_S(y_j)^(+1/tau)
Teacher path (OPD) over Omega_w, the incorrect rollouts:
    w_i^tea = PPL_T(y_i)^(-1/tau) / sum_{j in Omega_w} PPL_T(y_j)^(-1/tau)
normalized per prompt group and per path ("sum": the weights of a group's path members sum to 1;
"mean": they average 1). Both computed by the group_normalized_weights op (a softmax of
+-log PPL / tau over the members), so they carry no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from scope_megatron.ops import group_normalized_weights

from .batch import RolloutBatch
from .config import ScopeConfig


@dataclass(frozen=True)
class PathWeights:
    """Per-rollout weights of the two paths ([B] each, 0 off the path, no gradient) and the
    path memberships ([B] bool)."""

    student: torch.Tensor
    teacher: torch.Tensor
    student_members: torch.Tensor
    teacher_members: torch.Tensor


@dataclass(frozen=True)
class RolloutWeights:
    """Every rollout's weights computed over whole prompt groups before the loss
    (algorithm.rollout_weights), so that compute_loss can take a batch holding only part of a
    group (a micro-batch of a step whose groups are split): [B] each, no gradient, 0 off a path.

    student: the weight of the rollout's L_MLE (SCOPE) or of its GRPO surrogate;
    teacher: the weight of its L_OPD (SCOPE, OPD); advantages: GRPO's group-normalized advantage
    (None otherwise)."""

    student: torch.Tensor
    teacher: torch.Tensor
    advantages: Optional[torch.Tensor] = None

    def select(self, rows: torch.Tensor) -> "RolloutWeights":
        """The weights of `rows` (an index or bool mask over the B rollouts), in that order."""
        return RolloutWeights(self.student[rows], self.teacher[rows],
                              None if self.advantages is None else self.advantages[rows])


def log_ppl_needs(config: ScopeConfig) -> Tuple[bool, bool]:
    """Whether the rollouts' weights read (log PPL_S, log PPL_T): SCOPE's weighted paths do;
    its uniform or absent paths, OPD and GRPO read neither (their weights count group members)."""
    scope = config.algorithm == "scope"
    return scope and config.student_path == "weighted", scope and config.teacher_path == "weighted"


def path_members(config: ScopeConfig, batch: RolloutBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(student-path members, teacher-path members), [B] bool each, for algorithm "scope" or
    "opd". Empty responses (allow_empty_responses) are on no path."""
    if config.algorithm == "grpo":
        raise ValueError("path_members: algorithm='grpo' has no student/teacher paths")
    none = torch.zeros_like(batch.nonempty)
    if config.algorithm == "opd" or not config.routing:
        return none, batch.nonempty.clone()
    student = batch.nonempty & batch.correct if config.student_path != "off" else none
    teacher = batch.nonempty & ~batch.correct if config.teacher_path != "off" else none
    return student, teacher


def dual_path_weights(config: ScopeConfig, batch: RolloutBatch,
                      student_log_ppl: Optional[torch.Tensor] = None,
                      teacher_log_ppl: Optional[torch.Tensor] = None) -> PathWeights:
    """SCOPE's weights for algorithm="scope".

    Args:
      student_log_ppl: [B] log PPL_S of each rollout (detached here); needed when
        student_path="weighted" and the path has members. Only the student-path members' values
        are read.
      teacher_log_ppl: [B] log PPL_T; needed when teacher_path="weighted" and the path has
        members. Only the teacher-path members' values are read (others may be anything, NaN
        included).

    Direction (paper): the student weight grows with PPL_S (sign +1), the teacher weight shrinks
    with PPL_T (sign -1); flip_*_direction inverts a path's sign. "uniform" gives every member of
    a group's path the same weight (1/|path| for "sum", 1 for "mean").
    Returns float32 weights, or float64 if a log-perplexity is float64.
    """
    if config.algorithm != "scope":
        raise ValueError(f"dual_path_weights: algorithm={config.algorithm!r}; SCOPE weights exist "
                         "for algorithm='scope' only (OPD and GRPO use uniform_group_weights)")
    student_members, teacher_members = path_members(config, batch)
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64
                                 for t in (student_log_ppl, teacher_log_ppl)) else torch.float32
    student = _path_weights(config, batch, "student_path", config.student_path, student_members,
                            student_log_ppl, -1 if config.flip_student_direction else +1, dtype)
    teacher = _path_weights(config, batch, "teacher_path", config.teacher_path, teacher_members,
                            teacher_log_ppl, +1 if config.flip_teacher_direction else -1, dtype)
    return PathWeights(student, teacher, student_members, teacher_members)


def _path_weights(config, batch, name, mode, members, log_ppl, sign, dtype):
    device = batch.group_ids.device
    if mode == "off":
        return torch.zeros(batch.num_rollouts, dtype=dtype, device=device)
    if mode == "uniform":
        # tau -> infinity of the weighted path: the same op on constant perplexities.
        log_ppl, sign, tau = torch.zeros(batch.num_rollouts, dtype=dtype, device=device), 1, 1.0
    else:
        if log_ppl is None:
            # A path with no member reads no perplexity (e.g. every rollout correct: no teacher
            # path, so none was scored). Tested only here, where the perplexity is missing, so
            # that the usual call does not wait for the device.
            if not bool(members.any()):
                return torch.zeros(batch.num_rollouts, dtype=dtype, device=device)
            raise ValueError(f"dual_path_weights: {name}='weighted' needs the "
                             f"{'student' if name == 'student_path' else 'teacher'} log perplexity")
        if tuple(log_ppl.shape) != (batch.num_rollouts,):
            raise ValueError(f"dual_path_weights: the {name} log perplexity must have shape "
                             f"[{batch.num_rollouts}], got {tuple(log_ppl.shape)}")
        tau = config.tau
        log_ppl = log_ppl.detach().to(dtype)
        log_ppl = torch.where(members, log_ppl, log_ppl.new_zeros(()))
    return group_normalized_weights(log_ppl, batch.group_ids, members, sign=sign, tau=tau,
                                    normalize=config.normalize)


def uniform_group_weights(batch: RolloutBatch, members: torch.Tensor, normalize: str,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The uniform rollout weights of the baselines: 1 / (members of the rollout's group) for
    "sum", 1 for "mean", 0 for non-members. [B], no gradient. Computed by counting (not through
    the weights op), so that OPD is an independent check of SCOPE's routing-off, uniform case."""
    if normalize not in ("sum", "mean"):
        raise ValueError(f"uniform_group_weights: normalize must be 'sum' or 'mean', got {normalize!r}")
    members_f = members.to(dtype)
    if normalize == "mean":
        return members_f
    counts = torch.zeros(batch.num_groups, dtype=dtype, device=members.device)
    counts = counts.index_add(0, batch.group_ids.to(torch.int64), members_f)
    return members_f / counts[batch.group_ids].clamp(min=1)
