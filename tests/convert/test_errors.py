"""Bad inputs: each is a ConversionError naming the problem, raised before any output exists,
and leaves nothing at the output path (no directory, no temporary sibling)."""
import json
import shutil

import pytest

from scope_megatron.convert import ConversionError, convert_hf_to_megatron, export_hf


def _copy(workspace, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(workspace / "hf" / name, dst)
    return dst


def _nothing_written(out):
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_unknown_architecture_lists_supported(workspace, tmp_path):
    hf = _copy(workspace, "llama_tied", tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, architectures=["MistralForCausalLM"],
                                                    model_type="mistral")))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="unsupported architecture MistralForCausalLM; supported: "
                       "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        convert_hf_to_megatron(hf, out)
    _nothing_written(out)


def test_missing_shard_file_is_named(workspace, tmp_path):
    hf = _copy(workspace, "qwen2_bias_sharded", tmp_path)
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=f"names shard file.* missing .*{shard.name}"):
        convert_hf_to_megatron(hf, out)
    _nothing_written(out)


def test_truncated_safetensors_is_named(workspace, tmp_path):
    hf = _copy(workspace, "llama_tied", tmp_path)
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="model.safetensors is truncated"):
        convert_hf_to_megatron(hf, out)
    _nothing_written(out)


@pytest.mark.parametrize("tp,pp,message", [
    (4, 1, "num_query_groups 2 is not divisible by TP=4"),
    (3, 1, "num_attention_heads 4 is not divisible by TP=3"),
    (1, 4, "num_layers 2 is not divisible by PP=4"),
])
def test_layout_not_dividing_the_model(workspace, tmp_path, tp, pp, message):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(workspace / "hf" / "llama_gqa_untied", out, tp=tp, pp=pp)
    _nothing_written(out)


@pytest.mark.parametrize("kwargs,message", [
    (dict(vocab_size=60), "vocab_size 60 exceeds config.json's 50"),
    (dict(max_position_embeddings=100000), "max_position_embeddings 100000 exceeds config.json's"),
    (dict(tp=0), "tp must be an integer >= 1, got 0"),
    (dict(make_vocab_size_divisible_by=0), "make_vocab_size_divisible_by must be an integer >= 1, got 0"),
])
def test_settings_beyond_the_hf_model_are_refused(workspace, tmp_path, kwargs, message):
    """A vocabulary or context longer than config.json's would train rows / positions the HF
    model never had (zero embeddings as real tokens; RoPE extrapolation), and bad layout numbers
    are named, not a traceback."""
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(workspace / "hf" / "llama_gqa_untied", out, **kwargs)
    _nothing_written(out)


def test_quantized_checkpoints_are_refused(workspace, tmp_path):
    """FP8 releases (quantization_config, float8 tensors): a message, not a KeyError."""
    import torch
    from safetensors.torch import load_file, save_file

    hf = _copy(workspace, "llama_gqa_untied", tmp_path)
    weights = load_file(str(hf / "model.safetensors"))
    save_file({k: (v.to(torch.float8_e4m3fn) if k.endswith("proj.weight") else v) for k, v in weights.items()},
              str(hf / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="has dtype F8_E4M3, which the converter does not read .a quantized"):
        convert_hf_to_megatron(hf, out)
    config = json.loads((hf / "config.json").read_text())
    save_file(weights, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "fp8"})))
    with pytest.raises(ConversionError, match=r"quantized weights \(fp8; convert the bf16"):
        convert_hf_to_megatron(hf, out)
    _nothing_written(out)


def test_a_tied_model_with_its_own_lm_head_is_refused(workspace, tmp_path):
    """tie_word_embeddings with a saved lm_head.weight that is not the embedding: transformers
    would load it untied, so dropping it would convert another model."""
    from safetensors.torch import load_file, save_file

    hf = _copy(workspace, "llama_tied", tmp_path)
    weights = load_file(str(hf / "model.safetensors"))
    embedding = weights["model.embed_tokens.weight"]
    save_file(dict(weights, **{"lm_head.weight": embedding.clone()}), str(hf / "model.safetensors"))
    convert_hf_to_megatron(hf, tmp_path / "same")  # the embedding itself: dropped, as before
    save_file(dict(weights, **{"lm_head.weight": embedding + 1}), str(hf / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="lm_head.weight differs from model.embed_tokens.weight"):
        convert_hf_to_megatron(hf, out)
    _nothing_written(out)


def test_existing_outputs_are_refused(workspace, tmp_path):
    hf = workspace / "hf" / "llama_tied"
    held = tmp_path / "held"
    held.mkdir()
    (held / "latest").write_text("iter_0000000\n")
    with pytest.raises(ConversionError, match="already holds a Megatron checkpoint; pass --overwrite"):
        convert_hf_to_megatron(hf, held)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match="holds no Megatron checkpoint.*never replaced"):
            convert_hf_to_megatron(hf, other, overwrite=overwrite)
        with pytest.raises(ConversionError, match="holds no Hugging Face model.*never replaced"):
            export_hf(tmp_path / "no-checkpoint", hf, other, overwrite=overwrite)
    assert (held / "latest").read_text() == "iter_0000000\n" and (other / "notes.txt").exists()


def test_export_refuses_a_template_of_another_model(workspace, single, tmp_path):
    """(uses a checkpoint converted by the single launch)"""
    ckpt = workspace / "mg" / "qwen3_qknorm"
    template = _copy(workspace, "qwen3_qknorm", tmp_path)
    config = json.loads((template / "config.json").read_text())
    (template / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3, head_dim=16)))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="describes another model .*num_layers: model 2, template 3; "
                       "head_dim: model 32, template 16"):
        export_hf(ckpt, template, out)
    (template / "config.json").write_text(json.dumps(dict(config, vocab_size=40)))
    with pytest.raises(ConversionError, match="vocab_size 40 cannot hold the model's vocabulary of 61"):
        export_hf(ckpt, template, out)
    with pytest.raises(ConversionError, match="holds no checkpoint"):
        export_hf(tmp_path, template, out)
    _nothing_written(out)


@pytest.mark.parametrize("size", ["5G", "0", "-1MB", "lots", 0, -5])
def test_bad_shard_sizes_are_named(size):
    from scope_megatron.convert.hf_io import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1000) == 1000
    with pytest.raises(ConversionError, match="is not a size: give bytes"):
        parse_size(size)
