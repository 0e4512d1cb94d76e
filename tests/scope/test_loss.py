"""compute_loss against the float64 reference (tests/scope/problems.py): values, gradients and
metrics of SCOPE, its ablations and the baselines, padded and packed, at TP=1. The same checks at
TP=2 are in test_tensor_parallel.py."""
import math

import pytest
import torch

from scope_megatron.ops.reference import kl_reference
from scope_megatron.scope import RolloutBatch, ScopeConfig, compute_loss, rollout_weights
from tests.helpers import random_logits
from tests.scope.problems import (fresh_leaf, layout, make_batch, make_problem, reference_loss,
                                  sampled_kl_policy_gradient_loss, token_logprobs)

TIGHT = dict(rtol=1e-9, atol=1e-11)


def run(config, p, *, packed=False, remote=False, dtype=torch.float64, old_logprobs=None, **kw):
    """Our loss, metrics and student gradient ([B, L, V] layout); kw: more compute_loss arguments."""
    batch = make_batch(p, packed=packed, teacher_logprobs=remote)
    student = fresh_leaf(layout(p, p.student, packed), dtype)
    teacher = None if remote or config.algorithm == "grpo" else layout(p, p.teacher, packed).to(dtype)
    loss, metrics = compute_loss(config, batch, student, teacher_logits=teacher,
                                 vocab_size=p.vocab_size, **kw)
    loss.backward()
    grad = torch.zeros_like(p.student, dtype=dtype)
    if packed:
        grad[p.mask] = student.grad
    else:
        grad = student.grad
    return loss, metrics, grad


def reference(config, p):
    leaf = fresh_leaf(p.student)
    ref = reference_loss(config, p, leaf)
    ref["loss"].backward()
    ref["grad"] = leaf.grad
    return ref


def check_against_reference(config, p, tol=TIGHT, **kw):
    loss, metrics, grad = run(config, p, **kw)
    ref = reference(config, p)
    torch.testing.assert_close(loss.double(), ref["loss"].detach(), **tol)
    torch.testing.assert_close(grad.double(), ref["grad"], **tol)
    assert metrics["loss"] == pytest.approx(loss.item())
    return metrics, ref


ESTIMATORS = ["sampled", "k3", "full", "topk"]


def scope_config(estimator, **kw):
    if estimator == "topk":
        kw.setdefault("topk_k", 5)
    return ScopeConfig(kl_estimator=estimator, **kw)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_scope_matches_reference(estimator, packed, gen):
    check_against_reference(scope_config(estimator), make_problem(gen), packed=packed)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_mean_scale_tau_and_temperatures(estimator, gen):
    cfg = scope_config(estimator, normalize="mean", tau=0.5, student_temperature=0.7,
                       teacher_temperature=1.3)
    p = make_problem(gen, student_temperature=0.7, teacher_temperature=1.3)
    check_against_reference(cfg, p)


ABLATIONS = {
    "pure_routing": dict(student_path="uniform", teacher_path="uniform"),
    "student_weights_only": dict(teacher_path="uniform"),
    "teacher_weights_only": dict(student_path="uniform"),
    "flipped_directions": dict(flip_student_direction=True, flip_teacher_direction=True),
    "flipped_student_tau_3": dict(flip_student_direction=True, tau=3.0),
    "mle_path_only": dict(teacher_path="off"),
    "opd_path_only": dict(student_path="off"),
    "routing_off_weighted": dict(routing=False, student_path="off"),
    "routing_off_uniform_mean": dict(routing=False, student_path="off", teacher_path="uniform",
                                     normalize="mean"),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablations_match_reference(name, gen):
    estimator = ESTIMATORS[list(ABLATIONS).index(name) % 4]
    kw = dict(ABLATIONS[name])
    if kw.get("teacher_path") == "off":
        estimator = "full"  # no teacher path: the estimator fields must stay at their defaults
    check_against_reference(scope_config(estimator, **kw), make_problem(gen))


@pytest.mark.parametrize("estimator", ["sampled", "k3"])
def test_remote_teacher_logprobs(estimator, gen):
    """Teacher log-probs from the batch (a remote teacher) instead of teacher logits."""
    p = make_problem(gen, teacher_temperature=1.2)
    check_against_reference(scope_config(estimator, teacher_temperature=1.2), p, remote=True)


def test_padded_and_packed_agree_in_float32(gen):
    p = make_problem(gen)
    cfg = scope_config("full")
    a = run(cfg, p, dtype=torch.float32)
    b = run(cfg, p, dtype=torch.float32, packed=True)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-7)
    check_against_reference(cfg, p, tol=dict(rtol=1e-5, atol=1e-6), dtype=torch.float32)


# ---- the gradients the issue names ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_kl_gradient_is_autograd_of_float64_full_reverse_kl(dtype, gen):
    """Teacher path only: the gradient is that of sum_i w_i mean_t KL(p_S || p_T) / #groups, with
    the KL written out over the whole vocabulary in float64 (ops.reference.kl_reference)."""
    p = make_problem(gen)
    cfg = ScopeConfig(student_path="off", kl_estimator="full")
    loss, _, grad = run(cfg, p, dtype=dtype)
    w = reference(cfg, p)["w_tea"]
    leaf = fresh_leaf(p.student)
    kl = kl_reference(leaf, p.teacher.double(), vocab_size=p.vocab_size)
    per_rollout = (kl * p.mask).sum(-1) / p.mask.sum(-1)
    expected = (w * per_rollout).sum() / 5
    expected.backward()
    tol = TIGHT if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected.detach(), **tol)
    torch.testing.assert_close(grad.double(), leaf.grad, **tol)


@pytest.mark.parametrize("old_logprobs", ["rollout", "recomputed"])
def test_sampled_gradient_is_weighted_policy_gradient(old_logprobs, gen):
    """One update per batch (ratio 1): the gradient of the PPO-clip loss with advantage
    w_i (log p_T - log p_S_old) is the policy gradient of the sampled-token reverse KL,
    sum_i w_i mean_t (log p_S(y_t) - log p_T(y_t)) grad log p_S(y_t) / #groups."""
    p = make_problem(gen)
    cfg = ScopeConfig(student_path="off", kl_estimator="sampled", old_logprobs=old_logprobs)
    _, metrics, grad = run(cfg, p)
    ref = reference(cfg, p)
    leaf = fresh_leaf(p.student)
    sampled_kl_policy_gradient_loss(p, leaf, ref["w_tea"], ref["lpt"]).backward()
    torch.testing.assert_close(grad, leaf.grad, **TIGHT)
    assert leaf.grad.abs().max() > 1e-3  # the check is not vacuous
    assert metrics["clip_fraction"] == 0.0


def test_mle_gradient_is_weighted_nll_gradient(gen):
    p = make_problem(gen)
    cfg = ScopeConfig(teacher_path="off")
    loss, metrics, grad = run(cfg, p)
    w = reference(cfg, p)["w_stu"]
    leaf = fresh_leaf(p.student)
    lps = leaf[..., :p.vocab_size].log_softmax(-1).gather(-1, p.ids.unsqueeze(-1)).squeeze(-1)
    nll = -(lps * p.mask).sum(-1) / p.mask.sum(-1)
    expected = (w * nll).sum() / 5
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), **TIGHT)
    torch.testing.assert_close(grad, leaf.grad, **TIGHT)
    assert metrics["rollouts/teacher_path"] == 0


def test_sampled_clipping(gen):
    """Rollout-engine log-probs away from the trainer's: some ratios leave [0.8, 1.2]; value,
    gradient (zero through clipped tokens) and clip fraction follow the reference."""
    p = make_problem(gen, old_noise=0.4, length=10)
    cfg = ScopeConfig(kl_estimator="sampled")
    metrics, ref = check_against_reference(cfg, p)
    assert 0 < ref["clipped"] < ref["path_tokens"]
    assert metrics["clip_fraction"] == pytest.approx(ref["clipped"] / ref["path_tokens"])
    assert metrics["logprob_diff/max"] > 0.1


def test_ppo_clip_keeps_the_push_down_of_a_large_ratio():
    """A token the trainer rates far above the rollout engine (log-ratio 21) with a negative
    advantage: PPO selects the unclipped branch, -A r, whose gradient is -A r (not clipped to 0);
    only float32 overflow is guarded."""
    from scope_megatron.scope import ppo_clip_token_losses

    logprobs = torch.tensor([21.0, 0.1, 21.0], dtype=torch.float32, requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([-1.0, -1.0, 1.0])
    losses, clipped = ppo_clip_token_losses(logprobs, old, adv, 0.2)
    losses.sum().backward()
    r = math.exp(21.0)
    torch.testing.assert_close(losses.detach(), torch.tensor([r, math.exp(0.1), -1.2]), rtol=1e-6, atol=0)
    torch.testing.assert_close(logprobs.grad, torch.tensor([r, math.exp(0.1), 0.0]), rtol=1e-6, atol=0)
    assert clipped.tolist() == [False, False, True]
    # far past float32's exp range: finite, no NaN gradient
    big = torch.tensor([500.0], requires_grad=True)
    loss, _ = ppo_clip_token_losses(big, torch.zeros(1), torch.tensor([-1.0]), 0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(big.grad).all()


# ---- baselines -------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_opd_equals_scope_with_routing_off_and_uniform_weights(estimator, normalize, gen):
    p = make_problem(gen)
    extra = dict(topk_k=5) if estimator == "topk" else {}
    opd = run(ScopeConfig(algorithm="opd", kl_estimator=estimator, normalize=normalize, **extra), p,
              dtype=torch.float32)
    scope = run(ScopeConfig(routing=False, student_path="off", teacher_path="uniform",
                            kl_estimator=estimator, normalize=normalize, **extra), p,
                dtype=torch.float32)
    torch.testing.assert_close(opd[0], scope[0], rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(opd[2], scope[2], rtol=2e-7, atol=1e-8)
    assert opd[1]["rollouts/teacher_path"] == p.ids.shape[0]
    # and OPD is not the default SCOPE loss (the comparison can fail)
    default = run(scope_config(estimator), p, dtype=torch.float32)
    assert abs(default[0].item() - opd[0].item()) > 1e-4


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_opd_matches_reference(normalize, gen):
    check_against_reference(ScopeConfig(algorithm="opd", normalize=normalize), make_problem(gen))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_grpo_matches_reference(normalize, packed, gen):
    p = make_problem(gen, old_noise=0.3)
    metrics, ref = check_against_reference(ScopeConfig(algorithm="grpo", normalize=normalize), p,
                                           packed=packed)
    assert metrics["clip_fraction"] == pytest.approx(ref["clipped"] / ref["path_tokens"])
    assert metrics["rollouts/teacher_path"] == 0


def test_grpo_advantage_values():
    from scope_megatron.scope import grpo_advantages
    p = make_problem(torch.Generator().manual_seed(0), group_sizes=(4, 3, 1),
                     correct=[1, 0, 0, 1, 1, 1, 1, 0])
    adv = grpo_advantages(make_batch(p), torch.float64)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.5 / (std + 1e-6),
                0, 0, 0, 0]  # an all-correct group and a singleton carry no signal
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))


# ---- routing ----------------------------------------------------------------------------------------

def test_all_correct_group_gets_only_mle_and_all_wrong_only_opd(gen):
    p = make_problem(gen, group_sizes=(3, 4), correct=[1, 1, 1, 0, 0, 0, 0])
    cfg = ScopeConfig()
    loss, metrics, grad = run(cfg, p)
    ref = reference(cfg, p)
    torch.testing.assert_close(loss, ref["loss"].detach(), **TIGHT)
    assert metrics["groups/all_correct"] == 1 and metrics["groups/all_wrong"] == 1
    assert metrics["rollouts/student_path"] == 3 and metrics["rollouts/teacher_path"] == 4
    assert bool((ref["w_tea"][:3] == 0).all()) and bool((ref["w_stu"][3:] == 0).all())
    # group 0's loss does not depend on the teacher; group 1's is exactly its KL term
    p.teacher[:3] = torch.randn(p.teacher[:3].shape, generator=gen, dtype=p.teacher.dtype)
    loss2, _, grad2 = run(cfg, p)
    torch.testing.assert_close(loss2, loss, **TIGHT)
    torch.testing.assert_close(grad2, grad, **TIGHT)
    mle_only = run(ScopeConfig(teacher_path="off"), p)
    kl_only = run(ScopeConfig(student_path="off"), p)
    torch.testing.assert_close(mle_only[0] + kl_only[0], loss, **TIGHT)
    torch.testing.assert_close(mle_only[2][3:], torch.zeros_like(grad[3:]))
    torch.testing.assert_close(kl_only[2][:3], torch.zeros_like(grad[:3]))


def test_empty_responses_allowed_are_on_no_path(gen):
    """An allowed empty rollout contributes nothing: the loss equals that of the batch without
    it (its group keeps other rollouts on the same paths)."""
    p = make_problem(gen, group_sizes=(3, 3), correct=[1, 1, 0, 0, 0, 1])
    p.mask[1] = False
    p.mask[3] = False
    cfg = scope_config("k3")
    for packed in (False, True):
        batch = make_batch(p, packed=packed, allow_empty=True)
        student = fresh_leaf(layout(p, p.student, packed))
        loss, metrics = compute_loss(cfg, batch, student, teacher_logits=layout(p, p.teacher, packed),
                                     vocab_size=p.vocab_size)
        torch.testing.assert_close(loss, reference(cfg, p)["loss"].detach(), **TIGHT)
        assert metrics["rollouts/empty"] == 2
        assert metrics["rollouts/student_path"] == 2 and metrics["rollouts/teacher_path"] == 2
        keep = torch.tensor([0, 2, 4, 5])
        sub = make_problem(gen, group_sizes=(2, 2), correct=[1, 0, 0, 1])
        for name in ("ids", "mask", "student", "teacher", "old_logprobs", "teacher_logprobs"):
            setattr(sub, name, getattr(p, name)[keep])
        sub_loss = run(cfg, sub, packed=packed)[0]
        torch.testing.assert_close(loss, sub_loss, **TIGHT)


def test_padding_columns_do_not_matter(gen):
    """Logit columns >= vocab_size are excluded from every softmax (student and teacher)."""
    p = make_problem(gen)
    base = {e: run(scope_config(e), p)[:1] for e in ESTIMATORS}
    p.student[..., p.vocab_size:] = 1e4
    p.teacher[..., p.vocab_size:] = 1e4
    for e in ESTIMATORS:
        torch.testing.assert_close(run(scope_config(e), p)[0], base[e][0], **TIGHT)


# ---- top-k ------------------------------------------------------------------------------------------

def test_topk_with_the_whole_vocabulary_is_the_full_kl(gen):
    p = make_problem(gen)
    full = run(ScopeConfig(kl_estimator="full"), p)
    topk = run(ScopeConfig(kl_estimator="topk", topk_k=1000), p)  # capped at vocab_size
    torch.testing.assert_close(topk[0], full[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(topk[2], full[2], rtol=1e-7, atol=1e-9)


def test_topk_is_a_lower_bound_of_the_full_kl(gen):
    p = make_problem(gen)
    cfg = dict(student_path="off", teacher_path="uniform")
    full = run(ScopeConfig(kl_estimator="full", **cfg), p)[1]["kl/mean"]
    for k in (1, 4, 16):
        kl = run(ScopeConfig(kl_estimator="topk", topk_k=k, **cfg), p)[1]["kl/mean"]
        assert 0 <= kl <= full + 1e-12


# ---- metrics ------------------------------------------------------------------------------------------

def test_metrics(gen):
    p = make_problem(gen)
    cfg = ScopeConfig(kl_estimator="k3")
    metrics, ref = check_against_reference(cfg, p)
    stu, tea = ref["w_stu"] > 0, ref["w_tea"] > 0
    assert metrics["rollouts/total"] == 13 and metrics["rollouts/empty"] == 0
    assert metrics["rollouts/student_path"] == int(stu.sum())
    assert metrics["rollouts/teacher_path"] == int(tea.sum())
    assert metrics["groups/total"] == 5
    assert metrics["groups/all_correct"] == 2 and metrics["groups/all_wrong"] == 1
    assert metrics["reward/mean"] == pytest.approx(float(p.correct.double().mean()))
    log_ppl_s = -(ref["lps"].detach() * p.mask).sum(-1) / p.mask.sum(-1)
    log_ppl_t = -(ref["lpt"] * p.mask).sum(-1) / p.mask.sum(-1)
    for path, members, w in (("student_path", stu, ref["w_stu"]), ("teacher_path", tea, ref["w_tea"])):
        assert metrics[f"{path}/ppl_student"] == pytest.approx(float(log_ppl_s[members].exp().mean()))
        assert metrics[f"{path}/ppl_teacher"] == pytest.approx(float(log_ppl_t[members].exp().mean()))
        assert metrics[f"{path}/weight_max"] == pytest.approx(float(w.max()))
        entropies = []
        for g in range(5):
            wg = w[(p.group_ids == g) & members]
            if len(wg):
                entropies.append(float(-(wg * wg.log()).sum()))
        assert metrics[f"{path}/weight_entropy"] == pytest.approx(sum(entropies) / len(entropies))
    assert metrics["mle/mean"] == pytest.approx(float(ref["mle"][stu].mean()))
    assert metrics["kl/mean"] == pytest.approx(float(ref["kl"][tea].mean()))
    assert "clip_fraction" not in metrics
    assert all(isinstance(v, float) for v in metrics.values())


def test_uniform_weight_entropy_is_log_group_size(gen):
    p = make_problem(gen, group_sizes=(4, 2), correct=[0, 0, 0, 0, 0, 0])
    metrics = run(ScopeConfig(teacher_path="uniform"), p)[1]
    assert metrics["teacher_path/weight_entropy"] == pytest.approx((math.log(4) + math.log(2)) / 2)
    assert metrics["teacher_path/weight_max"] == pytest.approx(0.5)
    assert "student_path/ppl_student" not in metrics and "mle/mean" not in metrics


def test_rollout_logprobs_match_the_trainer_at_the_configured_temperature(gen):
    """The rollout engine's log-probs (here: the reference at T = 0.6) agree with the trainer's
    only when student_temperature is the same; the metric shows a mismatch otherwise."""
    p = make_problem(gen, student_temperature=0.6)
    same = run(ScopeConfig(student_temperature=0.6), p)[1]
    assert same["logprob_diff/max"] < 1e-9
    other = run(ScopeConfig(student_temperature=1.0), p)[1]
    assert other["logprob_diff/mean"] > 1e-2


def test_old_logprobs_at_the_sampling_temperature_are_compared_at_that_temperature(gen):
    """Sampling at 0.6 and training at 1: with old_logprobs_temperature the gap is measured at
    0.6 (against the float64 reference: ~0), and the loss and gradient do not change; a PPO
    ratio on those old log-probs is refused."""
    p = make_problem(gen, student_temperature=0.6)
    plain_loss, _, plain_grad = run(ScopeConfig(student_temperature=1.0), p)
    loss, metrics, grad = run(ScopeConfig(student_temperature=1.0), p, old_logprobs_temperature=0.6)
    assert metrics["logprob_diff/max"] < 1e-9
    assert torch.equal(loss, plain_loss) and torch.equal(grad, plain_grad)
    with pytest.raises(ValueError, match="PPO ratio would divide log-probs at student_temperature 1.0"):
        run(ScopeConfig(student_temperature=1.0, kl_estimator="sampled"), p, old_logprobs_temperature=0.6)
    run(ScopeConfig(student_temperature=1.0, kl_estimator="sampled", old_logprobs="recomputed"), p,
        old_logprobs_temperature=0.6)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="compute_loss: old_logprobs_temperature must be a finite number > 0"):
            run(ScopeConfig(student_temperature=1.0), p, old_logprobs_temperature=bad)


def test_teacher_temperature_defaults_to_student_temperature(gen):
    p = make_problem(gen, student_temperature=0.6, teacher_temperature=0.6)
    a = run(ScopeConfig(student_temperature=0.6), p)[0]
    b = run(ScopeConfig(student_temperature=0.6, teacher_temperature=0.6), p)[0]
    c = run(ScopeConfig(student_temperature=0.6, teacher_temperature=1.0), p)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert abs(a.item() - c.item()) > 1e-4


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bf16_logits(estimator, gen):
    """bf16 logits (accumulated in fp32 by the ops) stay within bf16 rounding of the float64
    reference computed on the same rounded logits."""
    p = make_problem(gen, dtype=torch.bfloat16)
    cfg = scope_config(estimator)
    loss, _, grad = run(cfg, p, dtype=torch.bfloat16)
    ref = reference(cfg, p)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref["loss"].detach(), rtol=1e-4, atol=1e-5)
    scale = float(ref["grad"].abs().max())
    torch.testing.assert_close(grad.double(), ref["grad"], rtol=1e-2, atol=1e-2 * scale)


def test_topk_with_peaked_logits_stays_finite(gen):
    """One-hot-like teachers put (almost) all mass on the top ids: the tail bucket is clamped
    to one ulp of mass instead of log(0)."""
    p = make_problem(gen)
    p.teacher = random_logits(p.teacher.shape, torch.float32, gen, kind="peaked").double()
    p.student = random_logits(p.student.shape, torch.float32, gen, kind="peaked").double()
    for k in (1, 3):
        loss, metrics, grad = run(ScopeConfig(kl_estimator="topk", topk_k=k), p, dtype=torch.float32)
        assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
        assert metrics["kl/mean"] >= 0


# ---- the fused full-vocabulary KL ---------------------------------------------------------------------

@pytest.mark.parametrize("loss_factor", [1.0, 5.0], ids=["loss", "loss_times_groups"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_full_kl_runs_fused_with_the_predicted_gradient(packed, loss_factor, gen, monkeypatch):
    """kl_estimator='full': compute_loss predicts the per-token gradient of the KL (loss_grad is
    what the caller backpropagates), the fused op computes KL and gradient in the forward, and
    backward uses it as is (no recompute warning); the result is the reference's."""
    import warnings

    from scope_megatron.ops import kl as kl_module

    calls = []
    real = kl_module.ops.kl_fused

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.scope_megatron, name)

        @staticmethod
        def kl_fused(*args):
            calls.append(args[2].clone())
            return real(*args)

    monkeypatch.setattr(kl_module, "ops", Spy())
    p = make_problem(gen)
    config = ScopeConfig(kl_estimator="full", fused_kl=True)
    batch = make_batch(p, packed=packed)
    student = fresh_leaf(layout(p, p.student, packed))
    groups = batch.num_groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = compute_loss(config, batch, student, teacher_logits=layout(p, p.teacher, packed),
                               vocab_size=p.vocab_size, loss_grad=groups if loss_factor != 1 else 1.0)
        (loss * (groups if loss_factor != 1 else 1)).backward()
    assert len(calls) == 1 and bool((calls[0] != 0).any())
    ref = reference(config, p)
    grad = torch.zeros_like(p.student)
    if packed:
        grad[p.mask] = student.grad
    else:
        grad = student.grad
    torch.testing.assert_close(loss.double(), ref["loss"].detach(), **TIGHT)
    torch.testing.assert_close(grad / (groups if loss_factor != 1 else 1), ref["grad"], **TIGHT)


def _renumbered(group_ids: torch.Tensor) -> torch.Tensor:
    return torch.unique(group_ids, return_inverse=True)[1]


@pytest.mark.parametrize("algorithm,estimator", [("scope", "sampled"), ("scope", "full"), ("scope", "topk"),
                                                 ("opd", "k3"), ("grpo", "full")])
def test_micro_batches_splitting_groups_with_weights_from_whole_groups_equal_the_whole_batch(
        algorithm, estimator, gen):
    """rollout_weights over whole groups, then compute_loss(weights=...) on micro-batches that cut
    groups (rows out of order): sum of loss x micro-batch groups / all groups and the gradient equal
    the whole batch's; without the given weights the same split gives another loss."""
    config = scope_config(estimator, algorithm=algorithm)
    p = make_problem(gen, group_sizes=(3, 1, 4, 2, 3))
    batch = make_batch(p)
    whole_loss, _, whole_grad = run(config, p)
    student_ppl = batch.log_perplexity(token_logprobs(p.student, p.ids, p.vocab_size, 1.0))
    teacher_ppl = batch.log_perplexity(p.teacher_logprobs)
    weights = rollout_weights(config, batch, student_ppl, teacher_ppl)
    # groups (3, 1, 4, 2, 3) are rows 0-2, 3, 4-7, 8-9, 10-12: every group but the singleton is cut
    chunks = ([0, 8, 10, 4, 5], [1, 9, 11, 6], [2, 3, 12, 7])
    total = torch.zeros((), dtype=torch.float64)
    grad, unweighted = torch.zeros_like(p.student), torch.zeros_like(p.student)
    for rows in map(torch.tensor, chunks):
        sub = RolloutBatch(p.ids[rows], _renumbered(p.group_ids[rows]), p.correct[rows], p.old_logprobs[rows],
                           response_mask=p.mask[rows])
        teacher = None if algorithm == "grpo" else p.teacher[rows]
        leaf = fresh_leaf(p.student[rows])
        loss, _ = compute_loss(config, sub, leaf, teacher_logits=teacher, vocab_size=p.vocab_size,
                               weights=weights.select(rows))
        part = loss * sub.num_groups / batch.num_groups
        part.backward()
        grad[rows] = leaf.grad
        total = total + part.detach()
        leaf = fresh_leaf(p.student[rows])
        alone, _ = compute_loss(config, sub, leaf, teacher_logits=teacher, vocab_size=p.vocab_size)
        (alone * sub.num_groups / batch.num_groups).backward()
        unweighted[rows] = leaf.grad
    torch.testing.assert_close(total, whole_loss.detach(), **TIGHT)
    torch.testing.assert_close(grad, whole_grad, **TIGHT)
    # the split matters: each micro-batch's own groups give other weights
    assert float((unweighted - whole_grad).abs().max()) > 1e-6, "the split changes no group's weights"
    with pytest.raises(ValueError, match=r"weights.student must be a \[5\] tensor"):
        compute_loss(config, make_batch(make_problem(gen, group_sizes=(2, 3))), p.student[:5],
                     teacher_logits=None if algorithm == "grpo" else p.teacher[:5], vocab_size=p.vocab_size,
                     weights=weights)
