"""sequence_perplexity against the float64 reference: padded and packed layouts, gradients."""
import pytest
import torch

from scope_megatron.ops import sequence_perplexity
from scope_megatron.ops.reference import sequence_perplexity_reference


def _logprobs(shape, gen, dtype=torch.float64):
    return (-torch.rand(*shape, generator=gen, dtype=torch.float64) * 5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_padded_matches_reference(dtype, gen):
    batch, length = 7, 29
    values = _logprobs((batch, length), gen, dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length) < lengths.unsqueeze(1)
    out = sequence_perplexity(values, mask)
    ref = sequence_perplexity_reference(values.double(), mask)
    assert out.shape == (batch,)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), ref, **tol)


def test_long_float32_sequence_keeps_its_precision(gen):
    """4M float32 log-probs in one sequence (a packed long-context batch): the mean is as exact
    as float32 can hold it (a float32 running sum drifts by about 1e-4 relative here)."""
    values = _logprobs((1, 1 << 22), gen, torch.float32)
    out = sequence_perplexity(values)
    ref = sequence_perplexity_reference(values.double(), torch.ones_like(values, dtype=torch.bool))
    torch.testing.assert_close(out.double(), ref, rtol=2e-7, atol=0)


def test_padded_without_mask_is_plain_mean(gen):
    values = _logprobs((3, 11), gen)
    torch.testing.assert_close(sequence_perplexity(values), -values.mean(-1))


def test_packed_matches_reference_and_padded(gen):
    lengths = [5, 1, 17, 9]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    total = int(cu[-1])
    values = _logprobs((total + 3,), gen)  # trailing padding after the last sequence
    mask = torch.rand(total + 3, generator=gen) > 0.2
    for s, e in zip(cu[:-1], cu[1:]):
        mask[int(s)] = True  # every sequence keeps a token
    out = sequence_perplexity(values, mask, cu_seqlens=cu)
    torch.testing.assert_close(out, sequence_perplexity_reference(values, mask, cu_seqlens=cu))
    # [1, N] (Megatron's packed layout) gives the same
    out2 = sequence_perplexity(values.unsqueeze(0), mask.unsqueeze(0), cu_seqlens=cu.int())
    torch.testing.assert_close(out, out2)
    # same sequences padded
    padded = torch.zeros(len(lengths), max(lengths), dtype=values.dtype)
    pmask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for b, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        padded[b, : e - s] = values[s:e]
        pmask[b, : e - s] = mask[s:e]
    torch.testing.assert_close(out, sequence_perplexity(padded, pmask))


def test_gradient_is_masked_token_mean(gen):
    values = _logprobs((4, 9), gen).requires_grad_()
    mask = torch.rand(4, 9, generator=gen) > 0.3
    mask[:, 0] = True
    weights = torch.randn(4, dtype=torch.float64, generator=gen)
    (sequence_perplexity(values, mask) * weights).sum().backward()
    expected = -weights.unsqueeze(1) * mask / mask.sum(1, keepdim=True)
    torch.testing.assert_close(values.grad, expected)


def test_gradcheck_padded_and_packed(gen):
    values = _logprobs((3, 6), gen).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda v: sequence_perplexity(v, mask), (values,))
    packed = _logprobs((10,), gen).requires_grad_()
    cu = torch.tensor([0, 3, 4, 10])
    assert torch.autograd.gradcheck(lambda v: sequence_perplexity(v, cu_seqlens=cu), (packed,))


def test_empty_sequence_is_an_error(gen):
    values = _logprobs((3, 4), gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have no counted tokens"):
        sequence_perplexity(values, mask)
    with pytest.raises(ValueError, match="no counted tokens"):
        sequence_perplexity(_logprobs((6,), gen), cu_seqlens=torch.tensor([0, 3, 3, 6]))


def test_non_finite_logprobs_are_an_error(gen):
    values = _logprobs((2, 4), gen)
    values[1, 2] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"sequence\(s\) \[1\]"):
        sequence_perplexity(values)
    values[1, 2] = float("nan")
    with pytest.raises(FloatingPointError):
        sequence_perplexity(values)
    # a masked-out -inf does not count
    values[1, 2] = float("-inf")
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(sequence_perplexity(values, mask)).all()


@pytest.mark.parametrize("bad,match", [
    (dict(mask=torch.ones(2, 4)), "mask must be a bool tensor"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), "mask shape"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3])), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 9])), "end <="),
    (dict(cu_seqlens=torch.tensor([0.0, 2.0])), "integer"),
])
def test_bad_arguments(bad, match, gen):
    values = _logprobs((2, 4), gen)
    if "cu_seqlens" in bad:
        values = values.reshape(-1)
    with pytest.raises((ValueError, TypeError), match=match):
        sequence_perplexity(values, **bad)


def test_zero_length_padded_batch(gen):
    """[B, 0]: every sequence is empty, the documented ValueError (not a failure building the
    offsets); [0, L] and [0, 0]: no sequences, an empty result."""
    with pytest.raises(ValueError, match=r"sequence\(s\) \[0, 1\] have no counted tokens"):
        sequence_perplexity(_logprobs((2, 0), gen))
    assert sequence_perplexity(_logprobs((0, 5), gen)).shape == (0,)
    assert sequence_perplexity(_logprobs((0, 0), gen)).shape == (0,)
