"""teacher_top_k, the teacher's side of the top-k estimator, on its own: ids and log-probs equal a
float64 log-softmax's top-k over the real (unpadded) vocabulary, and bad arguments are clear
errors, not silently broadcast shapes, empty results, positive "log-probs" or NaN."""
import pytest
import torch

from scope_megatron.scope import teacher_top_k
from tests.helpers import random_logits
from tests.scope.problems import token_logprobs

PADDED, VOCAB = 40, 33  # 7 embedding-padding columns


def _inputs(gen, dtype=torch.float64, temperature=1.0, shape=(3, 5)):
    logits = random_logits((*shape, PADDED), dtype, gen, scale=2.0)
    logits[..., VOCAB:] = 50.0  # padding columns: the largest logits, never chosen
    target = torch.randint(0, VOCAB, shape, generator=gen)
    return logits, target, token_logprobs(logits, target, VOCAB, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("k", [1, 7, VOCAB, 1000])
def test_matches_a_float64_log_softmax_top_k(k, temperature, gen):
    logits, target, lp = _inputs(gen, temperature=temperature)
    ids, values = teacher_top_k(logits, target, lp, k=k, vocab_size=VOCAB,
                                teacher_temperature=temperature, dtype=torch.float64)
    ref_values, ref_ids = torch.log_softmax(logits[..., :VOCAB].double() / temperature, -1).topk(min(k, VOCAB))
    assert ids.dtype == torch.int64 and ids.shape == ref_ids.shape
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values, ref_values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits(dtype, gen):
    logits, target, lp = _inputs(gen, dtype=dtype, temperature=0.8)
    ids, values = teacher_top_k(logits, target, lp.float(), k=5, vocab_size=VOCAB,
                                teacher_temperature=0.8)
    ref = torch.log_softmax(logits[..., :VOCAB].double() / 0.8, -1)
    assert values.dtype == torch.float32
    # ties among rounded logits may order equal values either way: compare values at the ids.
    # float32 arithmetic on intermediates up to ~30 in magnitude ((x_j - x_y) / T, then + log p(y))
    # rounds by up to a few ulps there (2.0e-6 worst over 3000 seeds): atol 5e-6, not 1e-6
    # (which failed about 1 seed in 80)
    torch.testing.assert_close(values.double(), ref.gather(-1, ids), rtol=1e-6, atol=5e-6)
    torch.testing.assert_close(values.double(), ref.topk(5).values, rtol=1e-6, atol=5e-6)


def test_bad_arguments_are_clear_errors(gen):
    logits, target, lp = _inputs(gen)
    kw = dict(k=4, vocab_size=VOCAB, teacher_temperature=1.0)

    def call(**over):
        args = dict(teacher_logits=logits, target=target, teacher_logprobs=lp, **kw)
        args.update(over)
        return teacher_top_k(args.pop("teacher_logits"), args.pop("target"), args.pop("teacher_logprobs"),
                             **args)

    for k in (0, -2):
        with pytest.raises(ValueError, match=rf"teacher_top_k: k must be an integer >= 1, got {k}"):
            call(k=k)
    with pytest.raises(ValueError, match="teacher_top_k: k must be an integer >= 1, got 2.5"):
        call(k=2.5)
    with pytest.raises(ValueError, match=r"teacher_logprobs has shape \(3,\).*must be \(3, 5\)"):
        call(teacher_logprobs=lp[:, 0])
    with pytest.raises(ValueError, match=r"teacher_logprobs has shape \(3, 5, 1\).*must be \(3, 5\)"):
        call(teacher_logprobs=lp.unsqueeze(-1))
    with pytest.raises(ValueError, match=r"target has shape \(5,\).*must be \(3, 5\)"):
        call(target=target[0])
    with pytest.raises(TypeError, match="target must hold integer token ids"):
        call(target=target.double())
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="teacher_top_k: teacher_temperature must be a finite number > 0"):
            call(teacher_temperature=temperature)
    for vocab in (0, PADDED + 1):
        with pytest.raises(ValueError, match="teacher_top_k: vocab_size"):
            call(vocab_size=vocab)
    for bad in (VOCAB, PADDED, -1):  # a padding column, beyond the shard, negative
        t = target.clone()
        t[1, 2] = bad
        with pytest.raises(ValueError, match=rf"teacher_top_k: target ids must be in \[0, {VOCAB}\).*"
                                             rf"flattened token 7, target {bad}"):
            call(target=t)
    with pytest.raises(TypeError, match="teacher_top_k: teacher_logits must be float32"):
        call(teacher_logits=logits.to(torch.int64))
