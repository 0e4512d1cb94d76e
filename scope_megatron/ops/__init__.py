"""Vocab-parallel ops for SCOPE (public API).

Each op runs a C++ kernel on CPU tensors and a CUDA kernel on CUDA tensors (same contract), with
autograd and the tensor-parallel collectives in Python. Importing this module requires the
compiled extension (scope_megatron._C) and says how to build it if it is missing.

  vocab_parallel_logprob(logits, target, *, tp_group, vocab_size, temperature, error_check)
  vocab_parallel_kl(student_logits, teacher_logits, *, tp_group, vocab_size, direction,
                    student_temperature, teacher_temperature, expected_grad, error_check)
  sequence_perplexity(token_logprobs, mask=None, *, cu_seqlens=None)
  group_normalized_weights(log_ppl, group_ids, member_mask, *, sign, tau, normalize)

default_tp_group() is the group the ops use when tp_group is None (Megatron's tensor-model-
parallel group when its parallel state is initialized, else None): code built on the ops resolves
its default with it, so that the two never disagree.

Plain-PyTorch references of the same math: scope_megatron.ops.reference.
"""
from ._dist import default_tp_group
from .group_weights import group_normalized_weights
from .kl import vocab_parallel_kl
from .logprob import vocab_parallel_logprob
from .perplexity import sequence_perplexity

__all__ = [
    "vocab_parallel_logprob",
    "vocab_parallel_kl",
    "sequence_perplexity",
    "group_normalized_weights",
    "default_tp_group",
]
