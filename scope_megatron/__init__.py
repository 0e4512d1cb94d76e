r"""scope-megatron: SCOPE on-policy distillation for Megatron-core.

Subpackages (dependencies point one way: only `training` knows Megatron; it calls the others):
  ops      vocab-parallel log-prob / KL / perplexity / group-weight ops (C++/CUDA kernels,
           autograd, tensor-parallel collectives)
  scope    the SCOPE algorithm and its baselines (OPD, GRPO) on plain tensors: RolloutBatch,
           ScopeConfig, compute_loss (docs/scope-config.md)
  rollout  rollout engines (SamplingParams, Rollouts, LocalEngine)
  data     the embedded toy arithmetic world and its tokenizer; prompt / SFT batching
  rewards  verifiers (last \boxed{} answer) and pluggable reward functions
  eval     Avg@k, Pass@k (unbiased; bootstrap best@k option) and report writers
  utils    config files and flags, run logging (progress bar, JSONL, TensorBoard, plots)
"""

__version__ = "0.1.0"
