"""vocab_parallel_kl on a single shard (TP=1) against the float64 reference."""
import pytest
import torch

from scope_megatron.ops import vocab_parallel_kl
from scope_megatron.ops.reference import kl_reference
from tests.helpers import assert_grad_close, random_logits, value_tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _check(student, teacher, **kw):
    dtype = student.dtype
    logits_scale = max(student.double().abs().max(), teacher.double().abs().max())
    leaf = student.detach().clone().requires_grad_()
    teacher_leaf = teacher.detach().clone().requires_grad_()
    out = vocab_parallel_kl(leaf, teacher_leaf, **kw)
    assert out.shape == student.shape[:-1]
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    ref_leaf = student.detach().double().requires_grad_()
    ref = kl_reference(ref_leaf, teacher.double(), **kw)
    torch.testing.assert_close(out.double(), ref, **value_tolerance(dtype))

    weights = torch.randn(out.shape, dtype=torch.float64)
    (out * weights.to(out.dtype)).sum().backward()
    (ref * weights).sum().backward()
    assert leaf.grad.dtype == dtype and leaf.grad.shape == student.shape
    # (only the reverse-KL bracket needs the magnitude allowance; see assert_grad_close)
    assert_grad_close(leaf.grad, ref_leaf.grad, dtype,
                      logit_scale=float(logits_scale) if kw.get("direction", "reverse") == "reverse" else 0.0)
    assert teacher_leaf.grad is None, "the teacher is frozen: no gradient may reach it"
    vocab_size = kw.get("vocab_size")
    if vocab_size is not None:
        assert bool((leaf.grad[..., vocab_size:] == 0).all())
    assert torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (7, 131), (33, 1000), (5, 2500)])
def test_matches_reference(direction, dtype, rows, vocab, gen):
    student = random_logits((rows, vocab), dtype, gen)
    teacher = random_logits((rows, vocab), dtype, gen)
    _check(student, teacher, direction=direction)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_vocab_and_temperatures(direction, dtype, gen):
    rows, vocab, true_vocab = 13, 2177, 2177 - 300
    student = random_logits((rows, vocab), dtype, gen)
    teacher = random_logits((rows, vocab), dtype, gen)
    # garbage in the padding columns must not matter
    student[:, true_vocab:] = 50
    teacher[:, true_vocab:] = -50
    _check(student, teacher, direction=direction, vocab_size=true_vocab,
           student_temperature=0.6, teacher_temperature=1.3)


@pytest.mark.parametrize("kind", ["extreme", "peaked"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extreme_logits(kind, direction, dtype, gen):
    rows, vocab = 9, 1500
    student = random_logits((rows, vocab), dtype, gen, kind=kind)
    teacher = random_logits((rows, vocab), dtype, gen, kind=kind)
    teacher[0] = student[0]  # identical rows: KL exactly ~0
    out = _check(student, teacher, direction=direction)
    assert abs(float(out[0].detach())) < 1e-3


def test_identical_distributions_give_zero_and_no_negative_kl(gen):
    """KL >= 0 up to rounding, even at a 150k vocabulary in bf16 (negative KL from bf16
    accumulation is a known failure elsewhere)."""
    student = random_logits((8, 151936), torch.bfloat16, gen, scale=4.0)
    teacher = student.clone()
    kl = vocab_parallel_kl(student, teacher)
    assert float(kl.abs().max()) < 1e-5
    other = random_logits((8, 151936), torch.bfloat16, gen, scale=4.0)
    assert float(vocab_parallel_kl(student, other).min()) > 0


def test_megatron_layout_and_strided_rows(gen):
    s, b, vocab = 4, 3, 700
    _check(random_logits((s, b, vocab), torch.float32, gen),
           random_logits((s, b, vocab), torch.float32, gen))
    wide_s = random_logits((6, vocab + 9), torch.bfloat16, gen)
    wide_t = random_logits((6, vocab + 33), torch.bfloat16, gen)
    _check(wide_s[:, :vocab], wide_t[:, 33:])


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_gradcheck(direction, gen):
    student = random_logits((3, 29), torch.float64, gen).requires_grad_()
    teacher = random_logits((3, 29), torch.float64, gen)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_kl(x, teacher, vocab_size=25, direction=direction,
                                    student_temperature=0.9, teacher_temperature=1.1),
        (student,))


def test_gradient_in_input_dtype_without_float32_copies(gen):
    """bf16 in, bf16 gradient out; the backward returns exactly one [T, V] tensor."""
    student = random_logits((16, 3000), torch.bfloat16, gen).requires_grad_()
    teacher = random_logits((16, 3000), torch.bfloat16, gen)
    vocab_parallel_kl(student, teacher).sum().backward()
    assert student.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("expected_grad", [False, True])
def test_broadcast_rows(expected_grad, gen):
    """One distribution expanded over the tokens (stride 0 rows, e.g. a fixed reference teacher
    or a repeated prompt): the same KL and gradient as the materialized rows."""
    row_s = random_logits((1, 300), torch.float32, gen).requires_grad_()
    teacher = random_logits((300,), torch.float32, gen).expand(5, 300)
    kw = dict(expected_grad=torch.ones(5)) if expected_grad else {}
    out = vocab_parallel_kl(row_s.expand(5, 300), teacher, **kw)
    out.sum().backward()
    ref_leaf = row_s.detach().double().requires_grad_()
    ref = kl_reference(ref_leaf.expand(5, 300), teacher.double())
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, **value_tolerance(torch.float32))
    assert_grad_close(row_s.grad, ref_leaf.grad, torch.float32)
