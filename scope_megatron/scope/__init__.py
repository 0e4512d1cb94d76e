"""SCOPE on-policy distillation (arXiv 2604.10688) and its baselines on plain tensors.

No Megatron and no rollout engine: the inputs are a RolloutBatch and the models' logit shards.
Every log-prob, KL, perplexity and weight goes through scope_megatron.ops, so the same code runs
tensor-parallel (pass tp_group, or let Megatron's default group apply).

  ScopeConfig                    validated configuration (docs/scope-config.md)
  RolloutBatch                   rollouts of prompt groups, validated on construction
  compute_loss(config, batch, student_logits, *, teacher_logits, tp_group, vocab_size)
                                 -> (loss, metrics)
  dual_path_weights, path_members, uniform_group_weights   SCOPE's routing and weights
  rollout_weights, RolloutWeights  every rollout's weights over whole groups, for compute_loss on
                                 micro-batches that split groups (compute_loss(weights=...));
                                 log_ppl_needs: which log perplexities those weights read
  opd_path_loss, grpo_path_loss, grpo_advantages, ppo_clip_token_losses, k3_token_kl,
  topk_reverse_kl                the path losses and estimators
  teacher_top_k                  a colocated teacher's top-k ids and log-probs (k values per token
                                 to keep instead of its logits)

Spec: docs/scope-algorithm.md (shared docs).
"""
from .algorithm import compute_loss, rollout_weights
from .batch import RolloutBatch
from .config import ScopeConfig
from .losses import (PathLoss, grpo_advantages, grpo_path_loss, k3_token_kl, opd_path_loss,
                     ppo_clip_token_losses)
from .topk import teacher_top_k, topk_reverse_kl
from .weights import (PathWeights, RolloutWeights, dual_path_weights, log_ppl_needs, path_members,
                      uniform_group_weights)

__all__ = [
    "ScopeConfig",
    "RolloutBatch",
    "compute_loss",
    "rollout_weights",
    "RolloutWeights",
    "log_ppl_needs",
    "PathWeights",
    "path_members",
    "dual_path_weights",
    "uniform_group_weights",
    "PathLoss",
    "opd_path_loss",
    "grpo_path_loss",
    "grpo_advantages",
    "ppo_clip_token_losses",
    "k3_token_kl",
    "topk_reverse_kl",
    "teacher_top_k",
]
