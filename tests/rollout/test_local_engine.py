"""LocalEngine: the decoding loop on plain models, and its rank protocol in gloo groups."""
import pytest
import torch

from scope_megatron.rollout import LocalEngine, SamplingParams
from tests.conftest import SESSION_SEED
from tests.distributed import run_workers
from tests.rollout.toy_models import BigramModel

PAD, EOS = 0, 1


def _engine(gen, vocab=12, max_len=64):
    model = BigramModel(vocab, max_len, gen)
    return LocalEngine(model, pad_id=PAD), model


def test_shapes_masks_and_groups(gen):
    engine, model = _engine(gen)
    prompts = [[2, 3, 4], [5, 6], [7]]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=9, stop_token_ids=(EOS,), seed=3)
    out = engine.generate(prompts, params, key=7)
    assert out.num_rollouts == 12
    assert out.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert out.prompt_lengths.tolist() == [3] * 4 + [2] * 4 + [1] * 4
    for i, (ids, mask) in enumerate(zip(out.response_ids, out.response_mask)):
        n_tok = int(mask.sum())
        assert 1 <= n_tok <= 9 and bool(mask[:n_tok].all()) and not bool(mask[n_tok:].any())
        assert bool((ids[n_tok:] == PAD).all())
        body = ids[:n_tok].tolist()
        if out.finished[i]:
            assert body[-1] == EOS and EOS not in body[:-1]
        else:
            assert n_tok == 9 and EOS not in body
        assert out.prompt_ids[i, : out.prompt_lengths[i]].tolist() == prompts[i // 4]
    assert bool((out.logprobs[~out.response_mask] == 0).all())


def test_logprobs_are_the_models_at_each_prefix(gen):
    engine, model = _engine(gen)
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=6, stop_token_ids=(EOS,))
    out = engine.generate([[4, 5]], params)
    for i in range(out.num_rollouts):
        seq = [4, 5] + out.responses()[i]
        for t, tok in enumerate(out.responses()[i]):
            prefix = torch.tensor([seq[: 2 + t]])
            logits = model.logits_at(prefix, torch.tensor([1 + t]))[0]
            expected = (logits / 0.7).log_softmax(-1)[tok]
            torch.testing.assert_close(out.logprobs[i, t], expected)


def test_greedy_follows_the_argmax_chain(gen):
    engine, model = _engine(gen)
    out = engine.generate([[3]], SamplingParams(n=2, temperature=0.0, max_new_tokens=5))
    seq = [3]
    for _ in range(5):
        seq.append(int(model.logits_at(torch.tensor([seq]), torch.tensor([len(seq) - 1]))[0].argmax()))
    assert out.responses()[0] == seq[1:] and out.responses()[1] == seq[1:]


def test_reproducible_by_seed_and_key(gen):
    engine, _ = _engine(gen)
    params = SamplingParams(n=5, temperature=1.0, max_new_tokens=8, stop_token_ids=(EOS,), seed=11)
    a = engine.generate([[2, 3], [4]], params, key=5)
    b = engine.generate([[2, 3], [4]], params, key=5)
    c = engine.generate([[2, 3], [4]], params, key=6)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_stops_early_when_everything_finished(gen):
    engine, model = _engine(gen)
    model.table[:, EOS] = 50.0  # EOS right away
    out = engine.generate([[2, 3]], SamplingParams(n=3, temperature=1.0, max_new_tokens=20, stop_token_ids=(EOS,)))
    assert model.calls == 1 and out.response_ids.shape[1] == 1 and bool(out.finished.all())


def test_bad_prompts(gen):
    engine, _ = _engine(gen)
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[2], []], SamplingParams())


class _LastStageOnly(BigramModel):
    """Only the last rank holds logits (a pipeline's last stage); share() broadcasts from it."""

    def __init__(self, *a, rank, world, **kw):
        super().__init__(*a, **kw)
        self.rank, self.world = rank, world

    def next_token_logits(self, tokens, last):
        return super().next_token_logits(tokens, last) if self.rank == self.world - 1 else None

    def share(self, t, like):
        import torch.distributed as dist
        out = t if t is not None else like
        dist.broadcast(out, src=self.world - 1)
        return out


def pipeline_protocol_worker(ctx):
    gen = torch.Generator().manual_seed(ctx.seed)
    model = _LastStageOnly(12, 64, gen, rank=ctx.rank, world=ctx.world_size)
    engine = LocalEngine(model, pad_id=PAD)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=7, stop_token_ids=(EOS,), seed=1)
    out = engine.generate([[2, 3], [4, 5, 6]], params, key=2)
    single = LocalEngine(BigramModel(12, 64, torch.Generator().manual_seed(ctx.seed)), pad_id=PAD)
    ref = single.generate([[2, 3], [4, 5, 6]], params, key=2)
    return {"same_as_single_process": bool(torch.equal(out.response_ids, ref.response_ids)
                                           and torch.equal(out.logprobs, ref.logprobs)),
            "ids": out.response_ids.tolist()}


def test_ranks_without_logits_get_the_same_rollouts():
    results = run_workers("tests.rollout.test_local_engine:pipeline_protocol_worker", 2, seed=SESSION_SEED,
                          timeout=120)
    assert all(r["same_as_single_process"] for r in results)
    assert results[0]["ids"] == results[1]["ids"]


def test_incremental_path_samples_what_full_recompute_samples(gen):
    from tests.rollout.toy_models import CachedBigramModel

    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    cached = CachedBigramModel(12, 64, torch.Generator().manual_seed(seed))
    plain = BigramModel(12, 64, torch.Generator().manual_seed(seed))
    params = SamplingParams(n=4, temperature=1.0, top_k=6, max_new_tokens=10, stop_token_ids=(EOS,), seed=5)
    a = LocalEngine(cached, pad_id=PAD).generate([[2, 3, 4], [5, 6, 7]], params, key=3)
    b = LocalEngine(plain, pad_id=PAD).generate([[2, 3, 4], [5, 6, 7]], params, key=3)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs)
    assert cached.cache is None  # end() ran


def test_incremental_path_with_prompts_of_several_lengths(gen):
    """One lockstep batch per prompt length, merged back in the prompts' order; every response
    is a valid continuation with the model's log-probs."""
    from tests.rollout.toy_models import CachedBigramModel

    model = CachedBigramModel(12, 64, gen)
    prompts = [[2, 3], [5, 6, 7], [8], [4, 4]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=7, stop_token_ids=(EOS,), seed=2)
    out = LocalEngine(model, pad_id=PAD).generate(prompts, params, key=9)
    again = LocalEngine(model, pad_id=PAD).generate(prompts, params, key=9)
    assert torch.equal(out.response_ids, again.response_ids)
    assert out.group_ids.tolist() == [g for g in range(4) for _ in range(3)]
    for row in range(out.num_rollouts):
        prompt = prompts[row // 3]
        assert out.prompt_ids[row, :len(prompt)].tolist() == prompt and int(out.prompt_lengths[row]) == len(prompt)
        seq = list(prompt)
        for t, tok in enumerate(out.responses()[row]):
            logits = model.logits_at(torch.tensor([seq]), torch.tensor([len(seq) - 1]))[0]
            torch.testing.assert_close(out.logprobs[row, t], logits.log_softmax(-1)[tok])
            seq.append(tok)
