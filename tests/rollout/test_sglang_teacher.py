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


# -- the teacher's tokenizer is the student's ------------------------------------------------------

def _toy_tokenizers():
    from transformers import AutoTokenizer

    from scope_megatron.data.toy_arithmetic import ToyArithmetic

    return ToyArithmetic().tokenizer, AutoTokenizer.from_pretrained(toy_hf_dir())


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory):
    """The toy model served with another tokenizer: the same 18 symbols in reverse order (the same
    vocabulary size, so the server accepts every student id, but the ids mean other strings)."""
    from scope_megatron.data.toy_arithmetic import ToyArithmetic
    from tests.rollout.fake_sglang_server import retokenized_copy

    symbols = ToyArithmetic().tokenizer.tokens[3:]
    return retokenized_copy(toy_hf_dir(), tmp_path_factory.mktemp("other-tok"), symbols[::-1])


def test_the_fake_server_returns_token_texts_as_sglang_does(teacher_server):
    """return_text_in_logprobs fills the third slot of every log-prob triple with the id's text,
    decoded one id at a time by the served tokenizer (sglang's detokenize_logprob_tokens); without
    it the slot is null."""
    _, hf = _toy_tokenizers()
    client = SGLangClient([teacher_server.url], timeout=60)
    body = {"input_ids": [1, 9, 12, 11, 13, 5, 16], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    meta = client.post("/generate", body)["meta_info"]
    assert [t[2] for t in meta["input_token_logprobs"]] == [hf.decode([i]) for i in body["input_ids"]]
    assert [t[2] for t in meta["output_token_logprobs"]] == [hf.decode([t[1]]) for t in meta["output_token_logprobs"]]
    for entry in meta["output_top_logprobs"] + meta["input_top_logprobs"][1:]:
        assert [t[2] for t in entry] == [hf.decode([t[1]]) for t in entry]
    assert meta["input_top_logprobs"][0] is None
    meta = client.post("/generate", {**body, "return_text_in_logprobs": False})["meta_info"]
    assert all(t[2] is None for t in meta["input_token_logprobs"] + meta["output_token_logprobs"])
    client.close()


def test_a_teacher_with_the_students_tokenizer_passes_the_check(teacher_server):
    """The teacher (another model, the same tokenizer files) decodes every probed student id as
    the student does: for the toy world's CharTokenizer and for its HF form. One /generate per
    check: the probe ids in sequences of <= 32, texts asked for, nothing generated."""
    from scope_megatron.rollout.sglang.teacher import PROBE_CHUNK, tokenizer_probe_ids

    char, hf = _toy_tokenizers()
    teacher = SGLangTeacher(SGLangClient([teacher_server.url], timeout=60))
    for tok in (char, hf):
        teacher_server.calls.clear()
        assert teacher.check_tokenizer(tok) == {teacher_server.url: "ok"}
        (body,) = teacher_server.calls_to("/generate")
        assert [i for chunk in body["input_ids"] for i in chunk] == tokenizer_probe_ids(tok)
        assert all(0 < len(chunk) <= PROBE_CHUNK for chunk in body["input_ids"])
        assert body["return_text_in_logprobs"] is True and body["logprob_start_len"] == 0
        assert body["sampling_params"]["max_new_tokens"] == 0
    assert set(tokenizer_probe_ids(char)) == set(range(18))  # a small vocabulary is probed whole
    teacher.client.close()


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(other_tokenizer_dir, teacher_server):
    from scope_megatron.rollout.sglang.teacher import TokenizerMismatch

    char, hf = _toy_tokenizers()
    with FakeSGLangServer(other_tokenizer_dir) as other:
        # two teacher servers, one of them wrong: the wrong one is named, the right one is not
        teacher = SGLangTeacher(SGLangClient([teacher_server.url, other.url], timeout=60))
        for tok, student in ((char, "the toy world's tokenizer"), (hf, None)):
            with pytest.raises(TokenizerMismatch) as info:
                teacher.check_tokenizer(tok, student=student)
            msg = str(info.value)
            assert "does not share the student's tokenizer" in msg
            assert (student or str(toy_hf_dir())) in msg  # the student's tokenizer
            assert f"{other.url} ({other_tokenizer_dir})" in msg and teacher_server.url not in msg
            # 15 symbols reversed: all but the middle one ('7', id 10) moved
            assert "14 of 18 probed ids decode differently" in msg and "e.g. id 3: student '0', teacher '}'" in msg
        teacher.client.close()


def test_a_teacher_that_rejects_the_students_ids_is_refused(teacher_server):
    """A student vocabulary larger than the teacher's: the server rejects the probe (the fake
    server answers 400 for ids beyond its vocabulary) and the check says so."""
    from scope_megatron.data.tokenizer import CharTokenizer
    from scope_megatron.data.toy_arithmetic import ToyArithmetic
    from scope_megatron.rollout.sglang.teacher import TokenizerMismatch

    bigger = CharTokenizer(ToyArithmetic().tokenizer.tokens[3:] + ("a", "b"))
    teacher = SGLangTeacher(SGLangClient([teacher_server.url], timeout=60))
    with pytest.raises(TokenizerMismatch, match="rejected 20 token ids of the student's tokenizer") as info:
        teacher.check_tokenizer(bigger)
    assert f"{teacher_server.url} ({teacher_server.model_path})" in str(info.value)
    assert "outside the vocabulary" in str(info.value)  # the server's own message
    teacher.client.close()


def test_a_server_without_token_texts_is_warned_about_not_refused(teacher_dir):
    from scope_megatron.rollout.sglang import teacher as teacher_module

    char, _ = _toy_tokenizers()
    teacher_module._UNVERIFIED_WARNED["warned"] = False  # warned once per process
    with FakeSGLangServer(teacher_dir, text_in_logprobs=False) as old:
        teacher = SGLangTeacher(SGLangClient([old.url], timeout=60))
        with pytest.warns(UserWarning, match=r"could not verify that the teacher server\(s\) .* share the "
                                             r"student's tokenizer"):
            assert teacher.check_tokenizer(char) == {old.url: "unverified"}
        teacher.client.close()


def test_a_server_labeling_every_probe_token_0_is_refused(teacher_server, monkeypatch):
    """A server that labels every probe token id 0 (and so gives id 0's text for each) compares no
    student id under its own: the check must fail, not pass on id 0 alone."""
    from scope_megatron.rollout.sglang import teacher as teacher_module

    char, _ = _toy_tokenizers()
    zero_text = teacher_module.student_token_texts(char, [0])[0][0]
    real = teacher_module.parse_probe
    monkeypatch.setattr(teacher_module, "parse_probe",
                        lambda answer, chunks: [(sent, 0, zero_text) for sent, _, _ in real(answer, chunks)])
    teacher = SGLangTeacher(SGLangClient([teacher_server.url], timeout=60))
    with pytest.raises(SGLangError, match=rf"teacher server {teacher_server.url} .*: 17 of 18 tokenizer probe "
                                          "tokens came back labeled id 0"):  # all but id 0
        teacher.check_tokenizer(char)
    teacher.client.close()


def test_compare_probe_rules():
    from scope_megatron.rollout.sglang.teacher import compare_probe

    expected = {0: ("<pad>",), 3: ("0",), 4: ("1",)}
    assert compare_probe([(3, 3, None), (4, 4, None)], expected) is None  # no texts: unverifiable
    assert compare_probe([(3, 3, "0"), (4, 4, "1"), (3, 3, "0")], expected) == []
    # sglang 0.5.21's id-0 label: the text is id 0's, compared as such (a few of them)
    assert compare_probe([(3, 0, "<pad>"), (4, 4, "1")], expected) == []
    assert compare_probe([(3, 3, "0")] * 14 + [(4, 0, "<pad>")] * 2, expected) == []  # 16 // 8
    # more than the quirk explains: their texts are id 0's, the ids sent would never be compared
    with pytest.raises(SGLangError, match="2 of 2 tokenizer probe tokens came back labeled id 0"):
        compare_probe([(3, 0, "<pad>"), (4, 0, "<pad>")], expected)
    with pytest.raises(SGLangError, match="3 of 16 tokenizer probe tokens"):
        compare_probe([(3, 3, "0")] * 13 + [(4, 0, "<pad>")] * 3, expected)
    assert compare_probe([(0, 0, "<pad>"), (4, 4, "1")], expected) == []  # id 0 under its own label
    assert compare_probe([(3, 3, "1"), (4, 4, "1")], expected) == [(3, ("0",), "1")]
    assert compare_probe([(3, 4, "1")], expected) == [(3, ("0",), "1")]  # another label: not aligned
    assert compare_probe([(3, 3, "0"), (4, 4, None)], expected) == [(4, ("1",), "<none>")]
