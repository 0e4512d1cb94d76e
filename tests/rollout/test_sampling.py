"""sample_tokens: greedy, temperature, top-k, top-p, log-probs, determinism."""
import pytest
import torch

from scope_megatron.rollout import SamplingParams, sample_tokens


def _noise(shape, gen):
    return torch.rand(shape, generator=gen)


def test_greedy_and_logprobs(gen):
    logits = torch.randn(6, 11, generator=gen) * 3
    tok, lp = sample_tokens(logits, SamplingParams(temperature=0.0), None)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0])


def test_logprobs_are_at_the_temperature_before_truncation(gen):
    logits = torch.randn(5, 13, generator=gen) * 3
    params = SamplingParams(temperature=0.7, top_k=3, top_p=0.8)
    tok, lp = sample_tokens(logits, params, _noise((5, 13), gen))
    torch.testing.assert_close(lp, (logits / 0.7).log_softmax(-1).gather(-1, tok[:, None])[:, 0])


def test_distribution_matches_softmax(gen):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    rows = 40000
    tok, _ = sample_tokens(logits.expand(rows, -1), SamplingParams(temperature=0.8), _noise((rows, 5), gen))
    freq = torch.bincount(tok, minlength=5).double() / rows
    expected = (logits / 0.8).softmax(-1).double()
    # 5 sigma of a binomial proportion
    assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / rows).sqrt())


@pytest.mark.parametrize("top_k,top_p", [(2, 1.0), (0, 0.6), (3, 0.5)])
def test_truncation_keeps_only_allowed_tokens(top_k, top_p, gen):
    logits = torch.randn(1, 9, generator=gen) * 2
    rows = 20000
    tok, _ = sample_tokens(logits.expand(rows, -1), SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p),
                           _noise((rows, 9), gen))
    # top-k first, then top-p on the renormalized top-k distribution (the usual convention)
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    kept = order[:top_k] if top_k else order
    if top_p < 1:
        renorm = probs[kept] / probs[kept].sum()
        before = renorm.cumsum(0) - renorm
        kept = kept[before < top_p]
    allowed = set(kept.tolist())
    assert set(tok.unique().tolist()) <= allowed
    # renormalized probabilities over the allowed set
    keep = torch.tensor(sorted(allowed))
    expected = probs[keep] / probs[keep].sum()
    freq = torch.bincount(tok, minlength=9)[keep].double() / rows
    assert torch.all((freq - expected.double()).abs() <= 5 * (expected * (1 - expected) / rows).sqrt().double() + 1e-9)


def test_top_k_one_and_tiny_top_p_are_greedy(gen):
    logits = torch.randn(7, 10, generator=gen)
    for params in (SamplingParams(temperature=1.3, top_k=1), SamplingParams(temperature=1.3, top_p=1e-6)):
        tok, _ = sample_tokens(logits, params, _noise((7, 10), gen))
        assert torch.equal(tok, logits.argmax(-1))


def test_same_noise_same_tokens_and_missing_noise_is_an_error(gen):
    logits = torch.randn(4, 8, generator=gen)
    noise = _noise((4, 8), gen)
    a, _ = sample_tokens(logits, SamplingParams(temperature=1.0), noise)
    b, _ = sample_tokens(logits.clone(), SamplingParams(temperature=1.0), noise.clone())
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs uniform noise"):
        sample_tokens(logits, SamplingParams(temperature=1.0), None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must be"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    # SGLang samples greedily below 1e-6 with log-probs at temperature 1: refused, not mismatched
    (dict(temperature=5e-7), "below 1e-06: pass 0 for greedy"),
])
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
