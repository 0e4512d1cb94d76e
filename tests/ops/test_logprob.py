"""vocab_parallel_logprob on a single shard (TP=1) against the float64 reference."""
import pytest
import torch

from scope_megatron.ops import vocab_parallel_logprob
from scope_megatron.ops.reference import logprob_reference
from tests.helpers import assert_grad_close, random_logits, value_tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _check(logits, target, *, vocab_size=None, temperature=1.0):
    dtype = logits.dtype
    leaf = logits.detach().clone().requires_grad_()
    out = vocab_parallel_logprob(leaf, target, vocab_size=vocab_size, temperature=temperature)
    assert out.shape == logits.shape[:-1]
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    ref_leaf = logits.detach().double().requires_grad_()
    ref = logprob_reference(ref_leaf, target, vocab_size=vocab_size, temperature=temperature)
    torch.testing.assert_close(out.double(), ref, **value_tolerance(dtype))

    weights = torch.randn(out.shape, dtype=torch.float64)
    (out * weights.to(out.dtype)).sum().backward()
    (ref * weights).sum().backward()
    assert leaf.grad.dtype == dtype and leaf.grad.shape == logits.shape
    assert_grad_close(leaf.grad, ref_leaf.grad, dtype)
    if vocab_size is not None:
        assert bool((leaf.grad[..., vocab_size:] == 0).all()), "padding columns must get zero gradient"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (7, 131), (33, 1000), (5, 2500)])
def test_matches_reference(dtype, rows, vocab, gen):
    logits = random_logits((rows, vocab), dtype, gen)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    _check(logits, target)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_vocab_and_temperature(dtype, gen):
    rows, vocab, true_vocab = 19, 2177, 2177 - 300  # padding spans a whole 1024-column chunk
    logits = random_logits((rows, vocab), dtype, gen)
    target = torch.randint(0, true_vocab, (rows,), generator=gen)
    _check(logits, target, vocab_size=true_vocab, temperature=0.6)


@pytest.mark.parametrize("kind", ["extreme", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extreme_logits(kind, dtype, gen):
    rows, vocab = 9, 1500
    logits = random_logits((rows, vocab), dtype, gen, kind=kind)
    # half of the targets at each row's argmax, half elsewhere (log-prob ~ -2e4)
    target = torch.where(torch.arange(rows) % 2 == 0, logits.double().argmax(-1),
                         torch.randint(0, vocab, (rows,), generator=gen))
    _check(logits, target, temperature=0.7)


def test_megatron_layout_and_strided_rows(gen):
    """[s, b, V] input, and a view whose rows are strided (no copy needed)."""
    s, b, vocab = 5, 3, 300
    logits = random_logits((s, b, vocab), torch.float32, gen)
    target = torch.randint(0, vocab, (s, b), generator=gen)
    _check(logits, target)
    wide = random_logits((11, vocab + 57), torch.float32, gen)
    view = wide[:, :vocab]
    assert not view.is_contiguous()
    _check(view, torch.randint(0, vocab, (11,), generator=gen))


def test_int32_targets(gen):
    logits = random_logits((4, 50), torch.float32, gen)
    target = torch.randint(0, 50, (4,), generator=gen)
    a = vocab_parallel_logprob(logits, target)
    b = vocab_parallel_logprob(logits, target.int())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradcheck(gen):
    logits = random_logits((4, 37), torch.float64, gen).requires_grad_()
    target = torch.randint(0, 30, (4,), generator=gen)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprob(x, target, vocab_size=30, temperature=0.8), (logits,))


def test_logprobs_never_positive(gen):
    """Fused log-probs > 0 have collapsed rewards elsewhere: with a peaked distribution in bf16
    the chosen token's log-prob must stay <= 0."""
    logits = random_logits((64, 4096), torch.bfloat16, gen, kind="peaked")
    target = logits.float().argmax(-1)
    assert bool((vocab_parallel_logprob(logits, target) <= 0).all())


def test_broadcast_rows(gen):
    """One row of logits expanded over several targets (stride 0 rows): scored like the copies."""
    row = random_logits((1, 200), torch.float32, gen).requires_grad_()
    target = torch.randint(0, 200, (6,), generator=gen)
    out = vocab_parallel_logprob(row.expand(6, 200), target)
    out.sum().backward()
    ref_leaf = row.detach().double().requires_grad_()
    ref = logprob_reference(ref_leaf.expand(6, 200), target)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-6)
