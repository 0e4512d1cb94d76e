"""SGLangClient failure handling against the test server's fault injection: retries with backoff
for transient failures (5xx, 429, timeouts, refused and closed connections, malformed JSON), a
clear SGLangError once they are spent, no retry for other 4xx, failover, bounded concurrency."""
import socket
import time

import pytest

from scope_megatron.rollout.sglang import SGLangBadRequest, SGLangClient, SGLangError
from tests.rollout.fake_sglang_server import FakeSGLangServer, toy_hf_dir

BODY = {"input_ids": [1, 4, 5, 13, 6, 7, 14], "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}}


@pytest.fixture(scope="module")
def server():
    with FakeSGLangServer(toy_hf_dir()) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(server):
    server.clear_faults()
    server.calls.clear()
    server.max_active = 0
    yield
    server.clear_faults()


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def _client(urls, **kw):
    kw = {"retries": 2, "backoff": 0.01, "timeout": 20, **kw}
    return SGLangClient(urls, **kw)


def test_500_then_success_is_retried(server):
    server.inject_fault("status", count=2, status=500)
    with _client([server.url]) as c:
        out = c.post("/generate", BODY)
    assert len(out["output_ids"]) == 2
    assert len(server.calls_to("/generate")) == 3


def test_backoff_grows(server):
    server.inject_fault("status", count=2, status=503)
    with _client([server.url], backoff=0.2, max_backoff=10) as c:
        t0 = time.monotonic()
        c.post("/generate", BODY)
        assert time.monotonic() - t0 >= 0.2 + 0.4


def test_500_forever_names_server_endpoint_and_request(server):
    server.inject_fault("status", count=100, status=500)
    with _client([server.url], retries=2) as c, pytest.raises(SGLangError) as err:
        c.map("/generate", [BODY, BODY, BODY])
    msg = str(err.value)
    assert server.url in msg and "/generate" in msg and "HTTP 500" in msg and "3 attempt(s)" in msg
    assert any(f"request {i})" in msg for i in range(3))  # whichever failed for good first
    assert not isinstance(err.value, SGLangBadRequest)


def test_429_is_retried(server):
    server.inject_fault("status", count=1, status=429)
    with _client([server.url]) as c:
        c.post("/generate", BODY)
    assert len(server.calls_to("/generate")) == 2


def test_4xx_is_not_retried_and_quotes_the_server(server):
    server.inject_fault("status", count=5, status=400)
    with _client([server.url], retries=4) as c, pytest.raises(SGLangBadRequest) as err:
        c.post("/generate", BODY, index=7)
    assert "injected HTTP 400" in str(err.value) and "request 7" in str(err.value) and server.url in str(err.value)
    assert len(server.calls_to("/generate")) == 1
    server.clear_faults()
    with _client([server.url]) as c, pytest.raises(SGLangBadRequest, match="text is not supported"):
        c.post("/generate", {"text": "12+3="})


def test_timeout_is_retried_then_raises(server):
    server.inject_fault("hang", count=1, delay=2)
    with _client([server.url], timeout=0.5, retries=1) as c:
        assert len(c.post("/generate", BODY)["output_ids"]) == 2  # hang, then an answer
        server.inject_fault("hang", count=2, delay=2)
        with pytest.raises(SGLangError, match=r"timed out after 0\.5 s"):
            c.post("/generate", BODY)


def test_connection_refused(server):
    dead = _dead_url()
    with _client([dead], retries=1) as c, pytest.raises(SGLangError) as err:
        c.post("/generate", BODY, index=0)
    assert dead in str(err.value) and "ConnectionError" in str(err.value) and "request 0" in str(err.value)


def test_retry_fails_over_to_a_live_server(server):
    dead = _dead_url()
    with _client([dead, server.url], retries=1) as c:
        out = c.map("/generate", [BODY] * 4)
    assert len(out) == 4 and len(server.calls_to("/generate")) == 4


def test_closed_connection_is_retried(server):
    server.inject_fault("close", count=1)
    with _client([server.url]) as c:
        c.post("/generate", BODY)
    assert len(server.calls_to("/generate")) == 2


def test_malformed_json_is_retried_then_raises(server):
    server.inject_fault("malformed", count=1)
    with _client([server.url]) as c:
        c.post("/generate", BODY)
        server.inject_fault("malformed", count=10)
        with pytest.raises(SGLangError, match="malformed JSON"):
            c.post("/generate", BODY)


def test_concurrency_is_bounded(server):
    deadline = time.monotonic() + 10
    while server.active and time.monotonic() < deadline:  # hung requests of other tests
        time.sleep(0.05)
    server.max_active = 0
    server.inject_fault("slow", count=8, delay=0.15)
    with _client([server.url], max_in_flight=2) as c:
        c.map("/generate", [BODY] * 8)
    assert server.max_active == 2
    server.max_active = 0
    server.inject_fault("slow", count=8, delay=0.15)
    with _client([server.url], max_in_flight=1) as c:
        c.map("/generate", [BODY] * 3)
    assert server.max_active == 1


def test_progress_bar_and_order(server, capsys):
    bodies = [{"input_ids": [1, 4 + i], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
              for i in range(5)]
    with _client([server.url], progress=True) as c:
        out = c.map("/generate", bodies, desc="probe")
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [2] * 5
    assert "probe" in capsys.readouterr().err


def test_a_failed_map_aborts_the_requests_still_running(server):
    """One request of a map fails for good while two others are still generating: the running
    ones are aborted on the server (not retried), so the error and the client's close come in
    seconds, not after the longest generation."""
    server.inject_fault("slow", count=2, delay=60)

    def reject(i, answer):  # whichever request answers first (the one not slowed) fails for good
        raise SGLangError(f"answer {i} rejected")

    with _client([server.url], max_in_flight=4, retries=3) as c:
        t0 = time.monotonic()
        with pytest.raises(SGLangError, match="rejected"):
            c.map("/generate", [BODY, BODY, BODY], validate=reject)
    assert time.monotonic() - t0 < 15, "close waited for the aborted requests' generation"
    # each running request aborted by its own rid (not abort_all: the server's other requests are
    # not this map's), once
    aborts = server.calls_to("/abort_request")
    rids = [b["rid"] for b in server.calls_to("/generate")]
    assert len(aborts) == 2 and all(set(b) == {"rid"} for b in aborts)
    assert len({b["rid"] for b in aborts}) == 2 and {b["rid"] for b in aborts} < set(rids)
    assert len(rids) == len(set(rids)) == 3  # the aborted requests were not retried
    with _client([server.url]) as c:  # the server (and a client) serve again afterwards
        assert len(c.post("/generate", BODY)["output_ids"]) == 2


def test_a_failed_map_leaves_other_requests_alone(server):
    """The abort of a failed map names its own requests only: another client's request running on
    the same server at the time answers normally."""
    import threading

    server.inject_fault("slow", count=1, delay=3)
    other = {}

    def other_client():
        with _client([server.url]) as c:
            other["answer"] = c.post("/generate", BODY)

    thread = threading.Thread(target=other_client)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.calls_to("/generate") and time.monotonic() < deadline:
        time.sleep(0.01)
    server.inject_fault("slow", count=2, delay=60)

    def reject(i, answer):
        raise SGLangError(f"answer {i} rejected")

    with _client([server.url], max_in_flight=4) as c:
        with pytest.raises(SGLangError, match="rejected"):
            c.map("/generate", [BODY, BODY, BODY], validate=reject)
    thread.join(timeout=30)
    assert other["answer"]["meta_info"]["finish_reason"]["type"] != "abort"
    assert len(other["answer"]["output_ids"]) == 2


def test_map_requests_carry_a_fresh_rid_per_attempt(server):
    """A retry after a timeout must not reuse the rid of the attempt the server may still be
    running (SGLang refuses it: "Duplicate request ID detected"); a batch gets one rid per item."""
    server.inject_fault("hang", count=1, delay=3)
    with _client([server.url], retries=2) as c:
        out = c.map("/generate", [BODY, BODY], timeout=1)
        assert [len(o["output_ids"]) for o in out] == [2, 2]
        rids = [b["rid"] for b in server.calls_to("/generate")]
        assert len(rids) == 3 and len(set(rids)) == 3 and all(isinstance(r, str) for r in rids)  # one retried
        server.calls.clear()
        batch = {**BODY, "input_ids": [BODY["input_ids"]] * 2, "sampling_params": [BODY["sampling_params"]] * 2}
        assert len(c.map("/generate", [batch])[0]) == 2
        (body,) = server.calls_to("/generate")
        assert len(body["rid"]) == 2 and len(set(body["rid"]) | set(rids)) == 5
    assert server.calls_to("/abort_request") == []  # nothing failed, nothing aborted
