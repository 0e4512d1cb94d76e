"""Weight sync strategies against the test servers: the disk path end to end (weights, versions,
verification catching a server that did not load or kept its version), the tensor and
distributed paths' HTTP protocol (injected serializer / fake broadcast), the weight comparison
rule, and the rank protocol (rank 0's outcome on every rank; the weight-update group helper)
under real gloo groups."""
import os
import socket
import warnings

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from scope_megatron.rollout import SamplingParams
from scope_megatron.rollout.sglang import (DiskWeightSync, DistributedWeightSync, SGLangBadRequest, SGLangClient,
                                           SGLangEngine, SGLangError, TensorWeightSync, compare_weights)
from scope_megatron.rollout.sglang.weight_sync import _buckets
from tests.conftest import SESSION_SEED
from tests.distributed import run_workers
from tests.rollout.fake_sglang_server import (FakeSGLangServer, PickleSerializer, fake_broadcast, perturbed_copy,
                                              reference_logprobs, toy_hf_dir)

EOS = 2
PROMPTS = [[1, 9, 12, 11, 13, 5, 12, 9, 14], [1, 5, 4, 9, 13, 10, 3, 10, 14]]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=8, stop_token_ids=(EOS,))


@pytest.fixture
def servers():
    with FakeSGLangServer(toy_hf_dir()) as a, FakeSGLangServer(toy_hf_dir()) as b:
        yield a, b


def _engine(servers, sync):
    client = SGLangClient([s.url for s in servers], retries=1, backoff=0.01, timeout=60)
    return SGLangEngine(client, pad_id=0, weight_sync=sync)


def _new_weights(scale=1.5, shift=0.01):
    return {k: v * scale + shift for k, v in load_file(str(toy_hf_dir() / "model.safetensors")).items()}


def _server_weights(server):
    return {k: v.detach().clone() for k, v in server.model.named_parameters()}


def test_disk_sync_changes_weights_and_version(servers, tmp_path):
    def export(path):
        perturbed_copy(toy_hf_dir(), path, scale=1.5, shift=0.01)

    sync = DiskWeightSync(export, tmp_path / "sync", num_verify=21)
    engine = _engine(servers, sync)
    before = engine.generate(PROMPTS, GREEDY)
    engine.update_weights(step=3)
    step3 = tmp_path / "sync" / "step-3"
    assert engine.weight_version == sync.version == "step-3"
    new = load_file(str(step3 / "model.safetensors"))
    for s in servers:
        assert s.weight_version == "step-3" and s.model_path == str(step3)
        body = s.calls_to("/update_weights_from_disk")[-1]
        assert body == {"model_path": str(step3), "weight_version": "step-3", "flush_cache": True,
                        "abort_all_requests": False}
        assert len(s.calls_to("/get_weights_by_name")) == 1 + 21  # can it report? then every parameter
        held = _server_weights(s)
        for name, w in new.items():
            torch.testing.assert_close(held[name], w, rtol=0, atol=0)
    after = engine.generate(PROMPTS, GREEDY)
    assert not torch.equal(before.logprobs, after.logprobs)
    for r, resp in enumerate(after.responses()):  # the servers now sample from the new weights
        ref = reference_logprobs(step3, PROMPTS[r], resp)
        torch.testing.assert_close(after.logprobs[r, :len(resp)].double(), ref, rtol=1e-5, atol=2e-5)
    engine.update_weights(step=4)
    assert not step3.exists() and (tmp_path / "sync" / "step-4").exists()  # keep=1
    engine.update_weights()  # no step: the one after the last
    assert engine.weight_version == "step-5"
    engine.close()


def test_disk_sync_catches_a_server_that_did_not_load(servers, tmp_path):
    servers[1].inject_fault("ignore_update", path="/update_weights_from_disk")
    engine = _engine(servers, DiskWeightSync(lambda p: perturbed_copy(toy_hf_dir(), p), tmp_path, num_verify=2))
    with pytest.raises(SGLangError) as err:
        engine.update_weights(step=1)
    msg = str(err.value)
    assert msg.startswith(f"SGLang server {servers[1].url}, POST /get_weights_by_name")
    assert ("parameter model." in msg or "parameter lm_head" in msg) and "max |diff|" in msg
    engine.close()


def _tiny_qwen(out, architecture):
    """A random tiny Qwen2 / Qwen3 HF directory (no tokenizer: the servers take token ids)."""
    import transformers

    cls = getattr(transformers, architecture)
    extra = {"head_dim": 32} if architecture == "Qwen3ForCausalLM" else {}
    config = cls.config_class(vocab_size=18, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              tie_word_embeddings=False, eos_token_id=EOS, **extra)
    torch.manual_seed(0)
    cls(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("architecture", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_disk_sync_to_a_model_without_get_weights_by_name(tmp_path, architecture):
    # sglang 0.5.21's Qwen2 / Qwen3 classes have no get_weights_by_name: /get_weights_by_name answers
    # 400 "Get parameter by name failed" for every name (checked against a real server). The update
    # itself worked: it must not fail on the value check, only warn and rest on weight_version.
    model = _tiny_qwen(tmp_path / "hf", architecture)
    with FakeSGLangServer(model) as a, FakeSGLangServer(model) as b:
        assert requests.post(a.url + "/get_weights_by_name", json={"name": "model.norm.weight"}, timeout=5
                             ).status_code == 400
        sync = DiskWeightSync(lambda p: perturbed_copy(model, p), tmp_path / "sync")  # default num_verify
        engine = _engine((a, b), sync)
        with pytest.warns(RuntimeWarning, match="cannot report parameter .* verified by weight_version only"):
            engine.update_weights(step=1)
        assert engine.weight_version == "step-1" and a.weight_version == b.weight_version == "step-1"
        assert len(a.calls_to("/get_weights_by_name")) == 1 + 1  # the request above, then the sync's probe
        new = load_file(str(tmp_path / "sync" / "step-1" / "model.safetensors"))
        held = _server_weights(a)
        for name, w in new.items():
            torch.testing.assert_close(held[name], w, rtol=0, atol=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.update_weights(step=2)
        assert not [w for w in caught if "cannot report" in str(w.message)]  # warned once
        # the servers are known not to report: nothing more is asked of them
        assert len(a.calls_to("/get_weights_by_name")) == 1 + 1 and len(b.calls_to("/get_weights_by_name")) == 1
        b.inject_fault("keep_version", path="/update_weights_from_disk")  # the version check still holds
        with pytest.raises(SGLangError, match="serves weight_version 'step-2' after the update; expected 'step-3'"):
            engine.update_weights(step=3)
        engine.close()


def test_a_wrong_parameter_name_fails_on_a_server_that_reports_parameters(tmp_path):
    # a Llama server has get_weights_by_name: a lookup that fails there means the name we exported
    # is not one of the served model's (an exporter bug), not a server that cannot report
    def export(path):
        perturbed_copy(toy_hf_dir(), path)
        weights = load_file(str(path / "model.safetensors"))
        weights["model.layers.0.mlp.gate.weight"] = torch.ones(4)  # no such parameter in a Llama
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})

    with FakeSGLangServer(toy_hf_dir(), weights_by_name=True) as server:
        engine = _engine((server,), DiskWeightSync(export, tmp_path, num_verify=100))  # every parameter
        with warnings.catch_warnings(record=True) as caught, \
                pytest.raises(SGLangError, match=r"model\.layers\.0\.mlp\.gate\.weight is not one of its "
                                                 r"parameter names") as err:
            warnings.simplefilter("always")
            engine.update_weights(step=1)
        assert not [w for w in caught if "cannot report" in str(w.message)]  # not a server that cannot report
        assert not isinstance(err.value, SGLangBadRequest) and "Get parameter by name failed" in str(err.value)
        engine.close()


def test_no_value_checks_ask_nothing(servers, tmp_path):
    engine = _engine(servers, DiskWeightSync(lambda p: perturbed_copy(toy_hf_dir(), p), tmp_path, num_verify=0))
    engine.update_weights(step=1)
    assert all(s.calls_to("/get_weights_by_name") == [] for s in servers)
    engine.close()


def test_tensor_sync_to_a_model_without_get_weights_by_name(tmp_path):
    model = _tiny_qwen(tmp_path / "hf", "Qwen2ForCausalLM")
    new = {k: v * 1.5 for k, v in load_file(str(model / "model.safetensors")).items()}
    with FakeSGLangServer(model) as server:
        sync = TensorWeightSync(lambda: iter(new.items()), bucket_bytes=4096, serializer=PickleSerializer())
        engine = _engine((server,), sync)
        with pytest.warns(RuntimeWarning, match="cannot report parameter"):
            engine.update_weights(step=7)
        assert server.weight_version == "step-7"
        held = _server_weights(server)
        for name, w in new.items():
            torch.testing.assert_close(held[name], w, rtol=0, atol=0)
        engine.close()


def test_disk_sync_catches_a_stale_version(servers, tmp_path):
    servers[0].inject_fault("keep_version", path="/update_weights_from_disk")
    engine = _engine(servers, DiskWeightSync(lambda p: perturbed_copy(toy_hf_dir(), p), tmp_path))
    with pytest.raises(SGLangError, match=r"serves weight_version 'default' after the update; expected 'step-2'"):
        engine.update_weights(step=2)
    engine.close()


def test_samples_of_a_server_that_lost_its_update_are_refused(servers, tmp_path):
    """After an update every sample must carry the pushed weight_version: a server restarted
    from the base weights (version 'default') serves off-policy rollouts, an error naming it."""
    engine = _engine(servers, DiskWeightSync(lambda p: perturbed_copy(toy_hf_dir(), p, scale=1.3), tmp_path,
                                             num_verify=0))
    engine.update_weights(step=1)
    engine.generate(PROMPTS * 2, GREEDY)  # both servers at step-1: accepted
    restarted = servers[1]
    restarted.model, restarted.weight_version = restarted._load(toy_hf_dir()), "default"
    with pytest.raises(SGLangError, match=rf"{restarted.url}.*weight_version 'default', but the trainer "
                                          r"pushed 'step-1'"):
        engine.generate(PROMPTS * 4, GREEDY)
    engine.close()


def test_disk_sync_reports_a_failed_load(servers, tmp_path):
    def broken(path):
        perturbed_copy(toy_hf_dir(), path)
        (path / "config.json").write_text("{not json")

    engine = _engine(servers, DiskWeightSync(broken, tmp_path))
    with pytest.raises(SGLangBadRequest, match="Failed to load weights"):
        engine.update_weights(step=1)
    engine = _engine(servers, DiskWeightSync(lambda p: p.mkdir(parents=True), tmp_path / "empty"))
    with pytest.raises(SGLangError, match="no safetensors weights"):
        engine.update_weights(step=1)


def test_compare_weights_rule():
    g = torch.Generator().manual_seed(SESSION_SEED)
    w = torch.randn(6, 4, generator=g)
    ok = lambda values, **kw: compare_weights(values, w, 3, rtol=kw.get("rtol", 1e-2), atol=1e-6)
    assert ok(w[:3].tolist())[0]  # SGLang: the first truncate_size rows
    assert ok(w.flatten()[:5].tolist())[0]  # a flat answer: the flattened tensor's first values
    assert ok(w[:2].tolist())[0]  # the first rows of a tensor-parallel shard
    assert ok(w[:3].bfloat16().float().tolist())[0]  # a bf16 copy of fp32 weights
    assert not ok(w[:3].bfloat16().float().tolist(), rtol=1e-5)[0]
    good, diff, detail = ok((w[:3] * 1.05).tolist())
    assert not good and diff > 0 and "max |diff|" in detail
    assert not ok(w[:3, :2].tolist())[0] and not ok([])[0]
    assert not ok(w[:3].t().tolist())[0]  # a transposed answer
    norm = torch.randn(8, generator=g)
    assert compare_weights(norm[:3].tolist(), norm, 3, rtol=0, atol=0)[0]
    # real SGLang pads a vocabulary's rows (18 -> 64): the padding rows are not compared, a wrong
    # real row still is, and padding is only accepted beyond the whole expected tensor
    emb = torch.randn(18, 4, generator=g)
    padded = torch.cat([emb, torch.zeros(46, 4)])
    assert compare_weights(padded.tolist(), emb, 100, rtol=1e-2, atol=1e-6)[0]
    wrong = padded.clone()
    wrong[17] += 1
    assert not compare_weights(wrong.tolist(), emb, 100, rtol=1e-2, atol=1e-6)[0]


def test_buckets_respect_the_size_limit():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    out = list(_buckets(iter(tensors), bucket_bytes=4 * 25))
    assert [[n for n, _ in b] for b, _ in out] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert [last for _, last in out] == [False] * 4 + [True]
    assert list(_buckets(iter([]), 100)) == []


def test_tensor_sync_protocol(servers):
    new = _new_weights()
    sync = TensorWeightSync(lambda: iter(sorted(new.items())), bucket_bytes=150_000, serializer=PickleSerializer,
                            num_verify=5)
    engine = _engine(servers, sync)
    engine.update_weights(step=7)
    expected_buckets = list(_buckets(iter(sorted(new.items())), 150_000))
    assert len(expected_buckets) > 2
    for s in servers:
        seq = [p for p, _ in s.calls if p in ("/begin_weight_update", "/update_weights_from_tensor",
                                               "/end_weight_update")]
        assert seq == ["/begin_weight_update"] + ["/update_weights_from_tensor"] * len(expected_buckets) \
            + ["/end_weight_update"]
        bodies = s.calls_to("/update_weights_from_tensor")
        assert [b.get("weight_version") for b in bodies] == [None] * (len(bodies) - 1) + ["step-7"]
        assert [b["flush_cache"] for b in bodies] == [False] * (len(bodies) - 1) + [True]
        for body, (bucket, _) in zip(bodies, expected_buckets):
            assert len(body["serialized_named_tensors"]) == 1
            sent = PickleSerializer.deserialize(body["serialized_named_tensors"][0])
            assert [n for n, _ in sent] == [n for n, _ in bucket]
            size = sum(t.numel() * t.element_size() for _, t in sent)
            assert size <= 150_000 or len(sent) == 1
        held = _server_weights(s)
        for name, w in new.items():
            torch.testing.assert_close(held[name], w, rtol=0, atol=0)
        assert s.weight_version == "step-7" and not s._updating
    engine.close()


def test_tensor_sync_sends_one_copy_per_tp_rank(tmp_path):
    new = _new_weights()
    with FakeSGLangServer(toy_hf_dir(), tp_size=2) as s:
        client = SGLangClient([s.url], retries=0, timeout=60)
        TensorWeightSync(lambda: iter(new.items()), tp_size=2, serializer=PickleSerializer).update(client, 1)
        assert all(len(b["serialized_named_tensors"]) == 2 for b in s.calls_to("/update_weights_from_tensor"))
        with pytest.raises(SGLangBadRequest, match="tp_size 2"):
            TensorWeightSync(lambda: iter(new.items()), tp_size=1, serializer=PickleSerializer).update(client, 2)
        client.close()


def test_tensor_sync_ends_the_update_after_a_failure(servers):
    new = _new_weights()
    servers[0].inject_fault("status", count=5, status=400, path="/update_weights_from_tensor")
    engine = _engine(servers, TensorWeightSync(lambda: iter(new.items()), serializer=PickleSerializer))
    with pytest.raises(SGLangBadRequest, match="injected HTTP 400"):
        engine.update_weights(step=1)
    for s in servers:
        assert s.calls[-1][0] == "/end_weight_update" and not s._updating
    # outside begin/end the server refuses a tensor update, as SGLang 0.5.21 does
    servers[0].clear_faults()
    with pytest.raises(SGLangBadRequest, match="must run between begin_weight_update"):
        engine.client.post("/update_weights_from_tensor", {"serialized_named_tensors": ["x"]})
    engine.close()


def test_distributed_sync_protocol(servers):
    new = _new_weights(scale=0.5)
    made = []

    def factory(address, port, world_size, rank, group_name, backend):
        made.append((address, port, world_size, rank, group_name, backend))
        return "the-group"

    def broadcast(tensor, group):
        assert group == "the-group"
        fake_broadcast(tensor, "wug-test")

    sync = DistributedWeightSync(lambda: iter(sorted(new.items())), master_address="10.0.0.1", master_port=29999,
                                 group_name="wug-test", backend="fake", bucket_bytes=200_000,
                                 group_factory=factory, broadcast=broadcast, num_verify=4)
    engine = _engine(servers, sync)
    engine.update_weights(step=2)
    assert made == [("10.0.0.1", 29999, 3, 0, "wug-test", "fake")]
    offsets = []
    for s in servers:
        init = s.calls_to("/init_weights_update_group")
        assert len(init) == 1 and init[0]["world_size"] == 3 and init[0]["group_name"] == "wug-test"
        offsets.append(init[0]["rank_offset"])
        bodies = s.calls_to("/update_weights_from_distributed")
        names = [n for b in bodies for n in b["names"]]
        assert names == sorted(new)
        for b in bodies:
            assert b["dtypes"] == ["float32"] * len(b["names"])
            assert b["shapes"] == [list(new[n].shape) for n in b["names"]]
        assert [b.get("weight_version") for b in bodies] == [None] * (len(bodies) - 1) + ["step-2"]
        held = _server_weights(s)
        for name, w in new.items():
            torch.testing.assert_close(held[name], w, rtol=0, atol=0)
    assert offsets == [1, 2]
    engine.update_weights(step=3)
    assert len(made) == 1  # the group is formed once
    sync.close(engine.client)
    assert all(len(s.calls_to("/destroy_weights_update_group")) == 1 for s in servers)
    engine.close()


# -- rank protocol under gloo -------------------------------------------------------------------


def gloo_worker(ctx):
    """Rank 0 is the trainer's HTTP rank; rank 1 another trainer rank (part 2) or, in part 1, the
    server side of a weight-update group."""
    from scope_megatron.rollout.sglang import init_weight_update_group
    from pathlib import Path

    out = {}
    pg = init_weight_update_group("127.0.0.1", int(os.environ["SCOPE_TEST_WUG_PORT"]), 2, ctx.rank,
                                  "wug-gloo", backend="gloo")
    t = torch.arange(6.0) if ctx.rank == 0 else torch.zeros(6)
    torch.distributed.broadcast(t, src=0, group=pg)
    out["broadcast"] = t.tolist()

    src, root = Path(os.environ["SCOPE_TEST_TOY_HF"]), Path(os.environ["SCOPE_TEST_SYNC_DIR"])

    def export(path):  # collective in the trainer; here rank 0 writes, as export_hf does
        if ctx.rank == 0:
            perturbed_copy(src, path)
        torch.distributed.barrier()

    client = SGLangClient([os.environ["SCOPE_TEST_FAKE_URL"]], retries=0, timeout=60)
    sync = DiskWeightSync(export, root, num_verify=2)
    for step in (5, 6):
        try:
            out[f"step{step}"] = sync.update(client, step)
        except SGLangError as exc:
            out[f"step{step}"] = f"error: {exc}"
    client.close()
    return out


def test_rank_protocol_under_gloo(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with FakeSGLangServer(toy_hf_dir()) as server:
        server.inject_fault("ignore_update", path="/update_weights_from_disk")  # step 5 fails on rank 0
        env = {"SCOPE_TEST_WUG_PORT": str(port), "SCOPE_TEST_FAKE_URL": server.url,
               "SCOPE_TEST_TOY_HF": str(toy_hf_dir()), "SCOPE_TEST_SYNC_DIR": str(tmp_path)}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            results = run_workers("tests.rollout.test_sglang_weight_sync:gloo_worker", 2, seed=SESSION_SEED,
                                  timeout=120)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert server.weight_version == "step-6"
    assert [r["broadcast"] for r in results] == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]] * 2
    r0, r1 = results
    assert r0["step5"].startswith("error: ") and "differs from the trainer's" in r0["step5"]
    assert r1["step5"].startswith("error: weight sync failed on rank 0: SGLangError") and \
        "differs from the trainer's" in r1["step5"]
    assert r0["step6"] == r1["step6"] == "step-6"
