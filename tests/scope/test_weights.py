"""Dual-path weights: the paper's worked example and the properties of the spec."""
import math

import pytest
import torch

from scope_megatron.scope import (RolloutBatch, ScopeConfig, dual_path_weights, path_members,
                                  uniform_group_weights)


def rollouts(group_ids, correct, lengths=None):
    """A batch whose only content that matters is the grouping and correctness."""
    group_ids = torch.as_tensor(group_ids)
    b = group_ids.numel()
    lengths = torch.ones(b, dtype=torch.long) if lengths is None else torch.as_tensor(lengths)
    mask = torch.arange(2).unsqueeze(0) < lengths.unsqueeze(1)
    return RolloutBatch(torch.zeros(b, 2, dtype=torch.long), group_ids,
                        torch.as_tensor(correct, dtype=torch.bool), torch.zeros(b, 2),
                        response_mask=mask, allow_empty_responses=True)


def test_paper_worked_example():
    """Figure of arXiv 2604.10688, tau = 1, "sum": student PPL 1.2, 2.6, 3.8 on the correct
    rollouts, teacher PPL 4.5, 2.9, 1.7 on the incorrect ones."""
    batch = rollouts([0] * 6, [1, 1, 1, 0, 0, 0])
    nan = float("nan")  # values off a path are never read
    ppl_s = torch.tensor([1.2, 2.6, 3.8, nan, nan, nan], dtype=torch.float64)
    ppl_t = torch.tensor([nan, nan, nan, 4.5, 2.9, 1.7], dtype=torch.float64)
    w = dual_path_weights(ScopeConfig(), batch, ppl_s.log(), ppl_t.log())
    torch.testing.assert_close(w.student, torch.tensor([0.158, 0.342, 0.500, 0, 0, 0],
                                                       dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(w.teacher, torch.tensor([0, 0, 0, 0.192, 0.298, 0.510],
                                                       dtype=torch.float64), atol=1e-3, rtol=0)
    mean = dual_path_weights(ScopeConfig(normalize="mean"), batch, ppl_s.log(), ppl_t.log())
    torch.testing.assert_close(mean.student, 3 * w.student)
    torch.testing.assert_close(mean.teacher, 3 * w.teacher)


def random_case(gen, groups=6):
    sizes = torch.randint(1, 7, (groups,), generator=gen)  # unequal sizes, singletons included
    group_ids = torch.repeat_interleave(torch.arange(groups), sizes)
    perm = torch.randperm(group_ids.numel(), generator=gen)  # groups interleaved in the batch
    group_ids = group_ids[perm]
    b = group_ids.numel()
    correct = torch.rand(b, generator=gen) > 0.5
    log_ppl_s = torch.rand(b, generator=gen, dtype=torch.float64) * 2
    log_ppl_t = torch.rand(b, generator=gen, dtype=torch.float64) * 2
    return rollouts(group_ids, correct), log_ppl_s, log_ppl_t


def paper_weights(batch, log_ppl, members, sign, tau, normalize):
    """The spec's formula, PPL^(sign/tau) / sum over the group's members, written directly."""
    out = torch.zeros_like(log_ppl)
    for g in range(batch.num_groups):
        sel = (batch.group_ids == g) & members
        if sel.any():
            powered = log_ppl[sel].exp() ** (sign / tau)
            out[sel] = powered / powered.sum() * (int(sel.sum()) if normalize == "mean" else 1)
    return out


@pytest.mark.parametrize("flip", [False, True], ids=["paper", "flipped"])
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_properties(normalize, tau, flip, gen):
    batch, ls, lt = random_case(gen)
    cfg = ScopeConfig(normalize=normalize, tau=tau, flip_student_direction=flip,
                      flip_teacher_direction=flip)
    w = dual_path_weights(cfg, batch, ls, lt)
    torch.testing.assert_close(w.student_members, batch.correct)
    torch.testing.assert_close(w.teacher_members, ~batch.correct)
    s_sign, t_sign = (-1, 1) if flip else (1, -1)
    torch.testing.assert_close(w.student, paper_weights(batch, ls, batch.correct, s_sign, tau, normalize))
    torch.testing.assert_close(w.teacher, paper_weights(batch, lt, ~batch.correct, t_sign, tau, normalize))
    for weights, members in ((w.student, batch.correct), (w.teacher, ~batch.correct)):
        assert bool((weights >= 0).all()) and bool((weights[~members] == 0).all())
        for g in range(batch.num_groups):
            sel = (batch.group_ids == g) & members
            if sel.any():
                total = float(weights[sel].sum())
                expected = 1.0 if normalize == "sum" else float(sel.sum())
                assert math.isclose(total, expected, rel_tol=1e-9), (g, total, expected)


def test_direction_follows_the_paper(gen):
    """Student weight grows with PPL_S; teacher weight shrinks with PPL_T; flips invert both."""
    batch = rollouts([0] * 6, [1, 1, 1, 0, 0, 0])
    ppl = torch.tensor([1.5, 2.0, 3.0, 1.5, 2.0, 3.0], dtype=torch.float64).log()
    w = dual_path_weights(ScopeConfig(), batch, ppl, ppl)
    assert w.student[0] < w.student[1] < w.student[2]
    assert w.teacher[3] > w.teacher[4] > w.teacher[5]
    f = dual_path_weights(ScopeConfig(flip_student_direction=True, flip_teacher_direction=True),
                          batch, ppl, ppl)
    assert f.student[0] > f.student[1] > f.student[2]
    assert f.teacher[3] < f.teacher[4] < f.teacher[5]


def test_permuting_rollouts_permutes_weights(gen):
    batch, ls, lt = random_case(gen)
    perm = torch.randperm(batch.num_rollouts, generator=gen)
    permuted = rollouts(batch.group_ids[perm], batch.correct[perm])
    w = dual_path_weights(ScopeConfig(), batch, ls, lt)
    wp = dual_path_weights(ScopeConfig(), permuted, ls[perm], lt[perm])
    torch.testing.assert_close(wp.student, w.student[perm])
    torch.testing.assert_close(wp.teacher, w.teacher[perm])


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_large_tau_is_uniform(normalize, gen):
    batch, ls, lt = random_case(gen)
    w = dual_path_weights(ScopeConfig(tau=1e9, normalize=normalize), batch, ls, lt)
    u = dual_path_weights(ScopeConfig(student_path="uniform", teacher_path="uniform",
                                      normalize=normalize), batch)
    torch.testing.assert_close(w.student.float(), u.student)
    torch.testing.assert_close(w.teacher.float(), u.teacher)
    for members, weights in ((batch.correct, u.student), (~batch.correct, u.teacher)):
        torch.testing.assert_close(weights, uniform_group_weights(batch, members, normalize))


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_single_member_path_gets_weight_one(normalize):
    batch = rollouts([0, 0, 0, 1], [1, 0, 0, 0])
    ls = torch.tensor([3.0, 0.1, 0.2, 0.3])
    w = dual_path_weights(ScopeConfig(normalize=normalize), batch, ls, ls)
    assert float(w.student[0]) == pytest.approx(1.0)
    assert float(w.teacher[3]) == pytest.approx(1.0)
    assert float(w.teacher[1] + w.teacher[2]) == pytest.approx(1.0 if normalize == "sum" else 2.0)


def test_path_modes_and_routing(gen):
    batch, ls, lt = random_case(gen)
    off = dual_path_weights(ScopeConfig(student_path="off"), batch, ls, lt)
    assert not bool(off.student_members.any()) and bool((off.student == 0).all())
    torch.testing.assert_close(off.teacher, dual_path_weights(ScopeConfig(), batch, ls, lt).teacher)
    unrouted = dual_path_weights(ScopeConfig(routing=False, student_path="off"), batch, ls, lt)
    assert bool(unrouted.teacher_members.all())
    all_rollouts = torch.ones_like(batch.correct)
    torch.testing.assert_close(unrouted.teacher, paper_weights(batch, lt, all_rollouts, -1, 1.0, "sum"))


def test_empty_rollouts_are_on_no_path():
    batch = rollouts([0, 0, 0, 0], [1, 1, 0, 0], lengths=[2, 0, 1, 0])
    student, teacher = path_members(ScopeConfig(), batch)
    assert student.tolist() == [True, False, False, False]
    assert teacher.tolist() == [False, False, True, False]
    w = dual_path_weights(ScopeConfig(), batch, torch.zeros(4), torch.zeros(4))
    assert w.student.tolist() == [1, 0, 0, 0] and w.teacher.tolist() == [0, 0, 1, 0]


def test_weights_carry_no_gradient(gen):
    batch, ls, lt = random_case(gen)
    w = dual_path_weights(ScopeConfig(), batch, ls.requires_grad_(), lt.requires_grad_())
    assert not w.student.requires_grad and not w.teacher.requires_grad


def test_weighted_path_needs_its_perplexity(gen):
    batch, ls, _ = random_case(gen)
    with pytest.raises(ValueError, match="teacher_path='weighted' needs the teacher log perplexity"):
        dual_path_weights(ScopeConfig(), batch, ls, None)
    with pytest.raises(ValueError, match="for algorithm='scope' only"):
        dual_path_weights(ScopeConfig(algorithm="opd"), batch, ls, ls)


@pytest.mark.parametrize("path", ["student_path", "teacher_path"])
def test_an_empty_weighted_path_needs_no_perplexity(path):
    """A path with no member (every rollout correct: no teacher path; all wrong: no student path)
    has zero weights and reads no perplexity, so none need be computed; a member still needs it."""
    batch = rollouts([0, 0, 1], [1, 1, 1] if path == "teacher_path" else [0, 0, 0])
    ls = torch.zeros(3, dtype=torch.float64)
    w = dual_path_weights(ScopeConfig(), batch, *((ls, None) if path == "teacher_path" else (None, ls)))
    empty = w.teacher if path == "teacher_path" else w.student
    assert empty.dtype == torch.float64 and empty.tolist() == [0, 0, 0]
    full = w.student if path == "teacher_path" else w.teacher
    assert full.tolist() == [0.5, 0.5, 1.0]
    mixed = rollouts([0, 0, 1], [1, 0, 1])
    with pytest.raises(ValueError, match=f"{path}='weighted' needs the"):
        dual_path_weights(ScopeConfig(), mixed, *((ls, None) if path == "teacher_path" else (None, ls)))
