"""compute_loss at TP = 2 in real gloo process groups (tests/distributed.py), reported per check by
test_tensor_parallel.py.

Every rank builds the same problem from the run's seed, passes its own vocabulary shard of the
student and teacher logits (rank r: columns [r * V_local, (r + 1) * V_local)), and compares the
replicated loss with the float64 reference on the full logits and its shard's gradient with the
matching slice of the reference gradient. A gradient scaled by the TP size, a top-k chosen per
shard instead of globally, or a normalizer missing another shard's mass fails these checks.
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from scope_megatron.ops import vocab_parallel_logprob
from scope_megatron.scope import ScopeConfig, compute_loss, teacher_top_k
from scope_megatron.scope._tp import resolve_tp
from scope_megatron.scope.topk import topk_reverse_kl, topk_reverse_kl_given
from tests.distributed import run_checks
from tests.scope.problems import (fresh_leaf, layout, make_batch, make_problem, reference_loss,
                                  sampled_kl_policy_gradient_loss, served_topk_batch)

GROUP = None  # dist.group.WORLD, set in run()


def _shard(ctx, t: torch.Tensor) -> torch.Tensor:
    local = t.shape[-1] // ctx.world_size
    return t[..., ctx.rank * local:(ctx.rank + 1) * local].contiguous()


def _problem(ctx, salt, **kw):
    return make_problem(torch.Generator().manual_seed(ctx.seed * 7919 + salt), **kw)


def _run(ctx, config, p, *, dtype=torch.float64, packed=False, tp=True):
    """Loss, metrics and the student gradient in the [B, L, V_local] layout, on this rank's shard
    (tp=True) or on the whole vocabulary without tensor parallelism (tp=False)."""
    cut = (lambda t: _shard(ctx, t)) if tp else (lambda t: t)
    student = fresh_leaf(layout(p, cut(p.student), packed), dtype)
    teacher = None if config.algorithm == "grpo" else layout(p, cut(p.teacher), packed).to(dtype)
    loss, metrics = compute_loss(config, make_batch(p, packed=packed), student,
                                 teacher_logits=teacher, tp_group=GROUP if tp else None,
                                 vocab_size=p.vocab_size)
    loss.backward()
    grad = torch.zeros_like(cut(p.student), dtype=dtype)
    if packed:
        grad[p.mask] = student.grad
    else:
        grad = student.grad
    return loss, metrics, grad


def check_reference(ctx, config, *, salt, dtype=torch.float64, packed=False, **problem):
    p = _problem(ctx, salt, **problem)
    loss, metrics, grad = _run(ctx, config, p, dtype=dtype, packed=packed)
    leaf = fresh_leaf(p.student)
    ref = reference_loss(config, p, leaf)
    ref["loss"].backward()
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref["loss"].detach(), **tol)
    torch.testing.assert_close(grad.double(), _shard(ctx, leaf.grad), **tol)
    # every metric equals the single-shard run's (replicated, no TP-size factors); in float32 to the
    # loss's tolerance (the top-k tail's log(1 - sum p) amplifies rounding: 1.6e-6 seen at 1e-6)
    single = _run(ctx, config, p, dtype=dtype, packed=packed, tp=False)[1]
    assert metrics.keys() == single.keys(), (metrics.keys(), single.keys())
    rtol = 1e-6 if dtype == torch.float64 else 1e-5
    for key, value in metrics.items():
        assert abs(value - single[key]) <= rtol * max(1.0, abs(value)), (key, value, single[key])
    return metrics, ref


def check_sampled_is_weighted_policy_gradient(ctx):
    p = _problem(ctx, 21)
    cfg = ScopeConfig(student_path="off", kl_estimator="sampled")
    _, _, grad = _run(ctx, cfg, p)
    ref = reference_loss(cfg, p, fresh_leaf(p.student))
    leaf = fresh_leaf(p.student)
    sampled_kl_policy_gradient_loss(p, leaf, ref["w_tea"], ref["lpt"]).backward()
    torch.testing.assert_close(grad, _shard(ctx, leaf.grad), rtol=1e-9, atol=1e-11)


def check_topk_whole_vocabulary_is_full(ctx):
    p = _problem(ctx, 31)
    full = _run(ctx, ScopeConfig(kl_estimator="full"), p)
    topk = _run(ctx, ScopeConfig(kl_estimator="topk", topk_k=10_000), p)
    torch.testing.assert_close(topk[0], full[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(topk[2], full[2], rtol=1e-7, atol=1e-9)


def check_opd_equals_scope_routing_off(ctx):
    p = _problem(ctx, 41)
    for estimator in ("sampled", "k3", "full", "topk"):
        extra = {"topk_k": 5} if estimator == "topk" else {}
        opd = _run(ctx, ScopeConfig(algorithm="opd", kl_estimator=estimator, **extra), p,
                   dtype=torch.float32)
        scope = _run(ctx, ScopeConfig(routing=False, student_path="off", teacher_path="uniform",
                                      kl_estimator=estimator, **extra), p, dtype=torch.float32)
        torch.testing.assert_close(opd[0], scope[0], rtol=2e-7, atol=1e-7)
        torch.testing.assert_close(opd[2], scope[2], rtol=2e-7, atol=1e-8)


def check_served_topk(ctx, *, salt, k, packed=False, algorithm="scope", **problem):
    """The top-k estimator from a served teacher's top-k ids and log-probs (no teacher logits) on
    this rank's student shard: loss and shard gradient equal the float64 reference of top-k KL
    from the teacher's logits."""
    p = _problem(ctx, salt, **problem)
    config = ScopeConfig(algorithm=algorithm, kl_estimator="topk", topk_k=k)
    student = fresh_leaf(layout(p, _shard(ctx, p.student), packed))
    loss, _ = compute_loss(config, served_topk_batch(p, k, packed=packed), student, tp_group=GROUP,
                           vocab_size=p.vocab_size)
    loss.backward()
    grad = torch.zeros_like(_shard(ctx, p.student))
    if packed:
        grad[p.mask] = student.grad
    else:
        grad = student.grad
    leaf = fresh_leaf(p.student)
    ref = reference_loss(config, p, leaf)
    ref["loss"].backward()
    torch.testing.assert_close(loss, ref["loss"].detach(), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grad, _shard(ctx, leaf.grad), rtol=1e-9, atol=1e-11)


def check_teacher_top_k(ctx, *, salt, k, pad):
    """teacher_top_k on this rank's teacher shard equals the float64 log-softmax top-k of the whole
    (unpadded) vocabulary, and with topk_reverse_kl_given gives exactly topk_reverse_kl's KL;
    topk_reverse_kl itself costs one all-gather (the teacher's candidates and its logit of the
    sampled token) and one all-reduce (the student's logits at the chosen ids)."""
    p = _problem(ctx, salt, pad=pad, teacher_temperature=1.3)
    ts, tt = 0.7, 1.3
    teacher = _shard(ctx, p.teacher)
    ids, lps = teacher_top_k(teacher, p.ids, p.teacher_logprobs, k=k, vocab_size=p.vocab_size,
                             teacher_temperature=tt, tp_group=GROUP, dtype=torch.float64)
    ref_values, ref_ids = torch.log_softmax(p.teacher[..., :p.vocab_size].double() / tt, -1).topk(k)
    assert torch.equal(ids, ref_ids), "teacher_top_k: ids differ from the reference"
    torch.testing.assert_close(lps, ref_values, rtol=1e-12, atol=1e-12)

    tp = resolve_tp(GROUP)
    student = fresh_leaf(_shard(ctx, p.student))
    student_lp = vocab_parallel_logprob(student, p.ids, tp_group=GROUP, vocab_size=p.vocab_size,
                                        temperature=ts)
    given = topk_reverse_kl_given(student, ids, lps, p.ids, student_lp, tp=tp, student_temperature=ts)
    calls = {"all_reduce": 0, "all_gather": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in calls:
            setattr(dist, name, counting(name))
        kl = topk_reverse_kl(student, teacher, p.ids, student_lp, p.teacher_logprobs, k=k, tp=tp,
                             vocab_size=p.vocab_size, student_temperature=ts, teacher_temperature=tt)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert calls == {"all_reduce": 1, "all_gather": 1}, f"topk_reverse_kl's collectives: {calls}"
    torch.testing.assert_close(given, kl, rtol=0, atol=0)


def check_nan_on_one_shard_raises_on_every_rank(ctx):
    """NaN logits in rank 1's shard: rank 1 names the rollout, rank 0 points at another rank's
    shard; neither hangs in a collective, and the group keeps working."""
    p = _problem(ctx, 51, group_sizes=(2, 2), correct=[1, 0, 0, 1])
    p.mask[:] = True
    p.student[2, 1, p.student.shape[-1] - 8] = float("nan")  # in the last rank's real columns
    try:
        _run(ctx, ScopeConfig(), p)
    except FloatingPointError as exc:
        expected = ("rollout 2 (group 1, incorrect), response token 1" if ctx.rank == ctx.world_size - 1
                    else "another tensor-parallel rank's shard")
        assert expected in str(exc), str(exc)
    else:
        raise AssertionError(f"NaN logits were not reported on rank {ctx.rank}")
    p.student[2, 1] = 0.0
    assert torch.isfinite(_run(ctx, ScopeConfig(), p)[0])


def checks() -> dict:
    out = {}
    for estimator in ("sampled", "k3", "full", "topk"):
        extra = {"topk_k": 6} if estimator == "topk" else {}
        out[f"scope_{estimator}_fp64"] = lambda ctx, e=estimator, x=extra: check_reference(
            ctx, ScopeConfig(kl_estimator=e, **x), salt=1)
        out[f"scope_{estimator}_packed_mean_tau_temperatures"] = lambda ctx, e=estimator, x=extra: \
            check_reference(ctx, ScopeConfig(kl_estimator=e, normalize="mean", tau=0.5,
                                             student_temperature=0.7, teacher_temperature=1.3, **x),
                            salt=2, packed=True, student_temperature=0.7, teacher_temperature=1.3)
    out["full_fp32"] = lambda ctx: check_reference(ctx, ScopeConfig(), salt=3, dtype=torch.float32)
    # fused_kl under tensor parallelism: the predicted gradient is ignored, the result unchanged
    out["full_fused_kl_fp32"] = lambda ctx: check_reference(ctx, ScopeConfig(fused_kl=True), salt=3,
                                                            dtype=torch.float32)
    out["topk_fp32"] = lambda ctx: check_reference(ctx, ScopeConfig(kl_estimator="topk", topk_k=4),
                                                   salt=4, dtype=torch.float32)
    # rank 1 holds 4 real columns and 20 padding ones: top-k must come from both shards
    out["topk_padded_vocabulary"] = lambda ctx: check_reference(
        ctx, ScopeConfig(kl_estimator="topk", topk_k=9), salt=5, pad=20)
    out["sampled_clipped"] = lambda ctx: check_reference(
        ctx, ScopeConfig(kl_estimator="sampled"), salt=6, old_noise=0.4, length=10)
    out["mle_path_gradient"] = lambda ctx: check_reference(ctx, ScopeConfig(teacher_path="off"), salt=7)
    out["opd"] = lambda ctx: check_reference(ctx, ScopeConfig(algorithm="opd", kl_estimator="k3"), salt=8)
    out["grpo"] = lambda ctx: check_reference(ctx, ScopeConfig(algorithm="grpo"), salt=9, old_noise=0.3)
    out["sampled_is_weighted_policy_gradient"] = check_sampled_is_weighted_policy_gradient
    out["topk_whole_vocabulary_is_full"] = check_topk_whole_vocabulary_is_full
    out["served_topk"] = lambda ctx: check_served_topk(ctx, salt=10, k=6)
    # rank 1 holds 4 real columns and 20 padding ones; packed layout; OPD (every rollout distilled)
    out["served_topk_padded_packed_opd"] = lambda ctx: check_served_topk(ctx, salt=11, k=9, packed=True,
                                                                         algorithm="opd", pad=20)
    out["opd_equals_scope_routing_off"] = check_opd_equals_scope_routing_off
    # rank 1 holds 4 real columns and 20 padding ones
    out["teacher_top_k_padded"] = lambda ctx: check_teacher_top_k(ctx, salt=12, k=9, pad=20)
    out["nan_on_one_shard_raises_on_every_rank"] = check_nan_on_one_shard_raises_on_every_rank
    return out


def run(ctx) -> dict:
    """Runs every check; returns {check: None or the error text}."""
    global GROUP
    GROUP = dist.group.WORLD
    return run_checks(checks(), ctx)
