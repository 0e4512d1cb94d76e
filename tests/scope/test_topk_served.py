"""The top-k estimator from a served teacher's top-k (ids + log-probs, e.g. SGLang's
top_logprobs) instead of its logits: the same loss and gradient as from the logits, padded and
packed, and the batch checks of the new fields."""
import pytest
import torch

from scope_megatron.scope import RolloutBatch, ScopeConfig, compute_loss
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
