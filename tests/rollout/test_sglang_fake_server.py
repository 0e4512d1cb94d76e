"""The test server speaks SGLang's /generate dialect (docs/sglang-api.md): single and batch
input, n (prompt-major), max_new_tokens 0, logprob_start_len alignment (first entry null),
return_logprob off, stop tokens vs ignore_eos, errors, and the small endpoints. The other test
files rely on these shapes, so they are pinned here."""
import pytest
import requests
import torch

from tests.rollout.fake_sglang_server import FakeSGLangServer, reference_logprobs, toy_hf_dir

P = [1, 9, 12, 11, 13, 5, 12, 9, 14]


@pytest.fixture(scope="module")
def server():
    with FakeSGLangServer(toy_hf_dir()) as s:
        yield s


def _post(server, body, path="/generate"):
    return requests.post(server.url + path, json=body, timeout=30)


def test_single_batch_and_n(server):
    sp = {"max_new_tokens": 3, "temperature": 1.0, "sampling_seed": 5}
    single = _post(server, {"input_ids": P, "sampling_params": sp}).json()
    assert isinstance(single, dict) and len(single["output_ids"]) <= 3
    assert "output_token_logprobs" not in single["meta_info"]  # return_logprob off
    assert single["meta_info"]["weight_version"] == "default" and single["meta_info"]["prompt_tokens"] == 9
    n3 = _post(server, {"input_ids": P, "sampling_params": {**sp, "n": 3}}).json()
    assert isinstance(n3, list) and len(n3) == 3
    # SGLang's n copies one request: the same sampling_seed gives the same tokens
    assert n3[0]["output_ids"] == n3[1]["output_ids"] == single["output_ids"]
    batch = _post(server, {"input_ids": [P, [1, 4, 14]], "sampling_params": {**sp, "n": 2}}).json()
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [9, 9, 3, 3]  # prompt-major


def test_logprob_start_len_alignment(server):
    body = {"input_ids": P, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2}
    out = _post(server, body).json()
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    entries = out["meta_info"]["input_token_logprobs"]
    assert len(entries) == len(P) and entries[0] == [None, P[0], None]
    assert [e[1] for e in entries] == P
    ref = reference_logprobs(toy_hf_dir(), P[:1], P[1:])
    torch.testing.assert_close(torch.tensor([e[0] for e in entries[1:]], dtype=torch.float64), ref,
                               rtol=1e-5, atol=2e-5)
    tops = out["meta_info"]["input_top_logprobs"]
    assert tops[0] is None and all(len(t) == 2 for t in tops[1:])
    start5 = _post(server, {**body, "logprob_start_len": 5}).json()["meta_info"]["input_token_logprobs"]
    assert start5[0] == [None, P[5], None] and start5[1:] == entries[6:]
    default = _post(server, {**body, "logprob_start_len": -1}).json()["meta_info"]["input_token_logprobs"]
    assert default == [[None, P[-1], None]]


def test_stop_tokens_and_ignore_eos(server):
    greedy = {"max_new_tokens": 40, "temperature": 0.0}
    free = _post(server, {"input_ids": P, "sampling_params": {**greedy, "ignore_eos": True}}).json()
    assert len(free["output_ids"]) == 40 and free["meta_info"]["finish_reason"]["type"] == "length"
    eos = _post(server, {"input_ids": P, "sampling_params": greedy}).json()  # stops at the model's EOS
    assert eos["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2} and eos["output_ids"][-1] == 2
    stop_at = free["output_ids"][3]
    first = free["output_ids"].index(stop_at)
    custom = _post(server, {"input_ids": P, "sampling_params": {**greedy, "stop_token_ids": [stop_at]}}).json()
    assert custom["output_ids"] == free["output_ids"][:first + 1]  # the stop token is kept
    assert custom["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}
    # as in SGLang's _check_token_based_finish, ignore_eos disables stop_token_ids too
    both = _post(server, {"input_ids": P, "sampling_params": {**greedy, "stop_token_ids": [stop_at],
                                                               "ignore_eos": True}}).json()
    assert both["output_ids"] == free["output_ids"]


def test_errors_and_small_endpoints(server):
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert requests.get(server.url + "/flush_cache", timeout=5).text.startswith("Cache flushed")
    assert requests.get(server.url + "/get_model_info", timeout=5).json()["weight_version"] == "default"
    r = _post(server, {"input_ids": P, "sampling_params": {"top_p": 0}})
    assert r.status_code == 400 and "top_p" in r.json()["error"]["message"]
    r = _post(server, {"input_ids": list(range(1, 17)) * 4})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = requests.post(server.url + "/get_weights_by_name", json={"name": "nope"}, timeout=5)
    assert r.status_code == 400 and r.json() == {"error": {"message": "Get parameter by name failed"}}
    w = requests.post(server.url + "/get_weights_by_name",
                      json={"name": "model.layers.0.mlp.up_proj.weight", "truncate_size": 2}, timeout=5).json()
    assert len(w) == 2 and len(w[0]) == 64  # the first rows, as SGLang's Llama answers


def test_rids_abort_and_duplicates(server):
    """As sglang's tokenizer manager: a rid of a running request is refused, /abort_request
    {"rid"} ends that request only (a batch's rids are rid_0, rid_1, ...), an unknown rid is
    ignored."""
    import threading

    sp = {"max_new_tokens": 2, "temperature": 0.0}
    server.inject_fault("slow", count=2, delay=30)
    answers = {}

    def send(name, body):
        answers[name] = _post(server, body)

    threads = [threading.Thread(target=send, args=("a", {"input_ids": P, "sampling_params": sp, "rid": "a"})),
               threading.Thread(target=send, args=("b", {"input_ids": [P, P], "sampling_params": sp, "rid": "b"}))]
    for t in threads:
        t.start()
    while {"a", "b_0", "b_1"} - server._live_rids:
        threading.Event().wait(0.01)
    r = _post(server, {"input_ids": P, "sampling_params": sp, "rid": "b_1"})
    assert r.status_code == 400 and "Duplicate request ID detected: b_1" in r.text
    assert _post(server, {"rid": "nope"}, "/abort_request").status_code == 200
    assert _post(server, {"rid": "b_1"}, "/abort_request").status_code == 200
    threads[1].join(timeout=10)
    assert answers["b"].json()["meta_info"]["finish_reason"]["type"] == "abort" and threads[0].is_alive()
    _post(server, {"rid": "a"}, "/abort_request")
    threads[0].join(timeout=10)
    assert answers["a"].json()["meta_info"]["finish_reason"]["type"] == "abort" and not server._live_rids
    bad = _post(server, {"input_ids": [P, P], "sampling_params": sp, "rid": ["x"]})
    assert bad.status_code == 400 and "rids length mismatch" in bad.text
