"""Bad inputs to compute_loss: each a clear error naming the problem (and the rollout), never a
silent zero or NaN. Batch construction errors are in test_batch.py."""
import pytest
import torch

from scope_megatron.scope import RolloutBatch, ScopeConfig, compute_loss
from tests.scope.problems import layout, make_batch, make_problem


def call(config, p, *, packed=False, student=None, teacher="default", batch=None, **kw):
    batch = make_batch(p, packed=packed) if batch is None else batch
    student = layout(p, p.student, packed) if student is None else student
    if isinstance(teacher, str):
        teacher = layout(p, p.teacher, packed)
    return compute_loss(config, batch, student, teacher_logits=teacher,
                        vocab_size=kw.pop("vocab_size", p.vocab_size), **kw)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("estimator", ["full", "topk", "k3"])
def test_nan_logits_name_the_rollout(estimator, which, packed, gen):
    p = make_problem(gen, group_sizes=(2, 3), correct=[1, 0, 0, 1, 0], length=4)
    p.mask[:] = True
    getattr(p, which)[3, 2, 7] = float("nan")  # rollout 3 = group 1, correct; token 2
    cfg = ScopeConfig(kl_estimator=estimator, **({"topk_k": 4} if estimator == "topk" else {}))
    with pytest.raises(FloatingPointError, match=fr"the {which} logits are NaN or Inf at rollout 3 "
                                                 r"\(group 1, correct\), response token 2"):
        call(cfg, p, packed=packed)


def test_non_finite_padding_columns_are_ignored(gen):
    p = make_problem(gen)
    p.student[..., p.vocab_size:] = float("nan")
    p.teacher[..., p.vocab_size:] = float("-inf")
    for estimator in ("full", "topk", "k3", "sampled"):
        extra = {"topk_k": 3} if estimator == "topk" else {}
        loss, _ = call(ScopeConfig(kl_estimator=estimator, **extra), p)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("estimator", ["sampled", "k3"])
def test_teacher_logprobs_missing_for_an_incorrect_rollout(estimator, gen):
    p = make_problem(gen, group_sizes=(3, 3), correct=[1, 0, 1, 0, 0, 1])
    has = torch.tensor([True, True, True, False, True, True])
    batch = make_batch(p, teacher_logprobs=True, has_teacher=has)
    with pytest.raises(ValueError, match=r"rollout 3 \(group 1, incorrect\) is on the teacher path "
                                         rf"but has no teacher log-probs .*kl_estimator='{estimator}' "
                                         "needs log p_T"):
        call(ScopeConfig(kl_estimator=estimator), p, batch=batch, teacher=None)
    # missing only for correct rollouts: not needed by the teacher path
    has = torch.tensor([False, True, False, True, True, False])
    loss, metrics = call(ScopeConfig(kl_estimator=estimator), p, teacher=None,
                         batch=make_batch(p, teacher_logprobs=True, has_teacher=has))
    assert torch.isfinite(loss) and "student_path/ppl_teacher" not in metrics
    # ... but OPD distills every rollout, the correct ones included
    with pytest.raises(ValueError, match=r"rollout 0 \(group 0, correct\) is on the teacher path"):
        call(ScopeConfig(algorithm="opd", kl_estimator=estimator), p, teacher=None,
             batch=make_batch(p, teacher_logprobs=True, has_teacher=has))


def test_no_teacher_at_all(gen):
    p = make_problem(gen)
    with pytest.raises(ValueError, match="batch.teacher_logprobs is None and no teacher_logits"):
        call(ScopeConfig(kl_estimator="k3"), p, teacher=None)
    with pytest.raises(ValueError, match="teacher_path='weighted' needs PPL_T"):
        call(ScopeConfig(kl_estimator="k3"), p, teacher=None)
    for estimator in ("full", "topk"):
        with pytest.raises(ValueError, match=f"kl_estimator='{estimator}' needs teacher_logits"):
            call(ScopeConfig(kl_estimator=estimator), p, teacher=None)
    loss, _ = call(ScopeConfig(teacher_path="off"), p, teacher=None)  # MLE only: no teacher needed
    assert torch.isfinite(loss)


def test_teacher_student_vocabulary_mismatch(gen):
    p = make_problem(gen)
    wider = torch.cat([p.teacher, torch.zeros(*p.teacher.shape[:-1], 16, dtype=p.teacher.dtype)], -1)
    with pytest.raises(ValueError, match="teacher/student vocabulary mismatch: the teacher's logit "
                                         "shard has 64 columns, the student's 48"):
        call(ScopeConfig(), p, teacher=wider)
    with pytest.raises(ValueError, match="vocab_size=49 is larger than the sharded vocabulary 48"):
        call(ScopeConfig(), p, vocab_size=49)
    with pytest.raises(TypeError, match="must have the same dtype"):
        call(ScopeConfig(), p, teacher=p.teacher.float())
    p.ids[0, 0] = p.vocab_size  # a padding id sampled: vocabularies disagree
    with pytest.raises(ValueError, match="target ids must be in"):
        call(ScopeConfig(), p)


def test_misaligned_logits(gen):
    p = make_problem(gen)
    with pytest.raises(ValueError, match=r"must be \[B, L, V_local\] \(padded\) aligned with "
                                         r"response_ids \(13, 6\)"):
        call(ScopeConfig(), p, student=p.student[:, :-1])
    with pytest.raises(ValueError, match=r"must be \[N, V_local\] \(packed\)"):
        call(ScopeConfig(), p, packed=True, student=p.student)
    with pytest.raises(ValueError, match="must be aligned token by token"):
        call(ScopeConfig(), p, teacher=torch.cat([p.teacher[1:], p.teacher[:1, :]])[:-1])


def test_ambiguous_or_unused_teacher(gen):
    p = make_problem(gen)
    with pytest.raises(ValueError, match="both teacher_logits and batch.teacher_logprobs"):
        call(ScopeConfig(), p, batch=make_batch(p, teacher_logprobs=True))
    with pytest.raises(ValueError, match="algorithm='grpo' uses no teacher"):
        call(ScopeConfig(algorithm="grpo"), p)


def test_zero_length_response_is_an_error(gen):
    p = make_problem(gen)
    p.mask[4] = False
    with pytest.raises(ValueError, match=r"rollout 4 \(group 2\) has an empty response"):
        make_batch(p)
    with pytest.raises(ValueError, match=r"rollout 4 \(group 2\) has an empty response"):
        make_batch(p, packed=True)


def test_wrong_argument_types(gen):
    p = make_problem(gen)
    with pytest.raises(TypeError, match="config must be a ScopeConfig"):
        compute_loss({"algorithm": "scope"}, make_batch(p), p.student)
    with pytest.raises(TypeError, match="batch must be a RolloutBatch"):
        compute_loss(ScopeConfig(), {}, p.student)
    with pytest.raises(TypeError, match="student_logits must be a floating-point tensor"):
        compute_loss(ScopeConfig(), make_batch(p), p.ids)
    assert isinstance(make_batch(p), RolloutBatch)


@pytest.mark.parametrize("estimator", ["sampled", "k3", "full", "topk"])
@pytest.mark.parametrize("teacher_path", ["weighted", "uniform"])
def test_all_correct_batch_needs_no_teacher(estimator, teacher_path, gen):
    """Every rollout correct: SCOPE's teacher path is empty and the loss is the MLE term alone, so
    a remote teacher that scored nothing (batch.teacher_logprobs None) or a skipped teacher
    forward is fine (it was a TypeError / a misleading 'needs PPL_T' error)."""
    p = make_problem(gen, correct=[True] * 13)
    config = ScopeConfig(kl_estimator=estimator, teacher_path=teacher_path,
                         **({"topk_k": 5} if estimator == "topk" else {}))
    loss, metrics = call(config, p, teacher=None)
    mle_only, _ = call(ScopeConfig(teacher_path="off"), p, teacher=None)
    with_teacher, _ = call(config, p)
    torch.testing.assert_close(loss, mle_only, rtol=0, atol=0)
    torch.testing.assert_close(loss, with_teacher, rtol=0, atol=0)
    assert metrics["rollouts/teacher_path"] == 0 and "kl/mean" not in metrics
    assert not any("ppl_teacher" in key for key in metrics)
    # a single incorrect rollout puts the teacher back in charge
    p.correct[5] = False
    with pytest.raises(ValueError, match=r"rollout 5 .*incorrect|needs teacher_logits"):
        call(config, p, teacher=None)
