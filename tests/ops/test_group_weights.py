"""group_normalized_weights: the paper's worked example, properties, bad input."""
import math

import pytest
import torch

from scope_megatron.ops import group_normalized_weights
from scope_megatron.ops.reference import group_normalized_weights_reference


def test_paper_worked_example():
    """Figure of arXiv 2604.10688 (tau = 1, "sum")."""
    ppl_s = torch.tensor([1.2, 2.6, 3.8], dtype=torch.float64)
    w = group_normalized_weights(ppl_s.log(), torch.zeros(3, dtype=torch.long),
                                 torch.ones(3, dtype=torch.bool), sign=+1)
    torch.testing.assert_close(w, torch.tensor([0.158, 0.342, 0.500], dtype=torch.float64),
                               atol=1e-3, rtol=0)
    ppl_t = torch.tensor([4.5, 2.9, 1.7], dtype=torch.float64)
    w = group_normalized_weights(ppl_t.log(), torch.zeros(3, dtype=torch.long),
                                 torch.ones(3, dtype=torch.bool), sign=-1)
    torch.testing.assert_close(w, torch.tensor([0.192, 0.298, 0.510], dtype=torch.float64),
                               atol=1e-3, rtol=0)


def _random_batch(gen, n=29, groups=6):
    log_ppl = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    group_ids = torch.randint(0, groups, (n,), generator=gen) * 7 + 100  # arbitrary, non-dense ids
    member = torch.rand(n, generator=gen) > 0.4
    return log_ppl, group_ids, member


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_and_properties(sign, normalize, tau, dtype, gen):
    log_ppl, group_ids, member = _random_batch(gen)
    w = group_normalized_weights(log_ppl.to(dtype), group_ids, member, sign=sign, tau=tau,
                                 normalize=normalize)
    ref = group_normalized_weights_reference(log_ppl, group_ids, member, sign=sign, tau=tau,
                                             normalize=normalize)
    assert w.dtype == dtype
    torch.testing.assert_close(w.double(), ref, rtol=1e-6, atol=1e-6)
    assert bool((w >= 0).all()) and bool((w[~member] == 0).all())
    for g in group_ids.unique():
        sel = (group_ids == g) & member
        if sel.any():
            target = 1.0 if normalize == "sum" else float(sel.sum())
            assert math.isclose(float(w[sel].sum()), target, rel_tol=1e-5)


def test_permutation_equivariance(gen):
    log_ppl, group_ids, member = _random_batch(gen)
    perm = torch.randperm(log_ppl.numel(), generator=gen)
    w = group_normalized_weights(log_ppl, group_ids, member, sign=1)
    wp = group_normalized_weights(log_ppl[perm], group_ids[perm], member[perm], sign=1)
    torch.testing.assert_close(wp, w[perm])


def test_large_tau_is_uniform_and_single_member_is_one(gen):
    log_ppl, group_ids, member = _random_batch(gen)
    w = group_normalized_weights(log_ppl, group_ids, member, sign=-1, tau=1e12)
    for g in group_ids.unique():
        sel = (group_ids == g) & member
        if sel.any():
            torch.testing.assert_close(w[sel], torch.full_like(w[sel], 1.0 / float(sel.sum())))
    w1 = group_normalized_weights(torch.tensor([5.0, 0.1]), torch.tensor([0, 1]),
                                  torch.tensor([True, True]), sign=1)
    torch.testing.assert_close(w1, torch.ones(2))


def test_extreme_perplexities_stay_finite():
    log_ppl = torch.tensor([1e4, -1e4, 0.0, 700.0], dtype=torch.float32)
    w = group_normalized_weights(log_ppl, torch.zeros(4, dtype=torch.long),
                                 torch.ones(4, dtype=torch.bool), sign=1)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("dtype,tau", [(torch.float32, 1e-2), (torch.float32, 1e-6), (torch.float32, 1e-37),
                                       (torch.float64, 1e-37), (torch.float64, 1e-307)])
def test_small_tau_is_one_hot_not_nan(tau, dtype):
    """A tiny tau makes each group's weight one-hot on its most (sign +1) or least (sign -1)
    perplex member. Scaled by 1/tau before the maximum is subtracted, log PPL 40 would overflow
    (40 / 1e-37 exceeds float32, 40 / 1e-307 float64) into inf - inf = NaN."""
    log_ppl = torch.tensor([40.0, 39.0, 0.5, 2.0, 7.0], dtype=dtype)
    group_ids = torch.tensor([0, 0, 1, 1, 1])
    member = torch.ones(5, dtype=torch.bool)
    w = group_normalized_weights(log_ppl, group_ids, member, sign=1, tau=tau)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0], dtype=dtype))
    w = group_normalized_weights(log_ppl, group_ids, member, sign=-1, tau=tau, normalize="mean")
    torch.testing.assert_close(w, torch.tensor([0.0, 2.0, 3.0, 0.0, 0.0], dtype=dtype))


def test_tau_whose_reciprocal_overflows_is_refused():
    with pytest.raises(ValueError, match="1/tau overflows torch.float32"):
        group_normalized_weights(torch.rand(3), torch.zeros(3, dtype=torch.long),
                                 torch.ones(3, dtype=torch.bool), sign=1, tau=1e-39)


def test_no_gradient_and_empty_input():
    log_ppl = torch.rand(4, dtype=torch.float64, requires_grad=True)
    w = group_normalized_weights(log_ppl, torch.zeros(4, dtype=torch.long),
                                 torch.ones(4, dtype=torch.bool), sign=1)
    assert not w.requires_grad
    empty = group_normalized_weights(torch.zeros(0), torch.zeros(0, dtype=torch.long),
                                     torch.zeros(0, dtype=torch.bool), sign=1)
    assert empty.shape == (0,)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(sign=2), ValueError, "sign must be"),
    (dict(sign=1, tau=0.0), ValueError, "tau must be"),
    (dict(sign=1, tau=float("inf")), ValueError, "tau must be"),
    (dict(sign=1, normalize="max"), ValueError, "normalize must be"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        group_normalized_weights(torch.rand(3), torch.zeros(3, dtype=torch.long),
                                 torch.ones(3, dtype=torch.bool), **kwargs)


def test_bad_tensors():
    ok = (torch.rand(3), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="member_mask must be a bool"):
        group_normalized_weights(ok[0], ok[1], torch.ones(3), sign=1)
    with pytest.raises(TypeError, match="group_ids must be an integer"):
        group_normalized_weights(ok[0], torch.zeros(3), ok[2], sign=1)
    with pytest.raises(TypeError, match="log_ppl must be a 1-D floating"):
        group_normalized_weights(torch.zeros(3, dtype=torch.long), ok[1], ok[2], sign=1)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        group_normalized_weights(torch.tensor([0.1, float("nan"), 0.2]), ok[1], ok[2], sign=1)
