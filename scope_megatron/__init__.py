"""scope-megatron: SCOPE on-policy distillation for Megatron-core.

Subpackages:
  ops   vocab-parallel log-prob / KL / perplexity / group-weight ops (C++/CUDA kernels, autograd,
        tensor-parallel collectives)
"""

__version__ = "0.1.0"
