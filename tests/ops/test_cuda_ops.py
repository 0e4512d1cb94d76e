"""The CUDA kernels against the CPU kernels and the float64 references (needs a CUDA device).

Covers both load paths of the row kernels (16-byte packs when every row is 16-byte aligned,
element by element otherwise), odd and padded vocabularies, temperatures, extreme logits,
strided rows, masked tokens (zero upstream gradient), the raw per-shard ops with several shards,
the error flags, the per-sequence ops, more rows than a grid dimension allows and row offsets
beyond 2^31 elements.
"""
import math
import os

import pytest
import torch

from scope_megatron._extension import load_extension
from scope_megatron.ops import (group_normalized_weights, sequence_perplexity, vocab_parallel_kl,
                                vocab_parallel_logprob)
from scope_megatron.ops._library import (FLAG_NONFINITE_FIRST, FLAG_NONFINITE_SECOND,
                                         FLAG_SHARD_LAYOUT, FLAG_TARGET_OUT_OF_RANGE, ops)
from scope_megatron.ops.reference import (group_normalized_weights_reference, kl_reference,
                                          logprob_reference, sequence_perplexity_reference)
from tests.helpers import assert_grad_close, random_logits, value_tolerance

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1), (7, 131), (33, 1000), (5, 2500), (3, 151936)]
CUDA = "cuda"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _identity(t):
    return t


def _grad_weights(rows, gen):
    """Upstream gradient of a token loss: random, with every third token masked (exactly 0)."""
    w = torch.randn(rows, generator=gen, dtype=torch.float64)
    w[::3] = 0
    return w


def _run_logprob(base, view, target, weights, **kw):
    """vocab_parallel_logprob on view(leaf) with leaf a copy of base (so that a strided view
    reaches the kernels as such); returns the value and the gradient w.r.t. the view."""
    leaf = base.detach().clone().requires_grad_()
    out = vocab_parallel_logprob(view(leaf), target.to(base.device), **kw)
    (out * weights.to(out.device, out.dtype)).sum().backward()
    return out.detach(), view(leaf.grad)


def _check_logprob(base, target, gen, *, view=_identity, vocab_size=None, temperature=1.0):
    """CUDA vs float64 reference and vs the CPU kernels, values and gradients."""
    dtype = base.dtype
    kw = dict(vocab_size=vocab_size, temperature=temperature)
    rows = view(base).reshape(-1, view(base).shape[-1]).shape[0]
    weights = _grad_weights(rows, gen).reshape(view(base).shape[:-1])

    out, grad = _run_logprob(base.to(CUDA), view, target, weights, **kw)
    out_cpu, grad_cpu = _run_logprob(base.cpu(), view, target, weights, **kw)
    ref_leaf = view(base).detach().cpu().double().requires_grad_()
    ref = logprob_reference(ref_leaf, target.cpu(), **kw)
    (ref * weights).sum().backward()

    assert out.device.type == CUDA and out.dtype == _acc(dtype) and out.shape == ref.shape
    assert grad.device.type == CUDA and grad.dtype == dtype and grad.shape == ref_leaf.shape
    torch.testing.assert_close(out.double().cpu(), ref.detach(), **value_tolerance(dtype))
    torch.testing.assert_close(out.cpu(), out_cpu, **value_tolerance(dtype))
    assert_grad_close(grad.cpu(), ref_leaf.grad, dtype)
    assert_grad_close(grad.cpu(), grad_cpu, dtype)
    masked = weights == 0
    assert bool((grad[masked.to(CUDA)] == 0).all()), "tokens with zero upstream gradient"
    if vocab_size is not None:
        assert bool((grad[..., vocab_size:] == 0).all()), "padding columns get zero gradient"
    return out


def _run_kl(student_base, teacher, view, weights, **kw):
    leaf = student_base.detach().clone().requires_grad_()
    out = vocab_parallel_kl(view(leaf), teacher, **kw)
    (out * weights.to(out.device, out.dtype)).sum().backward()
    return out.detach(), view(leaf.grad)


def _check_kl(student_base, teacher_base, gen, *, view=_identity, teacher_view=_identity, **kw):
    """CUDA vs float64 reference and vs the CPU kernels. The inputs are view(student_base) and
    teacher_view(teacher_base), taken on each device (so that strided views stay strided)."""
    dtype = student_base.dtype
    student, teacher = view(student_base), teacher_view(teacher_base)
    weights = _grad_weights(student.reshape(-1, student.shape[-1]).shape[0], gen)
    weights = weights.reshape(student.shape[:-1])

    out, grad = _run_kl(student_base.to(CUDA), teacher_view(teacher_base.to(CUDA)), view, weights,
                        **kw)
    out_cpu, grad_cpu = _run_kl(student_base.cpu(), teacher_view(teacher_base.cpu()), view,
                                weights, **kw)
    ref_leaf = student.detach().cpu().double().requires_grad_()
    ref = kl_reference(ref_leaf, teacher.cpu().double(), **kw)
    (ref * weights).sum().backward()

    assert out.device.type == CUDA and out.dtype == _acc(dtype) and out.shape == ref.shape
    assert grad.dtype == dtype and grad.shape == ref_leaf.shape
    torch.testing.assert_close(out.double().cpu(), ref.detach(), **value_tolerance(dtype))
    torch.testing.assert_close(out.cpu(), out_cpu, **value_tolerance(dtype))
    # The reverse-KL bracket subtracts numbers as large as the logits (see assert_grad_close).
    reverse = kw.get("direction", "reverse") == "reverse"
    scale = max(float(student.double().abs().max()), float(teacher.double().abs().max()))
    logit_scale = scale if reverse else 0.0
    assert_grad_close(grad.cpu(), ref_leaf.grad, dtype, logit_scale=logit_scale)
    assert_grad_close(grad.cpu(), grad_cpu, dtype, logit_scale=logit_scale)
    assert bool((grad[(weights == 0).to(CUDA)] == 0).all())
    vocab_size = kw.get("vocab_size")
    if vocab_size is not None:
        assert bool((grad[..., vocab_size:] == 0).all())
    return out


def test_extension_has_cuda_kernels():
    assert load_extension().built_with_cuda(), "the extension was built without its CUDA kernels"


# ---------------------------------------------------------------------------------------------
# vocab_parallel_logprob
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_logprob_matches_reference_and_cpu(dtype, rows, vocab, gen):
    logits = random_logits((rows, vocab), dtype, gen)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    _check_logprob(logits, target, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [2176, 2177])  # rows 16-byte aligned for every dtype / not
def test_logprob_padded_vocab_and_temperature(dtype, vocab, gen):
    rows, true_vocab = 19, vocab - 299  # the last valid column falls inside a 16-byte pack
    logits = random_logits((rows, vocab), dtype, gen)
    logits[:, true_vocab:] = 50  # garbage in the padding must not matter
    target = torch.randint(0, true_vocab, (rows,), generator=gen)
    _check_logprob(logits, target, gen, vocab_size=true_vocab, temperature=0.6)


@pytest.mark.parametrize("kind", ["extreme", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_logprob_extreme_logits(kind, dtype, gen):
    rows, vocab = 9, 1500
    logits = random_logits((rows, vocab), dtype, gen, kind=kind)
    target = torch.where(torch.arange(rows) % 2 == 0, logits.double().argmax(-1),
                         torch.randint(0, vocab, (rows,), generator=gen))
    _check_logprob(logits, target, gen, temperature=0.7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start,width", [(0, 1024), (3, 709)])
def test_logprob_strided_rows(dtype, start, width, gen):
    """A column slice of a wider tensor, passed without a copy: aligned rows whose length is not
    a whole number of packs (start 0, stride 1024), and rows starting off a 16-byte boundary."""
    rows, vocab = 11, 700
    wide = random_logits((rows, width), dtype, gen)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    _check_logprob(wide, target, gen, view=lambda t: t[:, start:start + vocab])


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprob_misaligned_rows(dtype, gen):
    """vocab 1001: row r starts at r * 1001 elements, not 16-byte aligned (element path)."""
    logits = random_logits((13, 1001), dtype, gen)
    target = torch.randint(0, 1001, (13,), generator=gen)
    _check_logprob(logits, target, gen, temperature=1.7)


def test_logprob_megatron_layout(gen):
    s, b, vocab = 5, 3, 304
    logits = random_logits((s, b, vocab), torch.bfloat16, gen)
    target = torch.randint(0, vocab, (s, b), generator=gen)
    out = _check_logprob(logits, target, gen)
    assert out.shape == (s, b)


def test_logprobs_never_positive(gen):
    logits = random_logits((64, 4096), torch.bfloat16, gen, kind="peaked", device=CUDA)
    target = logits.float().argmax(-1)
    assert bool((vocab_parallel_logprob(logits, target) <= 0).all())


def test_empty_input():
    logits = torch.zeros((0, 128), device=CUDA, requires_grad=True)
    out = vocab_parallel_logprob(logits, torch.zeros(0, dtype=torch.long, device=CUDA))
    assert out.shape == (0,)
    out.sum().backward()
    assert logits.grad.shape == (0, 128)
    kl = vocab_parallel_kl(logits, torch.zeros((0, 128), device=CUDA))
    assert kl.shape == (0,)


# ---------------------------------------------------------------------------------------------
# vocab_parallel_kl
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_kl_matches_reference_and_cpu(direction, dtype, rows, vocab, gen):
    student = random_logits((rows, vocab), dtype, gen)
    teacher = random_logits((rows, vocab), dtype, gen)
    _check_kl(student, teacher, gen, direction=direction)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [2176, 2177])
def test_kl_padded_vocab_and_temperatures(direction, dtype, vocab, gen):
    rows, true_vocab = 13, vocab - 299
    student = random_logits((rows, vocab), dtype, gen)
    teacher = random_logits((rows, vocab), dtype, gen)
    student[:, true_vocab:] = 50
    teacher[:, true_vocab:] = -50
    _check_kl(student, teacher, gen, direction=direction, vocab_size=true_vocab,
              student_temperature=0.6, teacher_temperature=1.3)


@pytest.mark.parametrize("kind", ["extreme", "peaked"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kl_extreme_logits(kind, direction, dtype, gen):
    rows, vocab = 9, 1500
    student = random_logits((rows, vocab), dtype, gen, kind=kind)
    teacher = random_logits((rows, vocab), dtype, gen, kind=kind)
    teacher[0] = student[0]  # identical rows: KL exactly ~0
    out = _check_kl(student, teacher, gen, direction=direction)
    assert abs(float(out[0])) < 1e-3


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_strided_and_misaligned_rows(direction, dtype, gen):
    """Student: aligned rows with a partial last pack; teacher: rows off a 16-byte boundary (so
    the pair takes the element path); then both aligned; then vocab 1001."""
    rows, vocab = 6, 700
    wide_s = random_logits((rows, 1024), dtype, gen)
    wide_t = random_logits((rows, vocab + 33), dtype, gen)

    def first_cols(t):
        return t[:, :vocab]

    _check_kl(wide_s, wide_t, gen, view=first_cols, teacher_view=lambda t: t[:, 33:],
              direction=direction)
    _check_kl(wide_s, wide_t[:, :vocab].contiguous(), gen, view=first_cols, direction=direction,
              student_temperature=0.8)
    _check_kl(random_logits((5, 1001), dtype, gen), random_logits((5, 1001), dtype, gen), gen,
              direction=direction)


def test_identical_distributions_give_zero_and_no_negative_kl(gen):
    student = random_logits((8, 151936), torch.bfloat16, gen, scale=4.0, device=CUDA)
    assert float(vocab_parallel_kl(student, student.clone()).abs().max()) < 1e-5
    other = random_logits((8, 151936), torch.bfloat16, gen, scale=4.0, device=CUDA)
    assert float(vocab_parallel_kl(student, other).min()) > 0


# ---------------------------------------------------------------------------------------------
# Raw ops: per-shard statistics and their combination, CUDA vs CPU
# ---------------------------------------------------------------------------------------------
def _shards(t, shards):
    cols = t.shape[-1] // shards
    return [(s * cols, t[:, s * cols:(s + 1) * cols]) for s in range(shards)]


def _assert_stats_close(cuda_stats, cpu_stats, exact_cols, dtype):
    """Maxima, target logits, owner bits and flags agree exactly; sums and cross terms to the
    rounding of their largest terms (the summation orders differ)."""
    got = cuda_stats.cpu()
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    for c in range(cpu_stats.shape[-1]):
        if c in exact_cols:
            torch.testing.assert_close(got[..., c], cpu_stats[..., c], rtol=0, atol=0)
        else:
            scale = max(1.0, float(cpu_stats[..., c].abs().max()))
            torch.testing.assert_close(got[..., c], cpu_stats[..., c], rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab_size", [4000, 3900, 2900])  # 2900: the last of 4 shards is all padding
def test_raw_logprob_shards(shards, dtype, vocab_size, gen):
    rows, vocab, inv_t = 17, 4000, 1 / 0.9
    logits = random_logits((rows, vocab), dtype, gen)
    target = torch.randint(0, vocab_size, (rows,), generator=gen)
    stats = {}
    for device in ("cpu", CUDA):
        x, tgt = logits.to(device), target.to(device)
        stats[device] = torch.stack([ops.logprob_partial(part, tgt, start, vocab_size, inv_t)
                                     for start, part in _shards(x, shards)])
    # [max, sum, target logit, owner, flags]: all but the sum are exact
    _assert_stats_close(stats[CUDA], stats["cpu"], exact_cols=[0, 2, 3, 4], dtype=dtype)
    logprob, row_stats, flags = ops.logprob_combine(stats[CUDA], inv_t)
    logprob_cpu, row_stats_cpu, flags_cpu = ops.logprob_combine(stats["cpu"], inv_t)
    assert logprob.dtype == row_stats.dtype == _acc(dtype) and flags.dtype == torch.int32
    assert bool((flags == 0).all())
    torch.testing.assert_close(logprob.cpu(), logprob_cpu, **value_tolerance(dtype))
    torch.testing.assert_close(row_stats.cpu(), row_stats_cpu, **value_tolerance(dtype))
    ref = logprob_reference(logits.double(), target, vocab_size=vocab_size, temperature=0.9)
    torch.testing.assert_close(logprob.cpu().double(), ref, **value_tolerance(dtype))


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab_size", [4000, 2900])
def test_raw_kl_shards(reverse, shards, dtype, vocab_size, gen):
    rows, vocab, inv_s, inv_t = 17, 4000, 1 / 0.8, 1 / 1.2
    student = random_logits((rows, vocab), dtype, gen)
    teacher = random_logits((rows, vocab), dtype, gen)
    stats = {}
    for device in ("cpu", CUDA):
        parts = zip(_shards(student.to(device), shards), _shards(teacher.to(device), shards))
        stats[device] = torch.stack([ops.kl_partial(s, t, start, vocab_size, inv_s, inv_t, reverse)
                                     for (start, s), (_, t) in parts])
    # [max_s, sum_s, cross, max_t, sum_t, flags]: maxima and flags are exact
    _assert_stats_close(stats[CUDA], stats["cpu"], exact_cols=[0, 3, 5], dtype=dtype)
    kl, row_stats, flags = ops.kl_combine(stats[CUDA], reverse, inv_s, inv_t)
    kl_cpu, row_stats_cpu, flags_cpu = ops.kl_combine(stats["cpu"], reverse, inv_s, inv_t)
    assert bool((flags == 0).all())
    torch.testing.assert_close(kl.cpu(), kl_cpu, **value_tolerance(dtype))
    torch.testing.assert_close(row_stats.cpu(), row_stats_cpu, **value_tolerance(dtype))
    ref = kl_reference(student.double(), teacher.double(), vocab_size=vocab_size,
                       direction="reverse" if reverse else "forward",
                       student_temperature=0.8, teacher_temperature=1.2)
    torch.testing.assert_close(kl.cpu().double(), ref, **value_tolerance(dtype))


@pytest.mark.parametrize("vocab", [64, 65])  # packed / element path
def test_raw_error_flags_match_cpu(vocab, gen):
    rows, vocab_size = 8, 60
    logits = random_logits((rows, vocab), torch.float32, gen)
    teacher = random_logits((rows, vocab), torch.float32, gen)
    target = torch.tensor([0, 5, -1, 60, 70, 3, 40, 59])  # rows 2-4 out of range
    logits[5, 2] = float("nan")
    logits[6, 40] = float("-inf")
    logits[7, 61] = float("nan")  # a padding column: ignored
    teacher[1, 7] = float("inf")
    flags = {}
    for device in ("cpu", CUDA):
        x, t, tgt = logits.to(device), teacher.to(device), target.to(device)
        both = torch.stack([ops.logprob_partial(part, tgt, start, vocab_size, 1.0)
                            for start, part in _shards(x, 2)])
        first_only = both[:1]  # a missing shard: targets it owns have no owner
        kl_stats = ops.kl_partial(x, t, 0, vocab_size, 1.0, 1.0, True).unsqueeze(0)
        combined = [ops.logprob_combine(both, 1.0), ops.logprob_combine(first_only, 1.0),
                    ops.kl_combine(kl_stats, True, 1.0, 1.0)]
        flags[device] = [c[2] for c in combined]
        for result, row_flags in ((c[0].cpu(), c[2].cpu()) for c in combined):
            # a flagged row's result is NaN, the others are finite
            assert torch.equal(torch.isnan(result), row_flags != 0), (device, result, row_flags)
    for got, expected in zip(flags[CUDA], flags["cpu"]):
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    logprob_flags, missing_shard_flags, kl_flags = (f.cpu() for f in flags[CUDA])
    oor, nan, layout = FLAG_TARGET_OUT_OF_RANGE, FLAG_NONFINITE_FIRST, FLAG_SHARD_LAYOUT
    assert logprob_flags.tolist() == [0, 0, oor, oor, oor, nan, nan, 0]
    # without shard 1, rows 6 and 7 (targets 40, 59) have no owner, and row 6's -inf is unseen
    assert missing_shard_flags.tolist() == [0, 0, oor, oor, oor, nan, layout, layout]
    assert kl_flags[1] == FLAG_NONFINITE_SECOND and kl_flags[5] == FLAG_NONFINITE_FIRST


def test_more_rows_than_a_grid_dimension(gen):
    """70000 rows > 65535 (the limit of gridDim.y / z): every row is computed."""
    rows, vocab = 70000, 16
    logits = random_logits((rows, vocab), torch.float32, gen)
    teacher = random_logits((rows, vocab), torch.float32, gen)
    target = torch.randint(0, vocab, (rows,), generator=gen)
    grad_out = torch.randn(rows, generator=gen)
    results = {}
    for device in ("cpu", CUDA):
        x, t, g = logits.to(device), teacher.to(device), grad_out.to(device)
        tgt = target.to(device)
        logprob, logprob_rows, _ = ops.logprob_combine(
            ops.logprob_partial(x, tgt, 0, vocab, 1.0).unsqueeze(0), 1.0)
        kl, kl_rows, _ = ops.kl_combine(ops.kl_partial(x, t, 0, vocab, 1.0, 1.0, True).unsqueeze(0),
                                        True, 1.0, 1.0)
        results[device] = [logprob, kl,
                           ops.logprob_backward(g, x, tgt, logprob_rows, 0, vocab, 1.0),
                           ops.kl_backward(g, x, t, kl_rows, 0, vocab, 1.0, 1.0, True)]
    for got, expected in zip(results[CUDA], results["cpu"]):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_current_stream_is_used(gen):
    logits = random_logits((64, 3000), torch.bfloat16, gen)
    target = torch.randint(0, 3000, (64,), generator=gen)
    expected = vocab_parallel_logprob(logits, target)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x, t = logits.to(CUDA, non_blocking=True), target.to(CUDA, non_blocking=True)
        got = vocab_parallel_logprob(x, t)
    stream.synchronize()
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(gen):
    logits = random_logits((7, 1000), torch.float32, gen)
    target = torch.randint(0, 1000, (7,), generator=gen)
    got = vocab_parallel_logprob(logits.to("cuda:1"), target.to("cuda:1"))
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), vocab_parallel_logprob(logits, target))


# ---------------------------------------------------------------------------------------------
# Non-finite logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [304, 301])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_raise(dtype, vocab, bad, gen):
    logits = random_logits((5, vocab), dtype, gen, device=CUDA)
    target = torch.randint(0, vocab, (5,), generator=gen).to(CUDA)
    poisoned = logits.clone()
    poisoned[3, 250] = bad
    with pytest.raises(FloatingPointError, match="logits contain NaN or Inf"):
        vocab_parallel_logprob(poisoned, target)
    with pytest.raises(FloatingPointError, match="student logits"):
        vocab_parallel_kl(poisoned, logits)
    with pytest.raises(FloatingPointError, match="teacher logits"):
        vocab_parallel_kl(logits, poisoned)
    # the same value in a padding column is never read
    assert bool(torch.isfinite(vocab_parallel_logprob(poisoned, target % 200, vocab_size=200)).all())


# ---------------------------------------------------------------------------------------------
# sequence_perplexity and group_normalized_weights
# ---------------------------------------------------------------------------------------------
def _logprobs(shape, gen, dtype):
    return (-torch.rand(*shape, generator=gen, dtype=torch.float64) * 5).to(dtype)


def _perplexity_and_grad(values, mask, cu_seqlens, weights):
    leaf = values.detach().clone().requires_grad_()
    out = sequence_perplexity(leaf, mask, cu_seqlens=cu_seqlens)
    (out * weights.to(out.device, out.dtype)).sum().backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sequence_perplexity_padded(dtype, gen):
    batch, length = 7, 1029
    values = _logprobs((batch, length), gen, dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length) < lengths.unsqueeze(1)
    weights = torch.randn(batch, generator=gen, dtype=torch.float64)
    out, grad = _perplexity_and_grad(values.to(CUDA), mask.to(CUDA), None, weights)
    out_cpu, grad_cpu = _perplexity_and_grad(values, mask, None, weights)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    ref = sequence_perplexity_reference(values.double(), mask)
    torch.testing.assert_close(out.cpu().double(), ref, **tol)
    torch.testing.assert_close(out.cpu(), out_cpu, **tol)
    torch.testing.assert_close(grad.cpu(), grad_cpu, **tol)
    assert bool((grad[~mask.to(CUDA)] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [True, False])
def test_sequence_perplexity_packed(dtype, with_mask, gen):
    lengths = [5, 1, 517, 9, 1300]
    cu = torch.tensor([4] + (4 + torch.tensor(lengths).cumsum(0)).tolist())  # starts at 4
    total = int(cu[-1]) + 7  # and 7 positions after the last sequence
    values = _logprobs((total,), gen, dtype)
    mask = None
    if with_mask:
        mask = torch.rand(total, generator=gen) > 0.2
        mask[cu[:-1]] = True  # every sequence keeps a token
    weights = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    out, grad = _perplexity_and_grad(values.to(CUDA), None if mask is None else mask.to(CUDA),
                                     cu.to(CUDA), weights)
    out_cpu, grad_cpu = _perplexity_and_grad(values, mask, cu, weights)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(out.cpu().double(),
                               sequence_perplexity_reference(values.double(), mask, cu_seqlens=cu),
                               **tol)
    torch.testing.assert_close(out.cpu(), out_cpu, **tol)
    torch.testing.assert_close(grad.cpu(), grad_cpu, **tol)


def test_raw_sequence_backward_zeroes_positions_outside_sequences():
    """The gradient buffer is not pre-zeroed by the binding: the launcher must write every
    position (seed the caching allocator with NaNs to make stale memory visible)."""
    n = 4096
    torch.full((n,), float("nan"), device=CUDA).sum()  # freed block of the right size
    offsets = torch.tensor([100, 1000, 1000, 3000], device=CUDA)
    count = torch.tensor([900, 0, 2000], device=CUDA)
    grad_out = torch.tensor([1.0, 2.0, 4.0], device=CUDA)
    grad = ops.sequence_logppl_backward(grad_out, None, offsets, count, n).cpu()
    expected = torch.zeros(n)
    expected[100:1000] = -1.0 / 900
    expected[1000:3000] = -4.0 / 2000
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    log_ppl, counted = ops.sequence_logppl(torch.zeros(n, device=CUDA), None, offsets)
    assert counted.tolist() == [900, 0, 2000]
    assert math.isnan(float(log_ppl[1])), "an empty sequence has no perplexity"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("tau,normalize", [(1.0, "sum"), (0.5, "mean"), (3.0, "sum")])
def test_group_normalized_weights(dtype, sign, tau, normalize, gen):
    n = 300
    log_ppl = (torch.rand(n, generator=gen, dtype=torch.float64) * 4).to(dtype)
    group_ids = torch.randint(0, 37, (n,), generator=gen) * 11 + 1000  # sparse ids
    member = torch.rand(n, generator=gen) > 0.4
    member[group_ids == 1000] = False  # a group without members
    kw = dict(sign=sign, tau=tau, normalize=normalize)
    out = group_normalized_weights(log_ppl.to(CUDA), group_ids.to(CUDA), member.to(CUDA), **kw)
    out_cpu = group_normalized_weights(log_ppl, group_ids, member, **kw)
    ref = group_normalized_weights_reference(log_ppl.double(), group_ids, member, **kw)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert out.device.type == CUDA and out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), ref, **tol)
    torch.testing.assert_close(out.cpu(), out_cpu, **tol)
    assert bool((out[~member.to(CUDA)] == 0).all())


# ---------------------------------------------------------------------------------------------
# 64-bit row offsets: rows * vocab > 2^31 elements (about 5 GB per bf16 tensor)
# ---------------------------------------------------------------------------------------------
LARGE_ROWS, LARGE_VOCAB = 16384, 151936
# The first row whose offset exceeds 2^31 elements, its neighbours and the last row.
LARGE_CHECK_ROWS = [0, 2**31 // LARGE_VOCAB, 2**31 // LARGE_VOCAB + 1, LARGE_ROWS - 1]
HOT = 8.0  # one column per row holds HOT, the others 1: a closed-form softmax


def _hot_logits(multiplier):
    """[rows, V] bf16 ones with HOT at column (r * multiplier) % V of row r (row-dependent data,
    so that a row read or written at a wrong offset shows)."""
    r = torch.arange(LARGE_ROWS, device=CUDA)
    hot = (r * multiplier) % LARGE_VOCAB
    x = torch.ones((LARGE_ROWS, LARGE_VOCAB), dtype=torch.bfloat16, device=CUDA)
    x[r, hot] = HOT
    return x, hot


def _hot_softmax():
    """(p at the hot column, p elsewhere) of a _hot_logits row, float64."""
    other = math.exp(1.0 - HOT)
    z = 1.0 + (LARGE_VOCAB - 1) * other
    return 1.0 / z, other / z


@pytest.mark.slow
def test_large_logprob_64bit_offsets():
    assert LARGE_ROWS * LARGE_VOCAB > 2**31
    logits, hot = _hot_logits(7919)
    r = torch.arange(LARGE_ROWS, device=CUDA)
    target = torch.where(r % 2 == 0, hot, (hot + 1) % LARGE_VOCAB)
    logits.requires_grad_()
    out = vocab_parallel_logprob(logits, target)
    p_hot, p_other = _hot_softmax()
    expected = torch.where(r % 2 == 0, math.log(p_hot), math.log(p_other)).double()
    # (float32 sums of 151936 equal terms: a few 1e-5 of rounding; the point is the indexing)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)

    out.sum().backward()
    grad = logits.grad
    logits = None  # free 5 GB
    assert bool(torch.isfinite(grad).all())
    on_target = grad[r, target].double()
    torch.testing.assert_close(on_target, torch.where(r % 2 == 0, 1 - p_hot, 1 - p_other).double(),
                               rtol=1e-2, atol=1e-3)
    for row in LARGE_CHECK_ROWS:
        exp_row = torch.full((LARGE_VOCAB,), -p_other, dtype=torch.float64)
        exp_row[int(hot[row])] = -p_hot
        exp_row[int(target[row])] += 1.0
        assert_grad_close(grad[row].cpu(), exp_row, torch.bfloat16)
    # every row of (onehot - p) sums to ~0 (stale memory in a row would not)
    assert float(grad.sum(-1, dtype=torch.float32).abs().max()) < 1e-2


@pytest.mark.slow
def test_large_kl_64bit_offsets():
    student, hot_s = _hot_logits(7919)
    teacher, hot_t = _hot_logits(104729)
    student.requires_grad_()
    kl = vocab_parallel_kl(student, teacher)  # reverse: KL(student || teacher)
    teacher = None
    p_hot, p_other = _hot_softmax()
    # log p - log q is +(HOT - 1) at the student's hot column, -(HOT - 1) at the teacher's, else 0
    differ = hot_s != hot_t
    kl_differ = (HOT - 1) * (p_hot - p_other)
    expected = torch.where(differ, kl_differ, 0.0).double()
    torch.testing.assert_close(kl.double(), expected, rtol=1e-4, atol=1e-4)

    kl.sum().backward()
    grad = student.grad
    student = None
    assert bool(torch.isfinite(grad).all())
    for row in LARGE_CHECK_ROWS:
        k = float(expected[row])
        exp_row = torch.full((LARGE_VOCAB,), p_other * (0.0 - k), dtype=torch.float64)
        if bool(differ[row]):
            exp_row[int(hot_s[row])] = p_hot * ((HOT - 1) - k)
            exp_row[int(hot_t[row])] = p_other * (-(HOT - 1) - k)
        else:
            exp_row[int(hot_s[row])] = p_hot * (0.0 - k)
        assert_grad_close(grad[row].cpu(), exp_row, torch.bfloat16)
    r = torch.arange(LARGE_ROWS, device=CUDA)
    on_hot = grad[r, hot_s].double()
    torch.testing.assert_close(on_hot, torch.where(differ, p_hot * ((HOT - 1) - expected),
                                                   p_hot * (0.0 - expected)),
                               rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The fused KL (ops.kl_fused): one pass with the rows on chip, or the three phases as fallback
# ---------------------------------------------------------------------------------------------
def _fused(student, teacher, weight, vocab_size, reverse, inv_s=1 / 0.8, inv_t=1 / 1.1):
    return ops.kl_fused(student, teacher, weight.to(student.device, _acc(student.dtype)), vocab_size,
                        inv_s, inv_t, reverse)


def _cuda_kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


# (rows, columns): block sizes 32 .. 512 threads, one row per block and many (the copy of the
# next row overlapping the current one), the largest rows on chip (V/4 of Qwen's 151936 in
# bf16), and the fallbacks (too long: 151936; not whole 16-byte packs: 1001).
FUSED_SHAPES = [(7, 64), (33, 1000), (300, 2176), (37, 18992), (400, 37984), (3, 151936),
                (5, 1001)]


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", FUSED_SHAPES)
def test_kl_fused_matches_reference_and_cpu(reverse, dtype, rows, vocab, gen):
    student = random_logits((rows, vocab), dtype, gen)
    teacher = random_logits((rows, vocab), dtype, gen)
    vocab_size = vocab - 37 if vocab > 100 else vocab  # padding inside the last 16-byte pack
    student[:, vocab_size:] = 50
    weight = _grad_weights(rows, gen)
    kl, row_stats, flags, grad = (t.cpu() for t in _fused(student.to(CUDA), teacher.to(CUDA), weight,
                                                          vocab_size, reverse))
    kl_cpu, row_stats_cpu, _, grad_cpu = _fused(student, teacher, weight, vocab_size, reverse)
    ref_leaf = student.detach().to(torch.float64, copy=True).requires_grad_()
    ref = kl_reference(ref_leaf, teacher.double(), vocab_size=vocab_size,
                       direction="reverse" if reverse else "forward",
                       student_temperature=0.8, teacher_temperature=1.1)
    (ref * weight).sum().backward()
    assert bool((flags == 0).all())
    assert kl.dtype == _acc(dtype) and grad.dtype == dtype and grad.shape == student.shape
    torch.testing.assert_close(kl.double(), ref.detach(), **value_tolerance(dtype))
    torch.testing.assert_close(kl, kl_cpu, **value_tolerance(dtype))
    torch.testing.assert_close(row_stats, row_stats_cpu, **value_tolerance(dtype))
    scale = max(float(student[:, :vocab_size].double().abs().max()), float(teacher.double().abs().max()))
    logit_scale = scale if reverse else 0.0
    assert_grad_close(grad, ref_leaf.grad, dtype, logit_scale=logit_scale)
    assert_grad_close(grad, grad_cpu, dtype, logit_scale=logit_scale)
    assert bool((grad[weight == 0] == 0).all()) and bool((grad[:, vocab_size:] == 0).all())


@pytest.mark.parametrize("reverse", [True, False], ids=["reverse", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(9, 1000), (37, 18992), (5, 1001), (200003, 72)])
def test_kl_fused_backward_fixup_matches_cpu(reverse, dtype, rows, vocab, gen):
    """kl_backward_fixup on the device: the rows whose received gradient differs from the
    weight kl_fused used are rewritten (as the CPU kernel and kl_backward write them), the
    others are not written at all; a NaN upstream gradient makes its row NaN; the running count
    grows by the rewritten rows (200003 rows: each block scans its rows in several rounds)."""
    student = random_logits((rows, vocab), dtype, gen)
    teacher = random_logits((rows, vocab), dtype, gen)
    vocab_size = vocab - 37
    weight = _grad_weights(rows, gen).to(_acc(dtype))
    got = weight.clone()
    changed = torch.randperm(rows, generator=gen)[: rows // 3 + 1]
    # changed by at least 1 (a fresh randn drew a weight's exact float32 value once in run 4)
    got[changed] = weight[changed] + 1 + torch.rand(len(changed), generator=gen, dtype=got.dtype)
    got[changed[0]] = float("nan") if rows > 5 else got[changed[0]]
    args = (vocab_size, 1 / 0.8, 1 / 1.1, reverse)
    same = torch.ones(rows, dtype=torch.bool)
    same[changed] = False
    results = {}
    for device in ("cpu", CUDA):
        s, t, w, g = (x.to(device) for x in (student, teacher, weight, got))
        _, row_stats, _, fused = _fused(s, t, w, vocab_size, reverse)
        grad = fused.clone()
        grad[same.to(device)] = 7  # a sentinel on the rows that must not be written
        count = torch.tensor([5], device=device)
        ops.kl_backward_fixup(grad, g, w, s, t, row_stats, 0, *args, count)
        assert int(count) == 5 + len(changed), device
        exact = ops.kl_backward(g, s, t, row_stats, 0, *args)
        results[device] = tuple(x.cpu() for x in (fused, grad, exact))
    fused, grad, exact = results[CUDA]
    assert bool((grad[same] == 7).all())
    assert torch.equal(grad[~same].isnan(), exact[~same].isnan())
    torch.testing.assert_close(grad[~same], exact[~same], equal_nan=True)  # the same row code
    logit_scale = max(float(student.double().abs().max()), float(teacher.double().abs().max()))
    assert_grad_close(fused, results["cpu"][0], dtype, logit_scale=logit_scale if reverse else 0.0)
    assert_grad_close(grad[~same].nan_to_num(), results["cpu"][1][~same].nan_to_num(), dtype,
                      logit_scale=logit_scale if reverse else 0.0)


@pytest.mark.parametrize("kind", ["extreme", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kl_fused_extreme_logits(kind, dtype, gen):
    rows, vocab = 9, 1504
    student = random_logits((rows, vocab), dtype, gen, kind=kind)
    teacher = random_logits((rows, vocab), dtype, gen, kind=kind)
    teacher[0] = student[0]
    weight = _grad_weights(rows, gen)
    kl, _, flags, grad = (t.cpu() for t in _fused(student.to(CUDA), teacher.to(CUDA), weight, vocab, True))
    ref_leaf = student.detach().to(torch.float64, copy=True).requires_grad_()
    ref = kl_reference(ref_leaf, teacher.double(), student_temperature=0.8, teacher_temperature=1.1)
    (ref * weight).sum().backward()
    assert bool((flags == 0).all()) and bool(torch.isfinite(kl).all()) and bool(torch.isfinite(grad.float()).all())
    torch.testing.assert_close(kl.double(), ref.detach(), **value_tolerance(dtype))
    # the bracket's float32 error grows with both scaled logit spans and the upstream gradient
    logit_scale = 1e4 * (1 / 0.8 + 1 / 1.1) * max(1.0, float(weight.abs().max()) / 0.8)
    assert_grad_close(grad, ref_leaf.grad, dtype, logit_scale=logit_scale)


@pytest.mark.parametrize("vocab", [2048, 18992, 40960])  # blocks of 1, 8 and 16 warps (the flags cross warps)
def test_kl_fused_flags_and_poisoned_output(vocab, gen):
    """Non-finite inputs are flagged per row, whichever warp of the block holds them; every
    gradient element is written (the output is allocated from a pool filled with NaN first)."""
    rows = 600
    student = random_logits((rows, vocab), torch.bfloat16, gen, device=CUDA)
    teacher = random_logits((rows, vocab), torch.bfloat16, gen, device=CUDA)
    student[5, 7] = float("nan")
    teacher[599, vocab - 1] = float("-inf")
    student[300, vocab - 9] = float("inf")  # both inputs in one row, in different warps
    teacher[300, vocab // 2] = float("nan")
    torch.full((rows, vocab), float("nan"), dtype=torch.bfloat16, device=CUDA).sum()
    kl, _, flags, grad = _fused(student, teacher, torch.ones(rows), vocab, True)
    flags = flags.cpu()
    assert flags[5] == FLAG_NONFINITE_FIRST and flags[599] == FLAG_NONFINITE_SECOND
    assert flags[300] == FLAG_NONFINITE_FIRST | FLAG_NONFINITE_SECOND
    assert int((flags != 0).sum()) == 3
    assert torch.equal(torch.isnan(kl.cpu()), flags != 0)  # flagged rows' KL is NaN, as kl_combine writes
    healthy = torch.ones(rows, dtype=torch.bool, device=CUDA)
    healthy[[5, 300, 599]] = False
    assert bool(torch.isfinite(grad[healthy].float()).all())


@pytest.mark.slow
def test_large_kl_fused_64bit_offsets():
    """60000 x 37984 bf16 (> 2^31 elements, on chip) against the three-phase CUDA kernels."""
    rows, vocab = 60000, 37984
    assert rows * vocab > 2**31
    g = torch.Generator(device=CUDA).manual_seed(0)
    student = torch.randn((rows, vocab), generator=g, device=CUDA).mul_(3).to(torch.bfloat16)
    teacher = torch.randn((rows, vocab), generator=g, device=CUDA).mul_(3).to(torch.bfloat16)
    weight = torch.rand(rows, generator=g, device=CUDA)
    kl, row_stats, flags, grad = ops.kl_fused(student, teacher, weight, vocab, 1.0, 1.0, True)
    stats = ops.kl_partial(student, teacher, 0, vocab, 1.0, 1.0, True)
    kl3, row_stats3, _ = ops.kl_combine(stats.unsqueeze(0), True, 1.0, 1.0)
    torch.testing.assert_close(kl, kl3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row_stats, row_stats3, rtol=1e-5, atol=1e-5)
    assert int(flags.abs().sum()) == 0
    del stats
    check = [0, 2**31 // vocab, 2**31 // vocab + 1, rows - 1]
    grad3 = ops.kl_backward(weight[check].contiguous(), student[check].contiguous(), teacher[check].contiguous(),
                            row_stats3[check].contiguous(), 0, vocab, 1.0, 1.0, True)
    assert_grad_close(grad[check].cpu(), grad3.cpu().double(), torch.bfloat16, logit_scale=15.0)
    assert bool(torch.isfinite(grad[-100:].float()).all())


@pytest.mark.parametrize("packs_per_warp", ["1", "8192"])
def test_row_kernels_at_every_block_shape(packs_per_warp):
    """SCOPE_CUDA_PACKS_PER_WARP (the launch knob tools/tune_kernels.py tunes) from 256 threads per
    row down to one warp per row: the two-pass kernels still match the float64 reference."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob
        from scope_megatron.ops.reference import kl_reference, logprob_reference
        g = torch.Generator().manual_seed(0)
        for rows, vocab, vocab_size in [(5, 37984, 37984), (9, 2177, 2000), (3, 151936, 151900)]:
            s = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3)
            t = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3)
            w = torch.randn(rows, generator=g, dtype=torch.float64)
            target = torch.randint(0, vocab_size, (rows,), generator=g)
            for op, ref, args in [(vocab_parallel_kl, kl_reference, (t,)),
                                  (vocab_parallel_logprob, logprob_reference, (target,))]:
                for dtype in (torch.float32, torch.bfloat16):
                    x = s.to(dtype).cuda().requires_grad_()
                    cuda_args = [a.to(dtype).cuda() if a.is_floating_point() else a.cuda() for a in args]
                    out = op(x, *cuda_args, vocab_size=vocab_size)
                    (out * w.cuda().float()).sum().backward()
                    xr = s.to(dtype).double().requires_grad_()
                    r = ref(xr, *[a.to(dtype).double() if a.is_floating_point() else a for a in args],
                            vocab_size=vocab_size)
                    (r * w).sum().backward()
                    torch.testing.assert_close(out.double().cpu(), r.detach(), rtol=1e-5, atol=1e-5)
                    err = (x.grad.double().cpu() - xr.grad).abs().max() / xr.grad.abs().max()
                    assert err < (1e-5 if dtype == torch.float32 else 1e-2), (op.__name__, dtype, float(err))
        print("ok")
    """)
    env = dict(os.environ, SCOPE_CUDA_PACKS_PER_WARP=packs_per_warp)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="thread-block clusters need sm_90")
def test_kl_fused_clusters_split_long_rows():
    """SCOPE_CUDA_FUSED_CLUSTER=1: rows longer than one block holds run on clusters of 4 blocks
    (a quarter of the row each, statistics merged through distributed shared memory). Against the
    three-phase kernels: more rows than resident clusters, padding that leaves a whole quarter
    empty, both directions, non-finite flags in the last quarter; and the profiler must see the
    fused kernel (not the two-pass ones)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from scope_megatron.ops._library import ops
        g = torch.Generator(device="cuda").manual_seed(0)
        for rows, cols, vocab in [(300, 151936, 151936), (37, 75968, 75900), (20, 151936, 100000)]:
            s = torch.randn((rows, cols), generator=g, device="cuda").mul_(3).to(torch.bfloat16)
            t = torch.randn((rows, cols), generator=g, device="cuda").mul_(3).to(torch.bfloat16)
            w = torch.randn(rows, generator=g, device="cuda")
            w[::5] = 0
            for reverse in (True, False):
                kl, rs, flags, grad = ops.kl_fused(s, t, w, vocab, 1 / 0.9, 1 / 1.1, reverse)
                st = ops.kl_partial(s, t, 0, vocab, 1 / 0.9, 1 / 1.1, reverse)
                kl3, rs3, flags3 = ops.kl_combine(st.unsqueeze(0), reverse, 1 / 0.9, 1 / 1.1)
                grad3 = ops.kl_backward(w, s, t, rs3, 0, vocab, 1 / 0.9, 1 / 1.1, reverse)
                torch.testing.assert_close(kl, kl3, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(rs, rs3, rtol=1e-5, atol=1e-5)
                assert torch.equal(flags, flags3) and int(flags.abs().sum()) == 0
                err = (grad.float() - grad3.float()).abs().max() / grad3.float().abs().max()
                assert err < 1e-2, float(err)
                assert bool((grad[:, vocab:] == 0).all()) and bool((grad[w == 0] == 0).all())
        s[3, 151000] = float("nan")
        t[7, 140000] = float("inf")
        flags = ops.kl_fused(s, t, w, 151936, 1.0, 1.0, True)[2].cpu()
        assert flags[3] == 1 and flags[7] == 2 and int((flags != 0).sum()) == 2, flags.nonzero()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ops.kl_fused(s[:8].contiguous(), t[:8].contiguous(), w[:8].contiguous(), 151936, 1.0, 1.0, True)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert not names or (any("kl_fused_kernel" in n for n in names)
                             and not any("kl_backward_kernel" in n for n in names)), names
        print("ok")
    """)
    env = dict(os.environ, SCOPE_CUDA_FUSED_CLUSTER="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# Last in the file: the profiler (CUPTI) stays attached to the process afterwards.
def test_kl_fused_runs_on_chip_where_it_should(gen):
    """The profiler sees the one-pass kernel for rows that fit on chip, and the two-pass kernels
    for longer rows (a test of the dispatch: the results above are equal either way)."""
    s = random_logits((64, 37984), torch.bfloat16, gen, device=CUDA)
    names = _cuda_kernel_names(lambda: _fused(s, s.flip(0), torch.ones(64), 37984, True))
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels here")
    assert any("kl_fused_kernel" in n for n in names), names
    assert not any("kl_backward_kernel" in n for n in names), names
    s = random_logits((4, 151936), torch.bfloat16, gen, device=CUDA)
    names = _cuda_kernel_names(lambda: _fused(s, s.flip(0), torch.ones(4), 151936, True))
    assert not any("kl_fused_kernel" in n for n in names), names
    assert any("kl_backward_kernel" in n for n in names), names


def test_kl_fused_shapes_in_any_order(gen):
    """The launch caches its occupancy per shape and only ever raises the kernel's shared-memory
    limit: a wide row after a narrow one (which needs less shared memory) still launches and
    matches the CPU, whatever ran before in this process."""
    for vocab in (37984, 18992, 37984, 1000, 37984):
        s = random_logits((5, vocab), torch.bfloat16, gen)
        t = random_logits((5, vocab), torch.bfloat16, gen)
        w = torch.rand(5, generator=gen)
        kl, _, _, grad = (x.cpu() for x in _fused(s.to(CUDA), t.to(CUDA), w, vocab, True))
        kl_cpu, _, _, grad_cpu = _fused(s, t, w, vocab, True)
        torch.testing.assert_close(kl, kl_cpu, **value_tolerance(torch.bfloat16))
        scale = max(float(s.double().abs().max()), float(t.double().abs().max()))
        assert_grad_close(grad, grad_cpu, torch.bfloat16, logit_scale=scale)
