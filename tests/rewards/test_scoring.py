"""score_responses: EOS handling, truncation, metadata, reward validation."""
import pytest
import torch

from scope_megatron.data import EOS_ID, PAD_ID, TOY_TOKENIZER
from scope_megatron.rewards import score_responses, split_at_eos

enc = TOY_TOKENIZER.encode


def score(responses, references, **kwargs):
    return score_responses(responses, references, decode=TOY_TOKENIZER.decode, eos_id=EOS_ID,
                           **kwargs)


def test_only_text_before_the_first_eos_counts():
    right, wrong = enc(r"\boxed{81}"), enc(r"\boxed{80}")
    responses = [
        right + [EOS_ID],
        right + [EOS_ID] + wrong + [EOS_ID],       # an answer after EOS is ignored
        wrong + [EOS_ID] + right + [EOS_ID],
        enc("1+1=02 ") + [EOS_ID] + right,         # the box after EOS cannot count
        right,                                     # no EOS: truncated
        right + [EOS_ID, PAD_ID, PAD_ID],
    ]
    scores = score(responses, ["81"] * 6)
    assert scores.rewards.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert scores.correct.tolist() == [True, True, False, False, False, True]
    assert scores.finished.tolist() == [True, True, True, True, False, True]
    assert scores.texts[1] == r"\boxed{81}" and scores.texts[3] == "1+1=02 "
    assert scores.rewards.dtype == torch.float32


def test_padded_tensor_rows_and_several_eos_ids():
    ids = torch.full((2, 6), PAD_ID)
    ids[0, :4] = torch.tensor(enc(r"\boxed{7}") + [EOS_ID])
    ids[1, :2] = torch.tensor(enc(r"\boxed{7"))   # stopped without EOS, then padding
    scores = score(ids, ["7", "7"])
    assert scores.rewards.tolist() == [1.0, 0.0] and scores.finished.tolist() == [True, False]
    assert split_at_eos(torch.tensor([4, 9, 2, 9]), (2, 9)) == ([4], True)
    assert split_at_eos([4, 5], 2) == ([4, 5], False)


@pytest.mark.parametrize("eos", [torch.tensor(EOS_ID), torch.tensor([EOS_ID]), [torch.tensor(EOS_ID)],
                                 __import__("numpy").int64(EOS_ID), __import__("numpy").array([EOS_ID])])
def test_eos_ids_as_tensors_or_numpy_values(eos):
    """A tokenizer's EOS ids often come as a tensor or NumPy value: they must be found (a set of
    0-d tensors never contains the int token)."""
    scores = score_responses([enc(r"\boxed{81}") + [EOS_ID]], ["81"], decode=TOY_TOKENIZER.decode, eos_id=eos)
    assert scores.finished.tolist() == [True] and scores.rewards.tolist() == [1.0]


@pytest.mark.parametrize("bad", [2.0, "2", [], [2, 2.5], None])
def test_bad_eos_ids_are_named(bad):
    with pytest.raises(TypeError, match="eos_id must be a token id"):
        split_at_eos([1, 2], bad)


def test_metadata_reaches_the_reward_fn():
    seen = []

    def reward_fn(text, reference, *, metadata):
        seen.append(dict(metadata))
        return 0.25

    scores = score([[EOS_ID], [4]], ["1", "2"], reward_fn=reward_fn,
                   metadata=[{"id": 0, "finished": "overridden"}, {"id": 1}])
    assert seen == [{"id": 0, "finished": True}, {"id": 1, "finished": False}]
    assert scores.rewards.tolist() == [0.25, 0.25] and not bool(scores.correct.any())


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "1", None])
def test_invalid_rewards_are_errors(bad):
    with pytest.raises(ValueError, match="response 0"):
        score([[EOS_ID]], ["1"], reward_fn=lambda t, r, *, metadata: bad)


def test_bool_rewards_are_accepted():
    assert score([[EOS_ID]], ["1"], reward_fn=lambda t, r, *, metadata: True).rewards.tolist() == [1.0]


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="one reference per response"):
        score([[EOS_ID]], [])
    with pytest.raises(ValueError, match="metadata"):
        score([[EOS_ID]], ["1"], metadata=[])
