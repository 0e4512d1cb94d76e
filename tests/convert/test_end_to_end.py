"""A user's path: a Qwen3 HF directory -> convert -> train with the Trainer (2 SCOPE steps on the
toy task against the toy teacher) -> convert back -> transformers loads it, its logits equal the
trained Megatron model's and it generates (tests/convert/workers.py:_end_to_end)."""
from tests.convert.conftest import check


def test_convert_train_convert_back_load_in_transformers(single):
    check(single, "end_to_end")
    r = single["end_to_end"]
    print(r)
    assert r["loss"] == r["loss"]                       # trained (finite loss)
    assert r["changed"] == r["tensors"]                 # the update reached every tensor
    assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), r
    assert len(r["generated"]) == 6 and all(0 <= t < 18 for t in r["generated"])
    assert r["architectures"] == ["Qwen3ForCausalLM"]
