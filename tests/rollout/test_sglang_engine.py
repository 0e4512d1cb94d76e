"""SGLangEngine against two protocol-faithful test servers backed by the toy HF model: Rollouts
shapes and masks, requests spread over servers, log-probs equal to the model's own (float64
reference), reproducibility, answer validation, and the logprob consistency helpers."""
import warnings

import pytest
import torch

from scope_megatron.rollout import SamplingParams
from scope_megatron.rollout.sglang import (ResponseInvalid, SGLangBadRequest, SGLangClient, SGLangEngine,
                                           SGLangError, check_logprobs, logprob_gap, sampling_payload)
from scope_megatron.rollout.sglang.engine import parse_sample
from tests.rollout.fake_sglang_server import FakeSGLangServer, reference_logprobs, toy_hf_dir

PAD, BOS, EOS = 0, 1, 2
# toy arithmetic prompts "<bos>698+296=", "<bos>216+707=", "<bos>637+555=", "<bos>866+600=" (the
# student answers with ~33 tokens ending in <eos>) and a shorter one
PROMPTS = [[1, 9, 12, 11, 13, 5, 12, 9, 14], [1, 5, 4, 9, 13, 10, 3, 10, 14], [1, 9, 6, 10, 13, 8, 8, 8, 14],
           [1, 4, 5, 13, 6, 7, 14]]


@pytest.fixture(scope="module")
def model_dir():
    return toy_hf_dir()


@pytest.fixture(scope="module")
def servers(model_dir):
    with FakeSGLangServer(model_dir) as a, FakeSGLangServer(model_dir) as b:
        yield a, b


@pytest.fixture
def engine(servers):
    for s in servers:
        s.calls.clear()
        s.clear_faults()
    eng = SGLangEngine(SGLangClient([s.url for s in servers], retries=2, backoff=0.01, timeout=60), pad_id=PAD)
    yield eng
    eng.close()


def test_shapes_masks_and_groups(engine):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=40, stop_token_ids=(EOS,), seed=5)
    out = engine.generate(PROMPTS, params, key=3)
    rows = len(PROMPTS) * 4
    assert out.num_rollouts == rows
    assert out.group_ids.tolist() == [i // 4 for i in range(rows)]
    assert out.prompt_lengths.tolist() == [len(PROMPTS[i // 4]) for i in range(rows)]
    assert out.response_ids.shape == out.response_mask.shape == out.logprobs.shape
    assert out.logprobs.dtype == torch.float32 and out.response_ids.dtype == torch.int64
    assert out.response_ids.shape[1] == int(out.response_lengths.max())
    for i, (ids, mask) in enumerate(zip(out.response_ids, out.response_mask)):
        n_tok = int(mask.sum())
        assert 1 <= n_tok <= 40 and bool(mask[:n_tok].all()) and not bool(mask[n_tok:].any())
        assert bool((ids[n_tok:] == PAD).all())
        body = ids[:n_tok].tolist()
        if out.finished[i]:
            assert body[-1] == EOS and EOS not in body[:-1]
        else:
            assert n_tok == 40 and EOS not in body
        p = PROMPTS[i // 4]
        assert out.prompt_ids[i, :len(p)].tolist() == p and bool((out.prompt_ids[i, len(p):] == PAD).all())
    assert bool((out.logprobs[~out.response_mask] == 0).all())
    assert bool((out.logprobs[out.response_mask] <= 0).all())
    assert bool(out.finished.any()), "the toy student should end some answers with <eos>"


def test_requests_are_spread_over_servers_with_per_sample_seeds(engine, servers):
    params = SamplingParams(n=3, temperature=0.8, top_k=0, max_new_tokens=4, seed=1)
    engine.generate(PROMPTS, params, key=9)
    calls = [body for s in servers for body in s.calls_to("/generate")]
    assert len(calls) == len(PROMPTS)  # one request per prompt
    assert all(len(s.calls_to("/generate")) > 0 for s in servers)
    seeds = set()
    for body in calls:
        assert body["input_ids"] in [[p] * 3 for p in PROMPTS]  # token ids, n items per request
        assert body["return_logprob"] is True
        assert len(body["sampling_params"]) == 3
        for sp in body["sampling_params"]:
            assert sp["n"] == 1 and sp["top_k"] == -1 and sp["temperature"] == 0.8
            assert sp["ignore_eos"] is True and sp["stop_token_ids"] == []  # no stop token asked
            seeds.add(sp["sampling_seed"])
    assert len(seeds) == 3 * len(PROMPTS)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 0.9), (1.3, 0, 1.0), (0.0, 0, 1.0)])
def test_logprobs_are_the_models_log_softmax(engine, model_dir, temperature, top_k, top_p):
    params = SamplingParams(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=8,
                            stop_token_ids=(EOS,), seed=2)
    out = engine.generate(PROMPTS[:3], params, key=1)
    for r in range(out.num_rollouts):
        prompt = PROMPTS[r // 2]
        resp = out.responses()[r]
        ref = reference_logprobs(model_dir, prompt, resp, temperature=params.logprob_temperature)
        got = out.logprobs[r, :len(resp)].double()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
        if temperature == 0:  # greedy: each token is the argmax of the model's distribution
            full = reference_logprobs(model_dir, prompt, resp, top_k=1)[1]
            assert full.indices[:, 0].tolist() == resp


def test_same_seed_and_key_reproduce_other_keys_differ(engine):
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, stop_token_ids=(EOS,), seed=11)
    a = engine.generate(PROMPTS, params, key=4)
    b = engine.generate(PROMPTS, params, key=4)
    for field in ("response_ids", "response_mask", "logprobs", "finished", "prompt_ids"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    c = engine.generate(PROMPTS, params, key=5)
    d = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=10,
                                                stop_token_ids=(EOS,), seed=12), key=4)
    assert a.responses() != c.responses() and a.responses() != d.responses()


def test_no_stop_tokens_runs_to_max_new_tokens(engine):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=9, seed=3)
    out = engine.generate(PROMPTS[:2], params, key=0)
    assert out.response_lengths.tolist() == [9] * 4 and not bool(out.finished.any())


def test_a_short_answer_is_retried_then_raises(engine, servers):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3)
    for s in servers:
        s.inject_fault("short_logprobs", count=1)
    out = engine.generate(PROMPTS[:1], params, key=0)  # one bad answer, then a good one
    assert out.num_rollouts == 2
    for s in servers:
        s.inject_fault("short_logprobs", count=100)
    with pytest.raises(SGLangError, match=r"request 0.*output log-probs for"):
        engine.generate(PROMPTS[:1], params, key=0)
    for s in servers:
        s.clear_faults()


def test_top_k_zero_is_sent_as_minus_one_which_the_server_requires(engine, servers):
    assert sampling_payload(SamplingParams(top_k=0), seed=1)["top_k"] == -1
    assert sampling_payload(SamplingParams(top_k=3), seed=1)["top_k"] == 3
    bad = {"input_ids": [1, 4], "sampling_params": {"top_k": 0, "max_new_tokens": 2}}
    with pytest.raises(SGLangBadRequest, match="top_k must be -1"):
        engine.client.post("/generate", bad)


def _item(ids, triples, reason):
    return {"output_ids": ids, "meta_info": {"output_token_logprobs": triples, "finish_reason": reason}}


def test_parse_sample_rules():
    params = SamplingParams(n=1, max_new_tokens=4, stop_token_ids=(EOS, 17))
    ok = _item([5, 2], [[-0.1, 5, None], [-0.2, 2, None]], {"type": "stop", "matched": 2})
    assert parse_sample(ok, params) == ([5, 2], [-0.1, -0.2], True)
    # the server trimmed the stop token from output_ids but kept its log-prob: appended back
    trimmed = _item([5], [[-0.1, 5, None], [-0.2, 17, None]], {"type": "stop", "matched": 17})
    assert parse_sample(trimmed, params) == ([5, 17], [-0.1, -0.2], True)
    length = _item([5, 6, 7, 8], [[-0.1, t, None] for t in (5, 6, 7, 8)], {"type": "length", "length": 4})
    assert parse_sample(length, params)[2] is False
    # SGLang checks the length limit before the stop tokens: EOS as the last allowed token
    # comes back as "length", and the response did finish (as LocalEngine says)
    eos_at_limit = _item([5, 6, 7, EOS], [[-0.1, t, None] for t in (5, 6, 7, EOS)], {"type": "length", "length": 4})
    assert parse_sample(eos_at_limit, params) == ([5, 6, 7, EOS], [-0.1] * 4, True)
    tiny_positive = _item([5], [[3e-5, 5, None]], {"type": "length", "length": 1})
    assert parse_sample(tiny_positive, params)[1] == [0.0]
    invalid = [
        _item([5, 2], [[-0.1, 5, None]], {"type": "stop", "matched": 2}),  # short log-probs
        _item([5], [[None, 5, None]], {"type": "length"}),  # null log-prob
        _item([5], [[-0.1, 6, None]], {"type": "length"}),  # wrong token in the triple
        _item([5], [[0.5, 5, None]], {"type": "length"}),  # log-prob > 0
        _item([], [], {"type": "length"}),  # empty
        _item([5], [[-0.1, 5, None]], {"type": "abort", "message": "x"}),
        {"output_ids": [5]},
    ]
    for item in invalid:
        with pytest.raises(ResponseInvalid):
            parse_sample(item, params)
    eos_not_asked = _item([5, 3], [[-0.1, 5, None], [-0.1, 3, None]], {"type": "stop", "matched": 3})
    with pytest.raises(SGLangError, match="not in stop_token_ids"):
        parse_sample(eos_not_asked, params)
    too_long = _item([5] * 5, [[-0.1, 5, None]] * 5, {"type": "length"})
    with pytest.raises(SGLangError, match="max_new_tokens"):
        parse_sample(too_long, params)


def test_logprob_gap_and_check():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    a = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    b = torch.tensor([[-1.1, -2.0, 0.0], [-0.2, 5.0, 5.0]])
    gap = logprob_gap(a, b, mask)
    assert gap["max_abs"] == pytest.approx(0.3) and gap["mean_abs"] == pytest.approx(0.4 / 3)
    assert logprob_gap(a, b, torch.zeros_like(mask)) == {"mean_abs": 0.0, "max_abs": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_logprobs(a, a + 1e-3, mask)  # small gap: silent
    with pytest.warns(RuntimeWarning, match="disagree"):
        check_logprobs(a, b, mask, mean_threshold=0.05)
    with pytest.raises(ValueError, match="disagree"):
        check_logprobs(a, b, mask, max_threshold=0.1, raise_error=True)
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_gap(a, b[:, :2], mask)


def test_engine_logprobs_match_a_trainer_recompute(engine, model_dir):
    """What the trainer does on first use: recompute the rollouts' log-probs and measure the gap
    (here the trainer is the float64 HF model; a temperature mismatch shows up at once)."""
    params = SamplingParams(n=2, temperature=0.6, max_new_tokens=8, stop_token_ids=(EOS,), seed=4)
    out = engine.generate(PROMPTS[:2], params, key=2)
    trainer = torch.zeros_like(out.logprobs)
    wrong_t = torch.zeros_like(out.logprobs)
    for r, resp in enumerate(out.responses()):
        trainer[r, :len(resp)] = reference_logprobs(model_dir, PROMPTS[r // 2], resp, 0.6).float()
        wrong_t[r, :len(resp)] = reference_logprobs(model_dir, PROMPTS[r // 2], resp, 1.0).float()
    assert check_logprobs(out.logprobs, trainer, out.response_mask)["max_abs"] < 1e-4
    assert logprob_gap(out.logprobs, wrong_t, out.response_mask)["max_abs"] > 1e-2


def test_update_weights_without_strategy_raises(engine):
    with pytest.raises(SGLangError, match="no weight_sync"):
        engine.update_weights(1)
