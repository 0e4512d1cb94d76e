"""Prompt batches for rollouts (padding, masks, group ids) and SFT batches."""
import pytest
import torch

from scope_megatron.data import PAD_ID, ToyArithmetic, make_prompt_batch, make_sft_batch


@pytest.mark.parametrize("side", ["left", "right"])
def test_ragged_prompts_are_padded_with_a_mask(side, gen):
    lengths = torch.randint(1, 7, (5,), generator=gen).tolist()
    prompts = [torch.randint(3, 18, (n,), generator=gen).tolist() for n in lengths]
    batch = make_prompt_batch(prompts, pad_id=PAD_ID, padding_side=side)
    assert batch.prompt_ids.shape == (5, max(lengths)) and batch.prompt_ids.dtype == torch.int64
    assert batch.prompt_lengths.tolist() == lengths
    assert batch.prompt_mask.sum(1).tolist() == lengths
    for row, p in enumerate(prompts):
        assert batch.prompt_ids[row][batch.prompt_mask[row]].tolist() == p
        assert bool((batch.prompt_ids[row][~batch.prompt_mask[row]] == PAD_ID).all())
        end = batch.prompt_mask[row].nonzero().max()
        assert (int(end) == max(lengths) - 1) if side == "left" else (int(end) == len(p) - 1)
    assert batch.group_ids.tolist() == list(range(5))


def test_toy_prompts_need_no_padding_and_groups_are_contiguous(gen):
    task = ToyArithmetic()
    problems = task.train_problems(0, 4, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    batch = make_prompt_batch([task.prompt_ids(p) for p in problems], pad_id=PAD_ID)
    assert batch.prompt_ids.shape == (4, task.prompt_len) and bool(batch.prompt_mask.all())
    grouped = batch.repeat_for_groups(3)
    assert grouped.num_rows == 12
    assert grouped.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(grouped.prompt_ids[3:6], batch.prompt_ids[1].expand(3, -1))
    with pytest.raises(ValueError, match="rollouts_per_prompt"):
        batch.repeat_for_groups(0)


def test_sft_batch_marks_response_tokens():
    batch = make_sft_batch([[1, 5], [1, 6, 7]], [[8, 2], [2]], pad_id=PAD_ID)
    assert batch.tokens.tolist() == [[1, 5, 8, 2], [1, 6, 7, 2]]
    assert batch.response_mask.tolist() == [[False, False, True, True], [False, False, False, True]]
    batch = make_sft_batch([[1]], [[4, 2]], pad_id=PAD_ID)
    assert batch.tokens.tolist() == [[1, 4, 2]]


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="no prompts"):
        make_prompt_batch([], pad_id=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        make_prompt_batch([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        make_prompt_batch([[1]], pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="as many responses"):
        make_sft_batch([[1]], [], pad_id=0)
    with pytest.raises(ValueError, match="response 0 is empty"):
        make_sft_batch([[1]], [[]], pad_id=0)
