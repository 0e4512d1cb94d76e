"""ScopeConfig: the validated configuration of the SCOPE loss and its baselines.

Every field has one documented default (docs/scope-config.md). Construction fails early, naming
the field and the fix, for an invalid value, an incompatible combination, or a field set away
from its default where it has no effect (a silent no-op in an ablation is a wrong experiment).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from scope_megatron.utils.config_io import option

ALGORITHMS = ("scope", "opd", "grpo")
PATH_MODES = ("weighted", "uniform", "off")
NORMALIZATIONS = ("sum", "mean")
KL_ESTIMATORS = ("sampled", "k3", "full", "topk")
OLD_LOGPROBS = ("rollout", "recomputed")


@dataclass(frozen=True)
class ScopeConfig:
    """Configuration of compute_loss (see docs/scope-config.md for the full description).

    algorithm: "scope" (dual-path SCOPE), "opd" (distillation on every rollout, uniform weights),
      "grpo" (group-normalized outcome advantage with PPO clip, no teacher).
    routing: SCOPE sends correct rollouts to the student (MLE) path and incorrect ones to the
      teacher (OPD) path; False sends every rollout to the teacher path (needs student_path="off").
    student_path / teacher_path: "weighted" (PPL weights), "uniform", or "off".
    flip_student_direction / flip_teacher_direction: invert the paper's direction of a path's
      weights (paper: student weight grows with PPL_S, teacher weight shrinks with PPL_T).
    tau: weight temperature (> 0); weights are PPL^(+-1/tau) normalized per group and path.
    normalize: "sum" (a path's weights sum to 1 per group: the paper) or "mean" (they average 1:
      the reference code). Also scales the uniform rollout weights of OPD and GRPO.
    kl_estimator: per-token reverse-KL estimator of the teacher path: "sampled", "k3", "full",
      "topk". "full" and "topk" need teacher logits (a colocated teacher).
    topk_k: number of teacher top ids for "topk" (capped at the vocabulary size); a served
      teacher's top-k (batch.teacher_top_ids) must have exactly this many.
    fused_kl: with "full" and no tensor parallelism, predict the gradient the loss sends to the
      per-token KL and compute KL and gradient in one pass (vocab_parallel_kl's expected_grad).
      Same result; off by default (on an H100 the two-pass kernels measured faster so far).
    clip_eps: PPO clip range of the "sampled" estimator and of GRPO.
    old_logprobs: the behaviour policy log pi_S_old of the PPO ratio: "rollout" (the rollout
      engine's log-probs in the batch) or "recomputed" (this forward's log-probs, detached: one
      update per batch, ratio 1).
    student_temperature: softmax temperature of every student log-prob (token log-probs, PPL_S,
      KL, top-k); the rollout engine's log-probs must be computed at the same temperature.
    teacher_temperature: likewise for every teacher log-prob; None = student_temperature.
    """

    algorithm: str = option("scope", flag="--algorithm", help=(
        "'scope' (dual-path SCOPE), 'opd' (distillation on every rollout, uniform weights), "
        "'grpo' (group-normalized outcome advantage with PPO clip, no teacher)"))
    routing: bool = option(True, help=(
        "scope: correct rollouts to the MLE path, incorrect ones to the distillation path; "
        "False sends every rollout to the distillation path (needs student_path='off')"))
    student_path: str = option("weighted", help="scope: MLE path on the correct rollouts: "
                               "'weighted' (PPL_S^(+1/tau)), 'uniform' or 'off'")
    teacher_path: str = option("weighted", help="scope: distillation path on the incorrect "
                               "rollouts: 'weighted' (PPL_T^(-1/tau)), 'uniform' or 'off'")
    flip_student_direction: bool = option(False, help="invert the paper's direction of the "
                                          "student-path weights (favour confident correct rollouts)")
    flip_teacher_direction: bool = option(False, help="invert the paper's direction of the "
                                          "teacher-path weights")
    tau: float = option(1.0, help="weight temperature (> 0); weights are PPL^(+-1/tau) "
                        "normalized per prompt group and path")
    normalize: str = option("sum", help="'sum': a path's weights sum to 1 per group (paper); "
                            "'mean': they average 1 (reference code)")
    kl_estimator: str = option("full", help="per-token reverse-KL estimator of the distillation "
                               "path: 'full', 'topk' (need teacher logits), 'k3', 'sampled'")
    topk_k: int = option(64, help="teacher top ids of the 'topk' estimator")
    fused_kl: bool = option(False, help="'full' estimator without tensor parallelism: compute the "
                            "KL and its gradient in one fused pass in the forward (see "
                            "benchmarks/NOTES.md for when it is faster)")
    clip_eps: float = option(0.2, help="PPO clip range of 'sampled' and GRPO")
    old_logprobs: str = option("rollout", help="behaviour policy of the PPO ratio: 'rollout' "
                               "(the engine's log-probs) or 'recomputed'")
    student_temperature: float = option(1.0, help="softmax temperature of every student log-prob "
                                        "(the rollout engine's log-probs must use the same)")
    teacher_temperature: Optional[float] = option(None, help="softmax temperature of every "
                                                  "teacher log-prob; null = student_temperature")

    def __post_init__(self):
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("student_path", self.student_path, PATH_MODES)
        _choice("teacher_path", self.teacher_path, PATH_MODES)
        _choice("normalize", self.normalize, NORMALIZATIONS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("old_logprobs", self.old_logprobs, OLD_LOGPROBS)
        for name in ("routing", "flip_student_direction", "flip_teacher_direction", "fused_kl"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ScopeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _positive("tau", self.tau)
        _positive("student_temperature", self.student_temperature)
        if self.teacher_temperature is not None:
            _positive("teacher_temperature", self.teacher_temperature)
        if not (isinstance(self.clip_eps, (int, float)) and 0 < self.clip_eps < 1):
            raise ValueError(f"ScopeConfig.clip_eps must be in (0, 1) (the ratio is clipped to "
                             f"[1 - clip_eps, 1 + clip_eps]), got {self.clip_eps!r}")
        if isinstance(self.topk_k, bool) or not isinstance(self.topk_k, int) or self.topk_k < 1:
            raise ValueError(f"ScopeConfig.topk_k must be an integer >= 1, got {self.topk_k!r}")
        if self.algorithm == "scope":
            if self.student_path == "off" and self.teacher_path == "off":
                raise ValueError("ScopeConfig: student_path and teacher_path are both 'off', so the "
                                 "loss has no term; turn one path on")
            if not self.routing and self.student_path != "off":
                raise ValueError("ScopeConfig: routing=False sends every rollout to the teacher "
                                 "path, so the student (MLE) path has no members; set "
                                 "student_path='off'")
            if not self.routing and self.teacher_path == "off":
                raise ValueError("ScopeConfig: routing=False needs teacher_path='uniform' or "
                                 "'weighted' (every rollout goes to the teacher path)")
        unused = [f for f in dataclasses.fields(self)
                  if f.name not in self.effective_fields() and getattr(self, f.name) != f.default]
        if unused:
            f = unused[0]
            raise ValueError(
                f"ScopeConfig.{f.name}={getattr(self, f.name)!r} has no effect with "
                f"{self._describe()}; leave it at its default ({f.default!r}) or change the "
                "setting it depends on (docs/scope-config.md)")

    @property
    def resolved_teacher_temperature(self) -> float:
        """The temperature of every teacher log-prob."""
        return self.student_temperature if self.teacher_temperature is None else self.teacher_temperature

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss has a teacher (distillation) term."""
        return self.algorithm == "opd" or (self.algorithm == "scope" and self.teacher_path != "off")

    def effective_fields(self) -> frozenset:
        """The fields that change the loss under this configuration."""
        fields = {"algorithm", "normalize", "student_temperature"}
        if self.algorithm == "grpo":
            return frozenset(fields | {"clip_eps", "old_logprobs"})
        if self.algorithm == "scope":
            fields |= {"routing", "student_path", "teacher_path"}
            if self.student_path == "weighted":
                fields |= {"flip_student_direction", "tau"}
            if self.teacher_path == "weighted":
                fields |= {"flip_teacher_direction", "tau"}
        if self.uses_teacher:
            fields |= {"kl_estimator", "teacher_temperature"}
            if self.kl_estimator == "sampled":
                fields |= {"clip_eps", "old_logprobs"}
            elif self.kl_estimator == "topk":
                fields.add("topk_k")
            elif self.kl_estimator == "full":
                fields.add("fused_kl")
        return frozenset(fields)

    def _describe(self) -> str:
        if self.algorithm != "scope":
            extra = "" if self.algorithm == "grpo" else f", kl_estimator={self.kl_estimator!r}"
            return f"algorithm={self.algorithm!r}{extra}"
        return (f"algorithm='scope', student_path={self.student_path!r}, "
                f"teacher_path={self.teacher_path!r}, kl_estimator={self.kl_estimator!r}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"ScopeConfig.{name} must be one of {choices}, got {value!r}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"ScopeConfig.{name} must be a finite number > 0, got {value!r}")
