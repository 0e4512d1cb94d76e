"""scope-megatron: SCOPE on-policy distillation for Megatron-core.

Subpackages (dependencies point one way: scope uses ops; neither knows Megatron):
  ops    vocab-parallel log-prob / KL / perplexity / group-weight ops (C++/CUDA kernels, autograd,
         tensor-parallel collectives)
  scope  the SCOPE algorithm and its baselines (OPD, GRPO) on plain tensors: RolloutBatch,
         ScopeConfig, compute_loss (docs/scope-config.md)
"""

__version__ = "0.1.0"
