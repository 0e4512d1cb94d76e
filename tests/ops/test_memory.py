"""No float32 [T, V] temporaries: the forward + backward of the logit ops needs about the
gradient (in the logits' dtype) beyond its inputs, where plain PyTorch needs several float32
copies of the logits."""
import gc

import pytest
import torch

from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob
from scope_megatron.ops.reference import kl_reference
from scope_megatron.utils.memory import PeakMemory

ROWS, VOCAB = 512, 32000  # bf16 logits: 31 MiB each; one float32 copy: 62.5 MiB


def _inputs():
    g = torch.Generator().manual_seed(0)
    student = torch.empty(ROWS, VOCAB, dtype=torch.bfloat16).normal_(generator=g).requires_grad_()
    teacher = torch.empty(ROWS, VOCAB, dtype=torch.bfloat16).normal_(generator=g)
    return student, teacher


def _extra(fn, student, teacher):
    fn(student, teacher)  # warm up the allocator and the kernels
    student.grad = None
    gc.collect()
    with PeakMemory("cpu") as peak:
        fn(student, teacher)
    student.grad = None
    return peak.extra_bytes


@pytest.mark.parametrize("name", ["kl", "logprob"])
def test_forward_backward_peak_is_about_the_gradient(name):
    student, teacher = _inputs()
    target = torch.randint(0, VOCAB, (ROWS,))
    grad_bytes = ROWS * VOCAB * 2
    fp32_copy = ROWS * VOCAB * 4

    def ours(s, t):
        out = vocab_parallel_kl(s, t) if name == "kl" else vocab_parallel_logprob(s, target)
        out.sum().backward()

    def eager(s, t):
        kl_reference(s, t).sum().backward()

    extra = _extra(ours, student, teacher)
    assert extra <= grad_bytes + 4 * 2**20, f"extra {extra / 2**20:.1f} MiB > gradient {grad_bytes / 2**20:.1f} MiB"
    # the measurement sees float32 temporaries when there are some
    assert _extra(eager, student, teacher) > 2 * fp32_copy
