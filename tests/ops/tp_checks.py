"""Tensor-parallel checks of the vocab-parallel ops, run inside real gloo process groups
(tests/distributed.py) and reported per check by test_tensor_parallel.py.

Every rank builds the same full-vocabulary tensors from the run's seed, passes its own shard
(rank r: columns [r * V_local, (r + 1) * V_local)) and compares the replicated result and its
shard's gradient with the float64 reference on the full tensors. A gradient scaled by the TP
size, or missing a cross-shard term, fails these comparisons.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob
from scope_megatron.ops._library import acc_dtype
from scope_megatron.ops.reference import kl_reference, logprob_reference
from tests.distributed import run_checks
from tests.helpers import assert_grad_close, random_logits, value_tolerance

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class Shards:
    """The TP layout of one check: which group, this rank's position, the shard slice."""

    def __init__(self, group, local_vocab):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.local_vocab = local_vocab
        self.cols = slice(self.rank * local_vocab, (self.rank + 1) * local_vocab)

    def local(self, full: torch.Tensor) -> torch.Tensor:
        return full[..., self.cols].contiguous()


def _gen(ctx, salt):
    return torch.Generator().manual_seed(ctx.seed * 7919 + salt)


def check_logprob(ctx, dtype, *, group=None, salt=0, rows=19, local_vocab=131, pad=50,
                  temperature=0.7, kind="normal", error_check="forward"):
    shards = Shards(group or dist.group.WORLD, local_vocab)
    gen = _gen(ctx, salt)
    vocab = shards.size * local_vocab
    vocab_size = vocab - pad
    full = random_logits((rows, vocab), dtype, gen, kind=kind)
    target = torch.randint(0, vocab_size, (rows,), generator=gen)
    weights = torch.randn(rows, dtype=torch.float64, generator=gen)

    leaf = shards.local(full).requires_grad_()
    out = vocab_parallel_logprob(leaf, target, tp_group=shards.group, vocab_size=vocab_size,
                                 temperature=temperature, error_check=error_check)
    (out * weights.to(out.dtype)).sum().backward()

    ref_leaf = full.double().requires_grad_()
    ref = logprob_reference(ref_leaf, target, vocab_size=vocab_size, temperature=temperature)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out.double(), ref, **value_tolerance(dtype))
    assert_grad_close(leaf.grad, shards.local(ref_leaf.grad), dtype)
    return out


def check_kl(ctx, dtype, direction, *, group=None, salt=0, rows=19, local_vocab=131, pad=50,
             kind="normal", temperatures=(0.8, 1.2), expected_grad=False, error_check="forward"):
    """expected_grad: pass the upstream weights as vocab_parallel_kl's expected_grad (ignored
    under tensor parallelism: the result must be the same, without a recompute warning)."""
    shards = Shards(group or dist.group.WORLD, local_vocab)
    gen = _gen(ctx, salt)
    vocab = shards.size * local_vocab
    vocab_size = vocab - pad
    student = random_logits((rows, vocab), dtype, gen, kind=kind)
    teacher = random_logits((rows, vocab), dtype, gen, kind=kind)
    weights = torch.randn(rows, dtype=torch.float64, generator=gen)
    kw = dict(vocab_size=vocab_size, direction=direction, student_temperature=temperatures[0],
              teacher_temperature=temperatures[1])
    op_kw = dict(error_check=error_check)

    leaf = shards.local(student).requires_grad_()
    if expected_grad:
        kw_fused = dict(kw, expected_grad=weights.to(acc_dtype(dtype)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = vocab_parallel_kl(leaf, shards.local(teacher), tp_group=shards.group, **kw_fused, **op_kw)
            (out * weights.to(out.dtype)).sum().backward()
    else:
        out = vocab_parallel_kl(leaf, shards.local(teacher), tp_group=shards.group, **kw, **op_kw)
        (out * weights.to(out.dtype)).sum().backward()

    ref_leaf = student.double().requires_grad_()
    ref = kl_reference(ref_leaf, teacher.double(), **kw)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out.double(), ref, **value_tolerance(dtype))
    scale = float(max(student.double().abs().max(), teacher.double().abs().max()))
    assert_grad_close(leaf.grad, shards.local(ref_leaf.grad), dtype,
                      logit_scale=scale if direction == "reverse" else 0.0)
    return out


def check_tp_equals_single_shard(ctx):
    """The sharded fp32 result equals the single-shard kernel on the gathered logits up to fp32
    rounding (only the order of the merges differs)."""
    for direction in ("reverse", "forward"):
        gen = _gen(ctx, 11)
        shards = Shards(dist.group.WORLD, 1500)
        student = random_logits((23, shards.size * 1500), torch.float32, gen)
        teacher = random_logits((23, shards.size * 1500), torch.float32, gen)
        sharded = vocab_parallel_kl(shards.local(student), shards.local(teacher), direction=direction,
                                    tp_group=shards.group, vocab_size=student.shape[1] - 7)
        single = vocab_parallel_kl(student, teacher, direction=direction, tp_group=None,
                                   vocab_size=student.shape[1] - 7)
        torch.testing.assert_close(sharded, single, rtol=2e-6, atol=2e-6)
    target = torch.randint(0, student.shape[1], (23,), generator=gen)
    torch.testing.assert_close(
        vocab_parallel_logprob(shards.local(student), target, tp_group=shards.group),
        vocab_parallel_logprob(student, target, tp_group=None), rtol=2e-6, atol=2e-6)


def check_fully_padded_shards(ctx):
    """Shards that hold only padding columns take part in nothing (and do not produce NaN)."""
    local_vocab = 64
    size = ctx.world_size
    pad = (size - 1) * local_vocab + 3 if size > 1 else 3  # only rank 0 has real columns
    check_logprob(ctx, torch.float32, salt=21, local_vocab=local_vocab, pad=pad)
    check_kl(ctx, torch.float32, "reverse", salt=22, local_vocab=local_vocab, pad=pad)


def check_megatron_layout(ctx):
    """[s, b, V/tp] logits, as Megatron's output layer returns them."""
    gen = _gen(ctx, 31)
    shards = Shards(dist.group.WORLD, 97)
    full_s = random_logits((5, 3, shards.size * 97), torch.float32, gen)
    full_t = random_logits((5, 3, shards.size * 97), torch.float32, gen)
    target = torch.randint(0, shards.size * 97, (5, 3), generator=gen)
    kl = vocab_parallel_kl(shards.local(full_s), shards.local(full_t), tp_group=shards.group)
    lp = vocab_parallel_logprob(shards.local(full_s), target, tp_group=shards.group)
    assert kl.shape == (5, 3) and lp.shape == (5, 3)
    torch.testing.assert_close(kl.double(), kl_reference(full_s.double(), full_t.double()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.double(), logprob_reference(full_s.double(), target), rtol=1e-5, atol=1e-5)


class _ToShard(torch.autograd.Function):
    """Full-vocabulary tensor -> this rank's shard; backward all-gathers the shard gradients
    (the role Megatron's output layer plays around the op). Makes the op a function of the full
    tensor, which finite differences can check on every rank at once."""

    @staticmethod
    def forward(ctx, full, shards):
        ctx.shards = shards
        return shards.local(full)

    @staticmethod
    def backward(ctx, grad):
        shards = ctx.shards
        parts = [torch.empty_like(grad) for _ in range(shards.size)]
        dist.all_gather(parts, grad.contiguous(), group=shards.group)
        return torch.cat(parts, dim=-1), None


def check_gradcheck(ctx):
    gen = _gen(ctx, 41)
    shards = Shards(dist.group.WORLD, 7)
    vocab = shards.size * 7
    student = random_logits((3, vocab), torch.float64, gen).requires_grad_()
    teacher = random_logits((3, vocab), torch.float64, gen)
    target = torch.randint(0, vocab - 2, (3,), generator=gen)
    for direction in ("reverse", "forward"):
        assert torch.autograd.gradcheck(
            lambda x: vocab_parallel_kl(_ToShard.apply(x, shards), shards.local(teacher),
                                        tp_group=shards.group, vocab_size=vocab - 2,
                                        direction=direction, student_temperature=0.9), (student,))
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprob(_ToShard.apply(x, shards), target, tp_group=shards.group,
                                         vocab_size=vocab - 2, temperature=1.3), (student,))


def check_nan_raises_on_every_rank(ctx):
    """NaN in one rank's shard: every rank raises the same error (nobody waits in a collective),
    and the group keeps working afterwards."""
    gen = _gen(ctx, 51)
    shards = Shards(dist.group.WORLD, 40)
    student = random_logits((6, shards.size * 40), torch.float32, gen)
    teacher = random_logits((6, shards.size * 40), torch.float32, gen)
    bad = student.clone()
    bad[4, shards.size * 40 - 1] = float("nan")  # in the last rank's shard
    for fn in (lambda s: vocab_parallel_kl(s, shards.local(teacher), tp_group=shards.group),
               lambda s: vocab_parallel_logprob(s, torch.zeros(6, dtype=torch.long), tp_group=shards.group)):
        try:
            fn(shards.local(bad))
        except FloatingPointError as exc:
            assert "flattened token 4" in str(exc), str(exc)
        else:
            raise AssertionError("NaN logits were not reported on rank %d" % ctx.rank)
        assert torch.isfinite(fn(shards.local(student))).all()
    # error_check="backward": the forward returns (NaN on token 4 everywhere), every rank's
    # backward raises; backward has no collective, so nobody is left waiting either
    for fn in (lambda s: vocab_parallel_kl(s, shards.local(teacher), tp_group=shards.group,
                                           error_check="backward"),
               lambda s: vocab_parallel_logprob(s, torch.zeros(6, dtype=torch.long), tp_group=shards.group,
                                                error_check="backward")):
        out = fn(shards.local(bad).requires_grad_())
        assert torch.isnan(out[4]) and torch.isfinite(out[:4]).all(), out
        try:
            out.sum().backward()
        except FloatingPointError as exc:
            assert "flattened token 4" in str(exc), str(exc)
        else:
            raise AssertionError("NaN logits were not reported in backward on rank %d" % ctx.rank)


def check_unequal_shards_are_an_error(ctx):
    """A rank passing a shard of another width breaks Megatron's equal partition: the targets in
    the gap are owned by no shard, which every rank reports."""
    widths = [50 + 10 * r for r in range(ctx.world_size)]
    logits = torch.randn(4, widths[ctx.rank], generator=_gen(ctx, 61))
    target = torch.full((4,), 55, dtype=torch.long)  # rank 1 believes it starts at 60
    try:
        vocab_parallel_logprob(logits, target, tp_group=dist.group.WORLD, vocab_size=56)
    except ValueError as exc:
        assert "owned by no vocabulary shard" in str(exc), str(exc)
    else:
        raise AssertionError("unequal shards were not reported")


def check_explicit_subgroups(ctx):
    """World of 4 split into two TP=2 groups with different data: each op uses the group it is
    given (using the world group instead would mix the two problems)."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[ctx.rank // 2]
    check_kl(ctx, torch.float32, "reverse", group=mine, salt=71 + ctx.rank // 2)
    check_logprob(ctx, torch.bfloat16, group=mine, salt=73 + ctx.rank // 2)


def check_megatron_default_group(ctx):
    """With Megatron's parallel state initialized (TP=2, DP=2), tp_group=None means Megatron's
    tensor-model-parallel group; an explicit group still wins."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        tp_group = parallel_state.get_tensor_model_parallel_group()
        assert dist.get_world_size(tp_group) == 2
        dp = parallel_state.get_data_parallel_rank()
        gen = _gen(ctx, 81 + dp)
        shards = Shards(tp_group, 90)
        student = random_logits((7, 180), torch.float32, gen)
        teacher = random_logits((7, 180), torch.float32, gen)
        out = vocab_parallel_kl(shards.local(student), shards.local(teacher))  # default group
        torch.testing.assert_close(out.double(), kl_reference(student.double(), teacher.double()),
                                   rtol=1e-5, atol=1e-5)
        solo = vocab_parallel_kl(student, teacher, tp_group=dist.new_group([ctx.rank]))
        torch.testing.assert_close(solo, out, rtol=2e-6, atol=2e-6)
    finally:
        parallel_state.destroy_model_parallel()


def checks_for(world_size: int) -> dict:
    checks = {}
    for name, dtype in DTYPES.items():
        checks[f"logprob_{name}"] = lambda ctx, d=dtype: check_logprob(ctx, d, salt=1)
        for direction in ("reverse", "forward"):
            checks[f"kl_{direction}_{name}"] = lambda ctx, d=dtype, r=direction: check_kl(ctx, d, r, salt=2)
    checks["kl_multi_chunk_shards_bf16"] = lambda ctx: check_kl(ctx, torch.bfloat16, "reverse", salt=3,
                                                                rows=5, local_vocab=2500, pad=1200)
    for kind in ("extreme", "peaked"):
        checks[f"logprob_{kind}_logits"] = lambda ctx, k=kind: check_logprob(ctx, torch.float32, salt=4, kind=k)
        checks[f"kl_{kind}_logits"] = lambda ctx, k=kind: check_kl(ctx, torch.float32, "reverse", salt=5, kind=k)
    checks["kl_expected_grad_bf16"] = lambda ctx: check_kl(ctx, torch.bfloat16, "reverse", salt=6,
                                                           expected_grad=True)
    checks["kl_error_check_backward_bf16"] = lambda ctx: check_kl(ctx, torch.bfloat16, "reverse", salt=7,
                                                                  error_check="backward")
    checks["logprob_error_check_backward_bf16"] = lambda ctx: check_logprob(ctx, torch.bfloat16, salt=8,
                                                                            error_check="backward")
    checks["tp_equals_single_shard_fp32"] = check_tp_equals_single_shard
    checks["fully_padded_shards"] = check_fully_padded_shards
    checks["megatron_sbv_layout"] = check_megatron_layout
    checks["gradcheck_float64"] = check_gradcheck
    checks["nan_raises_on_every_rank"] = check_nan_raises_on_every_rank
    checks["unequal_shards_are_an_error"] = check_unequal_shards_are_an_error
    if world_size == 4:
        checks["explicit_subgroups"] = check_explicit_subgroups
        checks["megatron_default_group"] = check_megatron_default_group
    return checks


def run(ctx) -> dict:
    """Runs every check for this world size; returns {check: None or the error text}."""
    return run_checks(checks_for(ctx.world_size), ctx)
