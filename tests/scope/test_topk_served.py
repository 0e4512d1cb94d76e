"""The top-k estimator from a served teacher's top-k (ids + log-probs, e.g. SGLang's
top_logprobs) instead of its logits: the same loss and gradient as from the logits, padded and
packed, and the batch checks of the new fields."""
import pytest
import torch

from scope_megatron.scope import RolloutBatch, ScopeConfig, compute_loss, opd_path_loss
from scope_megatron.scope._tp import resolve_tp
from tests.scope.problems import fresh_leaf, layout, make_batch, make_problem, served_topk_batch

K = 4


def _served_top(p):
    """The teacher's top-K ids and log-probs at every position (float64, from its logits)."""
    values, ids = p.teacher[..., :p.vocab_size].double().log_softmax(-1).topk(K, dim=-1)
    return ids, values


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("algorithm", ["scope", "opd"])
def test_served_topk_equals_topk_from_logits(gen, packed, algorithm):
    p = make_problem(gen)
    config = ScopeConfig(algorithm=algorithm, kl_estimator="topk", topk_k=K)

    def loss_and_grad(served):
        student = fresh_leaf(layout(p, p.student, packed))
        if served:
            loss, metrics = compute_loss(config, served_topk_batch(p, K, packed=packed), student,
                                         vocab_size=p.vocab_size)
        else:
            loss, metrics = compute_loss(config, make_batch(p, packed=packed), student,
                                         teacher_logits=layout(p, p.teacher, packed).double(), vocab_size=p.vocab_size)
        loss.backward()
        return loss.detach(), student.grad, metrics

    served, from_logits = loss_and_grad(True), loss_and_grad(False)
    assert served[0].item() != 0.0
    torch.testing.assert_close(served[0], from_logits[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(served[1], from_logits[1], rtol=1e-9, atol=1e-11)
    assert served[2]["kl/mean"] == pytest.approx(from_logits[2]["kl/mean"], rel=1e-9)


def test_without_any_teacher_top_k_is_a_clear_error(gen):
    p = make_problem(gen)
    batch = make_batch(p, teacher_logprobs=True)
    with pytest.raises(ValueError, match="'topk' also works from its top-k"):
        compute_loss(ScopeConfig(kl_estimator="topk", topk_k=K), batch, fresh_leaf(p.student),
                     vocab_size=p.vocab_size)


def test_batch_checks_of_the_served_top_k(gen):
    p = make_problem(gen)
    ids, lps = _served_top(p)
    base = dict(response_mask=p.mask, teacher_logprobs=p.teacher_logprobs)
    args = (p.ids, p.group_ids, p.correct, p.old_logprobs)
    with pytest.raises(ValueError, match="go together"):
        RolloutBatch(*args, teacher_top_ids=ids, **base)
    with pytest.raises(ValueError, match="need teacher_logprobs"):
        RolloutBatch(*args, response_mask=p.mask, teacher_top_ids=ids, teacher_top_logprobs=lps)
    with pytest.raises(ValueError, match="plus a trailing k"):
        RolloutBatch(*args, teacher_top_ids=ids[..., 0], teacher_top_logprobs=lps[..., 0], **base)
    with pytest.raises(TypeError, match="must be integer ids"):
        RolloutBatch(*args, teacher_top_ids=ids.double(), teacher_top_logprobs=lps, **base)
    bad = lps.clone()
    bad[p.mask.nonzero()[0].tolist()[0], p.mask.nonzero()[0].tolist()[1], 0] = 0.5
    with pytest.raises(FloatingPointError, match="finite log-probs <= 0"):
        RolloutBatch(*args, teacher_top_ids=ids, teacher_top_logprobs=bad, **base)
    nan = lps.clone()
    nan[~p.mask] = float("nan")  # uncounted positions are never read
    RolloutBatch(*args, teacher_top_ids=ids, teacher_top_logprobs=nan, **base)


@pytest.mark.parametrize("fill", [float("nan"), float("-inf")])
@pytest.mark.parametrize("packed", [False, True])
def test_unread_served_top_k_entries_leave_the_gradient_finite(gen, fill, packed):
    """Entries the batch promises never to read (padding positions, rollouts without teacher
    scores such as the correct ones of SCOPE) may hold NaN / -inf: the loss and the gradient equal
    those of the clean batch (a masked token's zero gradient times a NaN partial was NaN)."""
    p = make_problem(gen, length=8)
    p.mask[0, -1] = False  # at least one padding position
    config = ScopeConfig(kl_estimator="topk", topk_k=K)
    ids, lps = _served_top(p)
    has = ~p.correct  # the teacher scored only the incorrect rollouts (SCOPE's teacher path)
    unread = ~p.mask | p.correct.unsqueeze(1)
    dirty_lps, dirty_ids = lps.clone(), ids.clone()
    dirty_lps[unread] = fill
    dirty_ids[unread] = -1
    sel = (lambda t: t[p.mask]) if packed else (lambda t: t)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), p.mask.sum(-1).cumsum(0)])
    shape = dict(cu_seqlens=cu) if packed else dict(response_mask=p.mask)

    def loss_and_grad(top_ids, top_lps):
        batch = RolloutBatch(sel(p.ids), p.group_ids, p.correct, sel(p.old_logprobs),
                             teacher_logprobs=sel(p.teacher_logprobs), has_teacher_logprobs=has,
                             teacher_top_ids=sel(top_ids), teacher_top_logprobs=sel(top_lps), **shape)
        student = fresh_leaf(layout(p, p.student, packed))
        loss, _ = compute_loss(config, batch, student, vocab_size=p.vocab_size)
        loss.backward()
        return loss.detach(), student.grad

    clean, dirty = loss_and_grad(ids, lps), loss_and_grad(dirty_ids, dirty_lps)
    assert torch.isfinite(dirty[1]).all()
    torch.testing.assert_close(dirty[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(dirty[1], clean[1], rtol=0, atol=0)


def test_served_top_k_ids_outside_the_vocabulary_are_an_error(gen):
    """A served teacher's ids at or above the true vocabulary (another tokenizer, the embedding's
    padding rows) have no student log-prob: a clear error, not a KL read from padding columns or
    from no shard at all."""
    p = make_problem(gen, group_sizes=(2, 3), correct=[1, 0, 0, 1, 0], length=4)
    p.mask[:] = True
    ids, lps = _served_top(p)
    for bad_id in (p.vocab_size, p.student.shape[-1] + 100):
        bad = ids.clone()
        bad[2, 1, 3] = bad_id  # rollout 2: group 1, incorrect (teacher path)
        batch = RolloutBatch(p.ids, p.group_ids, p.correct, p.old_logprobs, response_mask=p.mask,
                             teacher_logprobs=p.teacher_logprobs, teacher_top_ids=bad,
                             teacher_top_logprobs=lps)
        with pytest.raises(ValueError, match=r"teacher_top_ids at rollout 2 \(group 1, incorrect\), "
                                             rf"response token 1 .*outside the student's vocabulary "
                                             rf"\[0, {p.vocab_size}\)"):
            compute_loss(ScopeConfig(kl_estimator="topk", topk_k=K), batch, fresh_leaf(p.student),
                         vocab_size=p.vocab_size)
    # the same id on a correct rollout (student path, never distilled) is not read
    bad = ids.clone()
    bad[0, 1, 3] = p.vocab_size
    batch = RolloutBatch(p.ids, p.group_ids, p.correct, p.old_logprobs, response_mask=p.mask,
                         teacher_logprobs=p.teacher_logprobs, teacher_top_ids=bad,
                         teacher_top_logprobs=lps)
    loss, _ = compute_loss(ScopeConfig(kl_estimator="topk", topk_k=K), batch, fresh_leaf(p.student),
                           vocab_size=p.vocab_size)
    assert torch.isfinite(loss)


def test_served_k_must_match_topk_k(gen):
    """A served top-k of another size than ScopeConfig.topk_k is an error, not an experiment that
    silently runs with the served k while its config says otherwise."""
    p = make_problem(gen)
    batch = served_topk_batch(p, K)
    with pytest.raises(ValueError, match=rf"k={K} ids per token .*ScopeConfig.topk_k={K + 4}"):
        compute_loss(ScopeConfig(kl_estimator="topk", topk_k=K + 4), batch, fresh_leaf(p.student),
                     vocab_size=p.vocab_size)
    # topk_k beyond the vocabulary is capped, as with teacher logits
    whole = served_topk_batch(p, p.vocab_size)
    loss, _ = compute_loss(ScopeConfig(kl_estimator="topk", topk_k=10_000), whole,
                           fresh_leaf(p.student), vocab_size=p.vocab_size)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("vocab_size", [0, 48 + 1])
def test_bad_vocab_size_with_a_served_top_k_names_vocab_size(vocab_size, gen):
    """The vocabulary the served k is compared with is validated first: a vocab_size of 0 read as
    a k mismatch ("served teacher's top-k has k=4 ... topk_k=4")."""
    p = make_problem(gen)
    assert p.student.shape[-1] == 48
    with pytest.raises(ValueError, match="compute_loss: vocab_size"):
        compute_loss(ScopeConfig(kl_estimator="topk", topk_k=K), served_topk_batch(p, K),
                     fresh_leaf(p.student), vocab_size=vocab_size)


def test_opd_path_loss_refuses_served_rows_the_batch_did_not_check(gen):
    """The batch checks the served top-k only on the rollouts with teacher scores
    (has_teacher_logprobs); opd_path_loss called directly with other rollouts on the path would
    read unchecked entries (here NaN log-probs): an error, not a NaN loss."""
    p = make_problem(gen, group_sizes=(2, 3), correct=[1, 0, 0, 1, 0], length=4)
    p.mask[:] = True
    ids, lps = _served_top(p)
    lps[0] = float("nan")  # rollout 0 has no teacher scores: never checked, never to be read
    batch = RolloutBatch(p.ids, p.group_ids, p.correct, p.old_logprobs, response_mask=p.mask,
                         teacher_logprobs=p.teacher_logprobs, has_teacher_logprobs=~p.correct,
                         teacher_top_ids=ids, teacher_top_logprobs=lps)
    config = ScopeConfig(algorithm="opd", kl_estimator="topk", topk_k=K)
    student = fresh_leaf(p.student)
    lp = torch.gather(p.student[..., :p.vocab_size].log_softmax(-1), -1, p.ids.unsqueeze(-1)).squeeze(-1)
    kw = dict(student_logprobs=lp, teacher_logprobs=p.teacher_logprobs, student_logits=student,
              teacher_logits=None, tp=resolve_tp(None), vocab_size=p.vocab_size)
    path = opd_path_loss(config, batch, ~p.correct, **kw)  # the scored rollouts: fine
    assert torch.isfinite(path.losses).all()
    with pytest.raises(ValueError, match=r"rollout 0 \(group 0, correct\) .*has_teacher_logprobs"):
        opd_path_loss(config, batch, torch.ones_like(p.correct), **kw)
