"""RolloutBatch: layouts, derived attributes, and validation errors that name the rollout."""
import pytest
import torch

from scope_megatron.scope import RolloutBatch


def padded(**overrides):
    """4 rollouts in 2 groups, lengths 3, 1, 2, 3 (L = 3)."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    kw = dict(response_ids=torch.tensor([[5, 6, 7], [8, -100, -100], [1, 2, -1], [3, 4, 9]]),
              group_ids=torch.tensor([0, 0, 1, 1]), correct=torch.tensor([True, False, False, True]),
              old_logprobs=torch.where(mask, -torch.rand(4, 3) - 0.1, torch.tensor(float("nan"))),
              response_mask=mask)
    kw.update(overrides)
    return RolloutBatch(**kw)


def packed(**overrides):
    kw = dict(response_ids=torch.tensor([5, 6, 7, 8, 1, 2, 3, 4, 9]),
              cu_seqlens=torch.tensor([0, 3, 4, 6, 9]), group_ids=torch.tensor([0, 0, 1, 1]),
              correct=torch.tensor([True, False, False, True]), old_logprobs=-torch.rand(9) - 0.1)
    kw.update(overrides)
    return RolloutBatch(**kw)


def test_padded_layout():
    b = padded()
    assert not b.packed and b.num_rollouts == 4 and b.num_groups == 2
    assert b.lengths.tolist() == [3, 1, 2, 3] and bool(b.nonempty.all())
    assert b.safe_response_ids.tolist() == [[5, 6, 7], [8, 0, 0], [1, 2, 0], [3, 4, 9]]
    values = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    values[1, 1] = float("nan")  # an uncounted position is never read
    torch.testing.assert_close(b.token_mean(values), torch.tensor([1.0, 3.0, 6.5, 10.0], dtype=torch.float64))
    assert b.per_token(torch.tensor([1, 2, 3, 4])).tolist() == [[1] * 3, [2] * 3, [3] * 3, [4] * 3]


def test_packed_layout_matches_padded():
    b, p = packed(), padded()
    assert b.packed and b.num_rollouts == 4 and b.lengths.tolist() == [3, 1, 2, 3]
    assert b.token_rollout.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3]
    values = torch.rand(9, dtype=torch.float64)
    as_padded = torch.zeros(4, 3, dtype=torch.float64)
    as_padded[p.response_mask] = values
    torch.testing.assert_close(b.token_mean(values), p.token_mean(as_padded))
    lp = -torch.rand(9, dtype=torch.float64)
    lp_padded = torch.zeros(4, 3, dtype=torch.float64)
    lp_padded[p.response_mask] = lp
    torch.testing.assert_close(b.log_perplexity(lp), p.log_perplexity(lp_padded))


@pytest.mark.parametrize("make", [padded, packed])
def test_log_perplexity_with_allowed_empty_rollouts(make):
    """Empty rollouts get 0; the others are unchanged."""
    if make is padded:
        mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
        b = padded(response_mask=mask, allow_empty_responses=True)
        lp = -torch.rand(4, 3, dtype=torch.float64)
        expected = -(lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    else:
        mask = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
        b = packed(response_mask=mask, allow_empty_responses=True)
        lp = -torch.rand(9, dtype=torch.float64)
        expected = torch.stack([-lp[0:3].mean(), torch.tensor(0.0, dtype=torch.float64),
                                -lp[4:6].mean(), torch.tensor(0.0, dtype=torch.float64)])
    assert b.nonempty.tolist() == [True, False, True, False]
    torch.testing.assert_close(b.log_perplexity(lp), expected)


@pytest.mark.parametrize("make,overrides,exc,match", [
    (padded, dict(old_logprobs=torch.zeros(4, 2)), ValueError,
     r"old_logprobs has shape \(4, 2\) but response_ids has \(4, 3\)"),
    (padded, dict(group_ids=torch.tensor([0, 0, 1])), ValueError, "group_ids has shape .* 4 rollouts"),
    (padded, dict(correct=torch.tensor([True, False])), ValueError, "correct has shape"),
    (padded, dict(group_ids=torch.tensor([0, 0, 2, 2])), ValueError,
     r"group 1 has no rollout .* torch.unique"),
    (padded, dict(group_ids=torch.tensor([0, -1, 1, 1])), ValueError, "rollout 1 has negative group id"),
    (padded, dict(group_ids=torch.tensor([0.0, 0.0, 1.0, 1.0])), TypeError, "group_ids must be an integer"),
    (padded, dict(correct=torch.tensor([1, 0, 0, 1])), TypeError, r"correct must be a bool .*reward > 0"),
    (padded, dict(response_mask=torch.ones(4, 3, dtype=torch.uint8)), TypeError,
     r"response_mask must be a bool tensor .*\.bool\(\)"),
    (padded, dict(response_mask=None), ValueError, "response_mask is required for a padded batch"),
    (padded, dict(response_ids=torch.zeros(4, 3)), TypeError, "response_ids must be an integer"),
    (padded, dict(response_ids=torch.tensor([[5, 6, 7], [8, 0, 0], [1, -100, 0], [3, 4, 9]])),
     ValueError, r"rollout 2 \(group 1, incorrect\), response token 1 is a counted token with a negative id"),
    (packed, dict(cu_seqlens=torch.tensor([0, 3, 2, 6, 9])), ValueError, "cu_seqlens decreases at rollout 1"),
    (packed, dict(cu_seqlens=torch.tensor([0, 3, 4, 6, 8])), ValueError,
     r"must start at 0 and end at the number of packed tokens \(9\)"),
    (packed, dict(response_mask=torch.ones(8, dtype=torch.bool)), ValueError, "response_mask has shape"),
    (packed, dict(old_logprobs=-torch.rand(8)), ValueError, "old_logprobs has shape"),
    (padded, dict(has_teacher_logprobs=torch.ones(4, dtype=torch.bool)), ValueError,
     "has_teacher_logprobs was given without teacher_logprobs"),
    (padded, dict(teacher_logprobs=-torch.rand(4, 3), has_teacher_logprobs=torch.ones(4)), TypeError,
     "has_teacher_logprobs must be a bool"),
    (padded, dict(prompt_ids=torch.ones(4, 2, dtype=torch.long)), ValueError, "prompt_mask .* is required"),
    (padded, dict(prompt_ids=torch.ones(3, 2, dtype=torch.long)), ValueError, r"prompt_ids must be \[B=4, P\]"),
    (padded, dict(prompt_ids=torch.ones(4, 2, dtype=torch.long),
                  prompt_mask=torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.bool)),
     ValueError, "rollout 2 has an empty prompt"),
    (padded, dict(prompt_ids=torch.ones(5, dtype=torch.long), prompt_cu_seqlens=torch.tensor([0, 2, 5])),
     ValueError, "describes 2 prompts but the batch has 4 rollouts"),
    (padded, dict(prompt_mask=torch.ones(4, 2, dtype=torch.bool)), ValueError, "given without prompt_ids"),
])
def test_invalid_batches(make, overrides, exc, match):
    with pytest.raises(exc, match=match):
        make(**overrides)


def test_prompts_padded_and_packed():
    b = padded(prompt_ids=torch.ones(4, 2, dtype=torch.long),
               prompt_mask=torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1]], dtype=torch.bool))
    assert b.prompt_ids.shape == (4, 2)
    b = packed(prompt_ids=torch.ones(6, dtype=torch.long), prompt_cu_seqlens=torch.tensor([0, 2, 3, 5, 6]))
    assert b.prompt_cu_seqlens.tolist() == [0, 2, 3, 5, 6]


@pytest.mark.parametrize("make", [padded, packed])
def test_empty_response_is_an_error_unless_allowed(make):
    if make is padded:
        mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
        kw = dict(response_mask=mask)
    else:
        kw = dict(cu_seqlens=torch.tensor([0, 3, 4, 4, 9]), response_ids=torch.arange(9),
                  old_logprobs=-torch.rand(9))
    with pytest.raises(ValueError, match=r"rollout 2 \(group 1\) has an empty response .* "
                                         "allow_empty_responses=True"):
        make(**kw)
    b = make(allow_empty_responses=True, **kw)
    assert b.nonempty.tolist() == [True, True, False, True]


@pytest.mark.parametrize("field", ["old_logprobs", "teacher_logprobs"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_logprobs_name_the_rollout(field, value):
    lp = -torch.rand(4, 3) - 0.1
    lp[2, 1] = value
    kw = {field: lp}
    if field == "teacher_logprobs":
        kw["old_logprobs"] = -torch.rand(4, 3)
    with pytest.raises(FloatingPointError, match=fr"{field}: rollout 2 \(group 1, incorrect\), "
                                                 "response token 1 has log-prob"):
        padded(**kw)


def test_packed_nan_names_rollout_and_position():
    lp = -torch.rand(9)
    lp[7] = float("nan")  # rollout 3 = tokens 6..8
    with pytest.raises(FloatingPointError, match=r"rollout 3 \(group 1, correct\), response token 1"):
        packed(old_logprobs=lp)


def test_positive_logprobs_are_an_error():
    lp = -torch.rand(4, 3)
    lp[3, 2] = 0.5
    with pytest.raises(ValueError, match=r"rollout 3 .* response token 2 has log-prob 0.5 > 0"):
        padded(old_logprobs=lp)
    lp[3, 2] = 1e-5  # rounding is tolerated
    padded(old_logprobs=lp)


def test_teacher_logprobs_are_read_only_where_present():
    tl = -torch.rand(4, 3)
    tl[1] = float("nan")  # this rollout was not sent to the teacher
    b = padded(teacher_logprobs=tl, has_teacher_logprobs=torch.tensor([True, False, True, True]))
    assert b.has_teacher_logprobs.tolist() == [True, False, True, True]
    with pytest.raises(FloatingPointError, match=r"rollout 1 \(group 0, incorrect\)"):
        padded(teacher_logprobs=tl)
