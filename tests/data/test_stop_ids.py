"""data.stop_ids.stop_token_ids: a Hugging Face model's stop ids are its tokenizer's eos plus the
eos_token_id of generation_config.json and config.json in its directory (an int or a list, as
Qwen3 / Qwen2.5-Instruct / Llama-3-Instruct ship them), ordered and each once; ids outside the
tokenizer's vocabulary are refused naming the file. Tokenizers are built locally (no downloads)."""
import json

import pytest

pytest.importorskip("transformers")

from scope_megatron.data.stop_ids import stop_token_ids  # noqa: E402
from tests.data.test_prompts import CHAT_TEMPLATE, byte_tokenizer  # noqa: E402

# byte_tokenizer's special ids: <s> 0, </s> 1 (its eos_token), <pad> 2, <|im_start|> 3, <|im_end|> 4
EOS, IM_END = 1, 4


def model_dir(path, *, generation=None, config=None, pad=True):
    """A Hugging Face directory: the byte tokenizer (ChatML template; eos </s>) and, when given,
    generation_config.json / config.json with `generation` / `config` as eos_token_id (the key
    left out for "missing", JSON null for "null"). pad=False: the tokenizer has no pad token."""
    tok = byte_tokenizer(CHAT_TEMPLATE)
    if not pad:
        tok.pad_token = None
    tok.save_pretrained(str(path))
    for name, eos in (("generation_config.json", generation), ("config.json", config)):
        if eos is not None:
            body = {"bos_token_id": 0} if eos == "missing" else {
                "bos_token_id": 0, "eos_token_id": None if eos == "null" else eos}
            (path / name).write_text(json.dumps(body))
    return path


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_generation_config_list_adds_stop_ids_after_the_tokenizers_eos(tmp_path):
    d = model_dir(tmp_path, generation=[IM_END, EOS], config=EOS)  # the Qwen3 / Qwen2.5-Instruct shape
    tok = load(d)
    assert tok.eos_token_id == EOS
    assert stop_token_ids(tok, d) == (EOS, IM_END)
    assert stop_token_ids(tok, str(d)) == (EOS, IM_END)
    # the default directory is the one the tokenizer was loaded from
    assert stop_token_ids(tok) == (EOS, IM_END)


def test_config_json_adds_its_ids_after_generation_configs(tmp_path):
    d = model_dir(tmp_path, generation=EOS, config=[3, IM_END, EOS])
    assert stop_token_ids(load(d), d) == (EOS, 3, IM_END)


def test_missing_files_or_keys_contribute_nothing(tmp_path):
    bare = model_dir(tmp_path / "bare")
    assert stop_token_ids(load(bare), bare) == (EOS,)
    keyless = model_dir(tmp_path / "keyless", generation="missing", config="missing")
    assert stop_token_ids(load(keyless), keyless) == (EOS,)
    nulls = model_dir(tmp_path / "nulls", generation="null", config=[])
    assert stop_token_ids(load(nulls), nulls) == (EOS,)


def test_not_a_local_directory_gives_the_tokenizers_eos_only(tmp_path):
    d = model_dir(tmp_path, generation=[IM_END, EOS])
    tok = load(d)
    tok.name_or_path = "Qwen/Qwen3-1.7B"  # loaded by hub name: nothing is fetched
    assert stop_token_ids(tok) == (EOS,)
    assert stop_token_ids(byte_tokenizer()) == (EOS,)  # built in memory: no directory


def test_an_explicit_model_dir_must_be_a_directory(tmp_path):
    # asked for a directory's stop ids, silently using the tokenizer's eos alone would drop the
    # ones its generation_config.json names (Qwen3's <|im_end|>): responses would not end there
    tok = load(model_dir(tmp_path, generation=[IM_END, EOS]))
    for given in ("Qwen/Qwen3-1.7B", tmp_path / "missing", tmp_path / "tokenizer_config.json"):
        with pytest.raises(ValueError, match=f"model directory {given} is not a local directory"):
            stop_token_ids(tok, given)


def test_ids_outside_the_vocabulary_are_refused_naming_the_file(tmp_path):
    d = model_dir(tmp_path, generation=[EOS, 99999])
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id \[99999\] is outside"):
        stop_token_ids(load(d), d)
    d = model_dir(tmp_path / "neg", config=-1)
    with pytest.raises(ValueError, match=r"neg/config\.json: eos_token_id \[-1\] is outside"):
        stop_token_ids(load(d), d)


def test_malformed_eos_token_id_is_refused_naming_the_file(tmp_path):
    d = model_dir(tmp_path, generation="</s>")
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id must be an integer"):
        stop_token_ids(load(d), d)
    d = model_dir(tmp_path / "bad_json")
    tok = load(d)  # (transformers reads config.json too, and refuses it the same way)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad_json/config\.json: cannot read"):
        stop_token_ids(tok, d)


def test_no_eos_anywhere_is_refused(tmp_path):
    tok = byte_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token_id"):
        stop_token_ids(tok)
    # the files alone suffice
    d = model_dir(tmp_path, generation=IM_END)
    assert stop_token_ids(tok, d) == (IM_END,)
