"""The fused KL (ops.kl_fused; vocab_parallel_kl(..., expected_grad=w)): KL and weighted gradient
in one call, against the three-phase ops and the float64 reference, and the backward's handling
of a gradient that differs from the expected one. The CUDA kernel: tests/ops/test_cuda_ops.py."""
import warnings

import pytest
import torch

from scope_megatron.ops import vocab_parallel_kl
from scope_megatron.ops._library import FLAG_NONFINITE_FIRST, FLAG_NONFINITE_SECOND, acc_dtype, ops
from scope_megatron.ops.reference import kl_reference
from tests.helpers import assert_grad_close, random_logits, value_tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _weights(rows, gen, dtype):
    w = torch.randn(rows, generator=gen, dtype=torch.float64)
    w[::3] = 0  # masked tokens
    return w.to(dtype)


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab,vocab_size", [(1, 1, 1), (7, 131, 131), (40, 1000, 1000),
                                                    (5, 2177, 1877)])
def test_raw_op_equals_the_three_phases(reverse, dtype, rows, vocab, vocab_size, gen):
    """Same kernels, blocked by rows: bit-identical to partial -> combine -> backward."""
    student = random_logits((rows, vocab), dtype, gen)
    teacher = random_logits((rows, vocab), dtype, gen)
    weight = _weights(rows, gen, acc_dtype(dtype))
    inv_s, inv_t = 1 / 0.7, 1 / 1.3
    kl, row_stats, flags, grad = ops.kl_fused(student, teacher, weight, vocab_size, inv_s, inv_t, reverse)
    stats = ops.kl_partial(student, teacher, 0, vocab_size, inv_s, inv_t, reverse)
    kl3, row_stats3, flags3 = ops.kl_combine(stats.unsqueeze(0), reverse, inv_s, inv_t)
    grad3 = ops.kl_backward(weight, student, teacher, row_stats3, 0, vocab_size, inv_s, inv_t, reverse)
    for got, expected in [(kl, kl3), (row_stats, row_stats3), (flags, flags3), (grad, grad3)]:
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_raw_op_flags_and_checks(gen):
    student = random_logits((4, 64), torch.float32, gen)
    teacher = random_logits((4, 64), torch.float32, gen)
    student[1, 3] = float("nan")
    teacher[2, 60] = float("inf")
    weight = torch.ones(4)
    flags = ops.kl_fused(student, teacher, weight, 64, 1.0, 1.0, True)[2]
    assert flags.tolist() == [0, FLAG_NONFINITE_FIRST, FLAG_NONFINITE_SECOND, 0]
    with pytest.raises(RuntimeError, match="weight"):
        ops.kl_fused(student, teacher, torch.ones(3), 64, 1.0, 1.0, True)
    with pytest.raises(RuntimeError, match="weight"):
        ops.kl_fused(student, teacher, torch.ones(4, dtype=torch.float64), 64, 1.0, 1.0, True)


def _fused_and_reference(student, teacher, weights, *, loss_factor=1.0, **kw):
    """Value and gradient of loss_factor * sum(w * KL) with expected_grad=w, and the float64
    reference of the same."""
    leaf = student.detach().clone().requires_grad_()
    out = vocab_parallel_kl(leaf, teacher, expected_grad=weights, **kw)
    ((out * weights.to(out.dtype)).sum() * loss_factor).backward()
    ref_leaf = student.detach().double().requires_grad_()
    ref = kl_reference(ref_leaf, teacher.double(), **kw)
    ((ref * weights.double()).sum() * loss_factor).backward()
    return out.detach(), leaf.grad, ref.detach(), ref_leaf.grad


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 131), (3, 5, 1000), (6, 2500)])
def test_expected_grad_matches_reference(direction, dtype, shape, gen):
    student = random_logits(shape, dtype, gen)
    teacher = random_logits(shape, dtype, gen)
    weights = _weights(student[..., 0].numel(), gen, torch.float32).reshape(shape[:-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected gradient is the actual one: no recompute
        out, grad, ref, ref_grad = _fused_and_reference(student, teacher, weights, direction=direction,
                                                        student_temperature=0.8)
    assert out.shape == shape[:-1] and out.dtype == acc_dtype(dtype)
    torch.testing.assert_close(out.double(), ref, **value_tolerance(dtype))
    scale = max(float(student.double().abs().max()), float(teacher.double().abs().max()))
    assert_grad_close(grad, ref_grad, dtype, logit_scale=scale if direction == "reverse" else 0.0)
    assert bool((grad.reshape(-1, shape[-1])[weights.reshape(-1) == 0] == 0).all())


@pytest.mark.parametrize("kind", ["extreme", "peaked"])
def test_expected_grad_extreme_logits_and_padding(kind, gen):
    rows, vocab, true_vocab = 9, 1500, 1400
    student = random_logits((rows, vocab), torch.float32, gen, kind=kind)
    teacher = random_logits((rows, vocab), torch.float32, gen, kind=kind)
    student[:, true_vocab:] = 1e4  # padding garbage must not matter
    weights = _weights(rows, gen, torch.float32)
    out, grad, ref, ref_grad = _fused_and_reference(student, teacher, weights, vocab_size=true_vocab)
    torch.testing.assert_close(out.double(), ref, **value_tolerance(torch.float32))
    # the bracket's float32 error grows with both logit spans and the upstream gradient
    assert_grad_close(grad, ref_grad, torch.float32, logit_scale=2e4 * max(1.0, float(weights.abs().max())))
    assert bool((grad[:, true_vocab:] == 0).all())


def test_proportional_gradient_is_recomputed_with_a_warning(gen):
    """A loss scale between the KL and backward: every row differs from expected_grad, so every
    row is recomputed for the gradient received (exact), and the cost is reported."""
    student = random_logits((6, 300), torch.float32, gen)
    teacher = random_logits((6, 300), torch.float32, gen)
    weights = _weights(6, gen, torch.float32)
    weights[weights == 0] = 0.5  # every row differs once scaled
    with pytest.warns(RuntimeWarning, match="differed from expected_grad on 6 of 6 tokens"):
        _, grad, _, ref_grad = _fused_and_reference(student, teacher, weights, loss_factor=1024.0)
    assert_grad_close(grad, ref_grad, torch.float32, logit_scale=10.0 * 1024)


def test_only_the_rows_that_differ_are_recomputed(gen):
    """The fixup rewrites the rows whose received gradient differs from expected_grad, from the
    logits, and leaves the others bit for bit as the fused pass wrote them."""
    ops = torch.ops.scope_megatron
    student = random_logits((7, 300), torch.bfloat16, gen)
    teacher = random_logits((7, 300), torch.bfloat16, gen)
    expected = torch.randn(7, generator=gen)
    _, row_stats, _, fused = ops.kl_fused(student, teacher, expected, 300, 0.9, 1.1, True)
    got = expected.clone()
    got[[1, 4]] = torch.tensor([3.0, 0.0])  # rescaled, and masked after the fact
    got[6] = float("nan")
    grad = fused.clone()
    count = torch.tensor([5])  # a running count: the rewritten rows are added to it
    ops.kl_backward_fixup(grad, got, expected, student, teacher, row_stats, 0, 300, 0.9, 1.1, True, count)
    exact = ops.kl_backward(got, student, teacher, row_stats, 0, 300, 0.9, 1.1, True)
    same = [0, 2, 3, 5]
    assert torch.equal(grad[same], fused[same])
    assert torch.equal(grad[[1, 4]], exact[[1, 4]]) and bool((grad[4] == 0).all())
    assert bool(torch.isnan(grad[6]).all())
    assert int(count) == 5 + 3
    ops.kl_backward_fixup(grad, expected, expected, student, teacher, row_stats, 0, 300, 0.9, 1.1, True, count)
    assert int(count) == 8  # nothing differs: nothing added


@pytest.mark.parametrize("bad,match", [(torch.tensor([1.0]), "int64"), (torch.zeros(2, dtype=torch.int64), "one-element")])
def test_fixup_count_must_be_one_int64(bad, match, gen):
    ops = torch.ops.scope_megatron
    student = random_logits((3, 40), torch.float32, gen)
    expected = torch.ones(3)
    _, row_stats, _, grad = ops.kl_fused(student, student, expected, 40, 1.0, 1.0, True)
    with pytest.raises(RuntimeError, match=match):
        ops.kl_backward_fixup(grad, expected, expected, student, student, row_stats, 0, 40, 1.0, 1.0, True, bad)


def test_mismatch_reports_are_per_backward(gen):
    """The warning counts each backward's own differing tokens (the running count's growth),
    not the total so far; a backward without differences says nothing."""
    student = random_logits((4, 64), torch.float32, gen)
    teacher = random_logits((4, 64), torch.float32, gen)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for differing in (2, 0, 1):
        leaf = student.clone().requires_grad_()
        received = weights.clone()
        received[:differing] += 1
        out = vocab_parallel_kl(leaf, teacher, expected_grad=weights)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (out * received).sum().backward()
        reports = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(reports) == (1 if differing else 0), reports
        if differing:
            assert f"on {differing} of 4 tokens" in reports[0]


def test_unexpected_gradient_is_recomputed_with_a_warning(gen):
    student = random_logits((6, 300), torch.bfloat16, gen)
    teacher = random_logits((6, 300), torch.bfloat16, gen)
    weights = _weights(6, gen, torch.float32)
    other = torch.randn(6, generator=gen)  # what the loss really backpropagates
    leaf = student.detach().clone().requires_grad_()
    out = vocab_parallel_kl(leaf, teacher, expected_grad=weights)
    with pytest.warns(RuntimeWarning, match="differed from expected_grad on 6 of 6 tokens"):
        (out * other).sum().backward()
    ref_leaf = student.detach().double().requires_grad_()
    (kl_reference(ref_leaf, teacher.double()) * other.double()).sum().backward()
    assert_grad_close(leaf.grad, ref_leaf.grad, torch.bfloat16, logit_scale=10.0)


def test_a_second_backward_recomputes(gen):
    """retain_graph: the fused gradient was handed over by the first backward; the second one
    computes the exact gradient again."""
    student = random_logits((5, 200), torch.float32, gen).requires_grad_()
    teacher = random_logits((5, 200), torch.float32, gen)
    weights = torch.rand(5, generator=gen)
    loss = (vocab_parallel_kl(student, teacher, expected_grad=weights) * weights).sum()
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    loss.backward()
    torch.testing.assert_close(student.grad, first, rtol=1e-6, atol=1e-7)


def test_gradcheck_with_expected_grad(gen):
    """float64 through the fused path; gradcheck's probes are not proportional to the expected
    gradient, so this also checks the recompute."""
    student = random_logits((3, 17), torch.float64, gen).requires_grad_()
    teacher = random_logits((3, 17), torch.float64, gen)
    weights = torch.rand(3, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert torch.autograd.gradcheck(
            lambda s: vocab_parallel_kl(s, teacher, expected_grad=weights, vocab_size=15,
                                        student_temperature=0.9), (student,))


def test_expected_grad_checks(gen):
    student = random_logits((4, 64), torch.float32, gen).requires_grad_()
    teacher = random_logits((4, 64), torch.float32, gen)
    with pytest.raises(ValueError, match="expected_grad must be a tensor of shape"):
        vocab_parallel_kl(student, teacher, expected_grad=torch.ones(5))
    # a non-finite expected gradient cannot match: backward recomputes those rows from the real one
    weights = torch.tensor([1.0, 2.0, 0.0, -1.0])
    out = vocab_parallel_kl(student, teacher, expected_grad=torch.tensor([1.0, float("nan"), 0, 0]))
    with pytest.warns(RuntimeWarning, match="on 2 of 4 tokens"):
        (out * weights).sum().backward()
    ref_leaf = student.detach().double().requires_grad_()
    (kl_reference(ref_leaf, teacher.double()) * weights.double()).sum().backward()
    assert_grad_close(student.grad, ref_leaf.grad, torch.float32, logit_scale=10.0)
    bad = student.detach().clone()
    bad[2, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="student logits"):
        vocab_parallel_kl(bad.requires_grad_(), teacher, expected_grad=torch.ones(4))


def test_without_grad_the_plain_path_runs(gen):
    """No gradient wanted: expected_grad is ignored and nothing of [T, V] is kept."""
    student = random_logits((4, 64), torch.float32, gen)
    teacher = random_logits((4, 64), torch.float32, gen)
    with torch.no_grad():
        out = vocab_parallel_kl(student.requires_grad_(), teacher, expected_grad=torch.ones(4))
    torch.testing.assert_close(out, vocab_parallel_kl(student.detach(), teacher))
    assert out.grad_fn is None
