"""SGLangTeacher: teacher log-probs of rollouts' response tokens by prompt scoring, aligned with
Rollouts.response_ids, equal to the model's own (float64 reference); top-k; a short or
malformed answer raises instead of being padded."""
import pytest
import torch

from scope_megatron.rollout import SamplingParams
from scope_megatron.rollout.sglang import SGLangClient, SGLangEngine, SGLangError, SGLangTeacher
from scope_megatron.rollout.sglang.client import ResponseInvalid
from scope_megatron.rollout.sglang.teacher import parse_scores
from tests.rollout.fake_sglang_server import FakeSGLangServer, perturbed_copy, reference_logprobs, toy_hf_dir

EOS = 2
PROMPTS = [[1, 9, 12, 11, 13, 5, 12, 9, 14], [1, 4, 5, 13, 6, 7, 14], [1, 9, 6, 10, 13, 8, 8, 8, 14]]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    # a teacher that differs from the student (whose servers sample the rollouts)
    return perturbed_copy(toy_hf_dir(), tmp_path_factory.mktemp("teacher"), scale=1.2, shift=0.0)


@pytest.fixture(scope="module")
def rollouts():
    with FakeSGLangServer(toy_hf_dir()) as student:
        engine = SGLangEngine(SGLangClient([student.url], timeout=60), pad_id=0)
        params = SamplingParams(n=3, temperature=1.0, max_new_tokens=20, stop_token_ids=(EOS,), seed=7)
        out = engine.generate(PROMPTS, params, key=1)
        engine.close()
    return out


@pytest.fixture(scope="module")
def teacher_server(teacher_dir):
    with FakeSGLangServer(teacher_dir) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(teacher_server):
    teacher_server.clear_faults()
    teacher_server.calls.clear()


def test_teacher_logprobs_are_the_teachers_model_logprobs(rollouts, teacher_server, teacher_dir):
    teacher = SGLangTeacher(SGLangClient([teacher_server.url], timeout=60), top_logprobs_num=4, pad_id=0)
    scores = teacher.score(rollouts)
    assert scores.logprobs.shape == rollouts.response_ids.shape and scores.logprobs.dtype == torch.float32
    assert scores.top_ids.shape == (*rollouts.response_ids.shape, 4)
    assert bool((scores.logprobs[~rollouts.response_mask] == 0).all())
    assert bool((scores.top_ids[~rollouts.response_mask] == 0).all())
    for r, resp in enumerate(rollouts.responses()):
        prompt = PROMPTS[rollouts.group_ids[r]]
        ref, top = reference_logprobs(teacher_dir, prompt, resp, top_k=4)
        torch.testing.assert_close(scores.logprobs[r, :len(resp)].double(), ref, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(scores.top_logprobs[r, :len(resp)].double(), top.values, rtol=1e-5, atol=2e-5)
        assert scores.top_ids[r, :len(resp)].tolist() == top.indices.tolist()
    # the teacher is not the student: its log-probs differ from the sampling log-probs
    assert (scores.logprobs - rollouts.logprobs)[rollouts.response_mask].abs().max() > 1e-2
    # the request: prompt + response ids, no generation, log-probs from the last prompt token
    bodies = teacher_server.calls_to("/generate")  # in completion order (requests run concurrently)
    expected = sorted((PROMPTS[g] + resp, len(PROMPTS[g]) - 1)
                      for g, resp in zip(rollouts.group_ids.tolist(), rollouts.responses()))
    assert sorted((b["input_ids"], b["logprob_start_len"]) for b in bodies) == expected
    for body in bodies:
        assert body["sampling_params"] == {"max_new_tokens": 0, "temperature": 1.0}
        assert body["return_logprob"] is True and body["top_logprobs_num"] == 4
    teacher.client.close()


def test_a_short_teacher_answer_is_retried_then_raises(rollouts, teacher_server):
    teacher = SGLangTeacher(SGLangClient([teacher_server.url], retries=2, backoff=0.01, timeout=60))
    teacher_server.inject_fault("short_logprobs", count=1)
    scores = teacher.score(rollouts)  # one short answer, retried
    assert bool((scores.logprobs[rollouts.response_mask] < 0).all())
    teacher_server.inject_fault("short_logprobs", count=1000)
    with pytest.raises(SGLangError, match=r"input log-probs for \d+ response tokens"):
        teacher.score(rollouts)
    teacher.client.close()


def test_parse_scores_rules():
    good = {"meta_info": {"input_token_logprobs": [[None, 9, None], [-0.5, 4, None], [-1e-5, 2, None]]}}
    assert parse_scores(good, [4, 2], 0) == ([-0.5, -1e-5], None, None)
    assert parse_scores([good], [4, 2], 0)[0] == [-0.5, -1e-5]  # a batch of one
    bad = [
        {"meta_info": {"input_token_logprobs": [[None, 9, None], [-0.5, 4, None]]}},  # short
        {"meta_info": {"input_token_logprobs": [[None, 9, None], [-0.5, 4, None], [None, 2, None]]}},
        {"meta_info": {"input_token_logprobs": [[None, 9, None], [-0.5, 5, None], [-0.1, 2, None]]}},
        {"meta_info": {"input_token_logprobs": [[None, 9, None], [-0.5, 4, None], [0.3, 2, None]]}},
        {"meta_info": {"input_token_logprobs": [[None, 9, None], [float("nan"), 4, None], [-0.1, 2, None]]}},
        {"meta_info": {}},
        {"text": ""},
    ]
    for answer in bad:
        with pytest.raises(ResponseInvalid):
            parse_scores(answer, [4, 2], 0)
    with pytest.raises(ResponseInvalid, match="top log-probs"):
        parse_scores({"meta_info": {**good["meta_info"], "input_top_logprobs": [None, [[-0.1, 3, None]],
                                                                              [[-0.1, 3, None]]]}}, [4, 2], 2)



def test_sglang_zero_label_quirk_is_tolerated_only_as_such():
    """Real SGLang 0.5.21 labels some scored input tokens as id 0 while the value is the token's
    (measured against the model): accepted with a warning; many zero labels (a shifted alignment),
    or a value its own top-k contradicts, are not."""
    def answer(labels, values, tops=None):
        meta = {"input_token_logprobs": [[None, 9, None]] + [[v, t, None] for v, t in zip(values, labels)]}
        if tops is not None:
            meta["input_top_logprobs"] = [None] + tops
        return {"meta_info": meta}

    from scope_megatron.rollout.sglang import teacher as teacher_module

    teacher_module._RELABELED["warned"] = False  # warned once per process
    response = [4, 7, 5, 6, 3, 4, 7, 5, 17, 2]
    values = [-0.1 * (i + 1) for i in range(10)]
    labels = list(response)
    labels[8] = 0
    with pytest.warns(UserWarning, match="labeled 1 scored response token"):
        got, _, _ = parse_scores(answer(labels, values), response, 0)
    assert got == values
    shifted = [0] * 10  # everything labeled 0: not the quirk
    with pytest.raises(ResponseInvalid, match="not aligned"):
        parse_scores(answer(shifted, values), response, 0)
    tops = [[[v, t, None], [-9.0, 1, None]] for v, t in zip(values, response)]
    assert parse_scores(answer(labels, values, tops), response, 2)[0] == values
    tops[8][0][0] = -3.0  # the top-k disagrees with the value given for the relabeled token
    with pytest.raises(ResponseInvalid, match="labeled 0"):
        parse_scores(answer(labels, values, tops), response, 2)


def test_teacher_temperature_other_than_one_needs_a_scaling_server():
    client = SGLangClient(["http://127.0.0.1:9"])
    with pytest.raises(ValueError, match="temperature 1"):
        SGLangTeacher(client, temperature=0.7)
    teacher = SGLangTeacher(client, temperature=0.7, server_scales_temperature=True)
    assert teacher.payload([1, 2], [3])["sampling_params"]["temperature"] == 0.7
