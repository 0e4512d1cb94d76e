"""Bad input to the logit ops gets a clear error naming the problem and the fix; never a NaN."""
import pytest
import torch

from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob


def _pair(rows=4, vocab=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, vocab, generator=g).to(dtype), torch.randn(rows, vocab, generator=g).to(dtype)


@pytest.mark.parametrize("make,exc,match", [
    (lambda s, t: (s, t[:, :40]), ValueError, "must have the same shape"),
    (lambda s, t: (s, t[:3]), ValueError, "must have the same shape"),
    (lambda s, t: (s, t.bfloat16()), TypeError, "must have the same dtype"),
    (lambda s, t: (s, t.to("meta")), ValueError, "meta"),
    (lambda s, t: (s.long(), t.long()), TypeError, "must be float32, bfloat16, float16 or float64"),
    (lambda s, t: (s[:, :0], t[:, :0]), ValueError, "non-empty last dimension"),
])
def test_kl_mismatched_inputs(make, exc, match):
    s, t = make(*_pair())
    with pytest.raises(exc, match=match):
        vocab_parallel_kl(s, t)


@pytest.mark.parametrize("kwargs,match", [
    (dict(direction="both"), "direction must be one of"),
    (dict(student_temperature=0.0), "student_temperature must be a finite number > 0"),
    (dict(teacher_temperature=float("nan")), "teacher_temperature must be"),
    (dict(vocab_size=51), "vocab_size=51 is larger than the sharded vocabulary 50"),
    (dict(vocab_size=0), "vocab_size must be > 0"),
])
def test_kl_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vocab_parallel_kl(*_pair(), **kwargs)


@pytest.mark.parametrize("which,name", [(0, "student logits"), (1, "teacher logits")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_non_finite_logits(which, name, value, dtype):
    pair = list(_pair(rows=5, vocab=3000, dtype=dtype))
    pair[which][3, 2047] = value
    with pytest.raises(FloatingPointError, match=f"{name} contain NaN or Inf in 1 of 5 tokens "
                                                  r"\(first: flattened token 3\)"):
        vocab_parallel_kl(*pair)


def test_non_finite_padding_columns_are_ignored():
    s, t = _pair()
    s[:, 45:] = float("nan")
    t[:, 45:] = float("-inf")
    assert torch.isfinite(vocab_parallel_kl(s, t, vocab_size=45)).all()


def test_logprob_targets_out_of_range():
    logits, _ = _pair()
    target = torch.tensor([0, 49, 3, 2])
    with pytest.raises(ValueError, match=r"target ids must be in \[0, vocab_size=40\); 1 of 4 tokens "
                                         r"are outside it \(first: flattened token 1, target 49\)"):
        vocab_parallel_logprob(logits, target, vocab_size=40)
    with pytest.raises(ValueError, match="target -100"):
        vocab_parallel_logprob(logits, torch.tensor([0, 1, -100, 2]))


@pytest.mark.parametrize("target,exc,match", [
    (torch.zeros(4), TypeError, "target must be an integer tensor"),
    (torch.zeros(4, dtype=torch.bool), TypeError, "target must be an integer tensor"),
    (torch.zeros(5, dtype=torch.long), ValueError, r"target shape \(5,\) must equal"),
])
def test_logprob_bad_target(target, exc, match):
    with pytest.raises(exc, match=match):
        vocab_parallel_logprob(_pair()[0], target)


def test_logprob_non_finite_logits():
    logits, _ = _pair()
    logits[2, 7] = float("nan")
    with pytest.raises(FloatingPointError, match="logits contain NaN or Inf in 1 of 4 tokens"):
        vocab_parallel_logprob(logits, torch.zeros(4, dtype=torch.long))


def test_logprob_bad_options():
    logits, _ = _pair()
    target = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        vocab_parallel_logprob(logits, target, temperature=-1.0)
    with pytest.raises(ValueError, match="larger than the sharded vocabulary"):
        vocab_parallel_logprob(logits, target, vocab_size=100)


def test_tp_group_without_distributed():
    with pytest.raises((RuntimeError, ValueError)):
        vocab_parallel_kl(*_pair(), tp_group=object())


def test_raw_ops_check_their_inputs():
    """The torch.ops entry points guard against direct misuse too (no out-of-bounds reads)."""
    s, t = _pair()
    ops = torch.ops.scope_megatron
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ops.kl_partial(s[0], t[0], 0, 50, 1.0, 1.0, True)
    with pytest.raises(RuntimeError, match="target must have shape"):
        ops.logprob_partial(s, torch.zeros(3, dtype=torch.long), 0, 50, 1.0)
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        ops.sequence_logppl(torch.zeros(4), None, torch.tensor([0, 3, 1]))
    with pytest.raises(RuntimeError, match=r"group_index\[1\] = 5 is outside"):
        ops.group_weights(torch.zeros(2), torch.tensor([0, 5]), torch.ones(2, dtype=torch.bool),
                          2, 1.0, False)


def test_kl_backward_fixup_checks_its_inputs():
    s, t = _pair()
    ops = torch.ops.scope_megatron
    w = torch.ones(4)
    _, row_stats, _, grad = ops.kl_fused(s, t, w, 50, 1.0, 1.0, True)
    args = (s, t, row_stats, 0, 50, 1.0, 1.0, True)
    with pytest.raises(RuntimeError, match=r"expected must have shape \[4\]"):
        ops.kl_backward_fixup(grad, w, torch.ones(3), *args)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[4\]"):
        ops.kl_backward_fixup(grad, torch.ones(5), w, *args)
    with pytest.raises(RuntimeError, match="grad must be a contiguous tensor of the student logits' shape"):
        ops.kl_backward_fixup(grad[:, :40], w, w, *args)
    with pytest.raises(RuntimeError, match="grad must be a contiguous tensor"):
        ops.kl_backward_fixup(grad.double(), w, w, *args)
