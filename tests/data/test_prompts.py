"""PromptDataset: file formats, field names, prompt construction, length filtering, and the
deterministic, resumable prompt stream. Tokenizers are built locally (no downloads)."""
import dataclasses
import json
import logging

import pytest

pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")
import pyarrow as pa  # noqa: E402

from scope_megatron.data import DEFAULT_SUFFIX, PromptDataset, PromptItem, ToyArithmetic  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(chat_template=None):
    """One token per UTF-8 byte (a BPE without merges), <s> prepended as its special token, and
    optionally a ChatML-like chat template: prompt lengths are predictable (1 + bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=chat_template)


@pytest.fixture(scope="module")
def plain_tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return byte_tokenizer(CHAT_TEMPLATE)


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "json_data":
        path.write_text(json.dumps({"data": rows}))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_file(tmp_path, rows, fmt="jsonl", name="train"):
    ext = {"json_data": "json"}.get(fmt, fmt)
    return write(tmp_path / f"{name}.{ext}", rows, fmt)


def numbered_rows(n, width=1):
    return [{"id": f"p{i}", "question": f"What is {i} plus {i}?" + " x" * (width * i), "answer": str(2 * i)}
            for i in range(n)]


# ---- formats and fields ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_data", "parquet"])
def test_every_file_format_gives_the_same_items(tmp_path, plain_tok, fmt):
    rows = numbered_rows(5)
    reference = PromptDataset(make_file(tmp_path, rows, "jsonl", name="ref"), plain_tok, shuffle=False)
    ds = PromptDataset(make_file(tmp_path, rows, fmt), plain_tok, shuffle=False)
    assert len(ds) == 5
    assert [ds[i] for i in range(5)] == [reference[i] for i in range(5)]
    assert [ds[i].id for i in range(5)] == [f"p{i}" for i in range(5)]
    assert [ds[i].reference for i in range(5)] == [str(2 * i) for i in range(5)]
    assert ds[3].problem == rows[3]["question"]


@pytest.mark.parametrize("row, problem, reference", [
    ({"question": "Q1", "answer": 27.0}, "Q1", "27"),
    ({"problem": "Q2", "solution": "First 1/4 + 1/4, so \\boxed{1} no: \\boxed{\\frac{1}{2}}."}, "Q2",
     "\\frac{1}{2}"),
    ({"problem": "Q3", "solution": "42"}, "Q3", "42"),
    ({"problem": "Q4", "answer": "5", "solution": "worked \\boxed{6}"}, "Q4", "5"),
    ({"question": "Q5", "final_answer": ["3"], "solution": ["so \\boxed{4}"]}, "Q5", "3"),
    ({"prompt": "Q6", "reward_model": {"ground_truth": "7", "style": "rule"}}, "Q6", "7"),
    ({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q7"}],
      "reward_model": {"ground_truth": "8"}}, "Q7", "8"),
    ({"input": "Q8", "answer": "9", "difficulty": 5.0}, "Q8", "9"),
])
def test_default_field_lookup(tmp_path, plain_tok, row, problem, reference):
    item = PromptDataset(make_file(tmp_path, [row]), plain_tok)[0]
    assert (item.problem, item.reference) == (problem, reference)
    assert item.id == "0"  # no id field: the row index


def test_custom_field_names_and_meta(tmp_path, plain_tok):
    rows = [{"text": "Q", "gt": {"value": 12.0}, "uid2": 99, "topic": "algebra", "big": "x" * 50}]
    path = make_file(tmp_path, rows, "parquet")
    item = PromptDataset(path, plain_tok, prompt_key="text", answer_key="gt.value", id_key="uid2")[0]
    assert (item.problem, item.reference, item.id) == ("Q", "12", "99")
    assert item.meta == {"topic": "algebra", "big": "x" * 50}
    only = PromptDataset(path, plain_tok, prompt_key="text", answer_key=["missing", "gt.value"],
                         meta_keys=["topic"])[0]
    assert only.meta == {"topic": "algebra"} and only.reference == "12"


def test_answer_key_naming_a_solution_extracts_its_box(tmp_path, plain_tok):
    rows = [{"problem": "Q", "answer": "wrong", "solution": "so \\boxed{11}"}]
    item = PromptDataset(make_file(tmp_path, rows), plain_tok, answer_key="solution")[0]
    assert item.reference == "11"


@pytest.mark.parametrize("missing", ["answer", "problem"])
def test_a_row_missing_a_field_names_file_row_and_fields(tmp_path, plain_tok, missing):
    rows = numbered_rows(3)
    del rows[1][{"answer": "answer", "problem": "question"}[missing]]
    rows[1]["extra"] = 1
    path = make_file(tmp_path, rows, "jsonl", name="broken")
    with pytest.raises(ValueError) as info:
        PromptDataset(path, plain_tok)
    msg = str(info.value)
    assert "broken.jsonl" in msg and "row 1 " in msg and f"no {missing}" in msg
    assert "'extra'" in msg and "'id'" in msg


def test_a_missing_explicit_id_field_is_an_error(tmp_path, plain_tok):
    with pytest.raises(ValueError, match=r"row 0 has no id field 'uid'"):
        PromptDataset(make_file(tmp_path, numbered_rows(2)), plain_tok, id_key="uid")


def test_prompt_item_is_frozen_and_hashable(tmp_path, plain_tok):
    item = PromptDataset(make_file(tmp_path, numbered_rows(2)), plain_tok)[1]
    assert isinstance(item, PromptItem) and isinstance(item.prompt_ids, tuple)
    assert all(type(t) is int for t in item.prompt_ids)
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.reference = "x"
    assert hash(item) == hash(dataclasses.replace(item, meta={"other": 1}))


# ---- prompt construction -----------------------------------------------------------------------

def test_chat_template_is_applied(tmp_path, chat_tok):
    path = make_file(tmp_path, [{"problem": "What is 2+3?", "answer": "5"}])
    item = PromptDataset(path, chat_tok, system_prompt="Be brief.")[0]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+3?" + DEFAULT_SUFFIX}]
    expected = chat_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]  # a BatchEncoding in 5.x
    assert list(item.prompt_ids) == list(expected)
    assert chat_tok.decode(list(item.prompt_ids)) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3? Put your final answer "
        "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    ds = PromptDataset(path, chat_tok)
    assert ds.stats["chat_template"]
    assert chat_tok.decode(list(ds[0].prompt_ids)).startswith("<|im_start|>user\n")


def test_plain_prompt_without_chat_template(tmp_path, chat_tok, plain_tok):
    path = make_file(tmp_path, [{"problem": "What is 2+3?", "answer": "5"}])
    text = "What is 2+3?" + DEFAULT_SUFFIX
    turned_off = PromptDataset(path, chat_tok, chat_template=False)
    has_none = PromptDataset(path, plain_tok)  # chat_template=True but the tokenizer has none
    for ds in (turned_off, has_none):
        assert not ds.stats["chat_template"]
        assert list(ds[0].prompt_ids) == plain_tok(text)["input_ids"]
        assert ds[0].prompt_ids[0] == plain_tok.bos_token_id and len(ds[0].prompt_ids) == 1 + len(text)
    with_system = PromptDataset(path, plain_tok, system_prompt="Be brief.")[0]
    assert plain_tok.decode(list(with_system.prompt_ids), skip_special_tokens=True) == "Be brief.\n\n" + text


def user_text(ds, tok):
    return tok.decode(list(ds[0].prompt_ids), skip_special_tokens=True)


def test_suffix_default_custom_empty_and_template(tmp_path, plain_tok):
    assert DEFAULT_SUFFIX == " Put your final answer within \\boxed{}."
    path = make_file(tmp_path, [{"problem": "Solve x+1=2.", "answer": "1"}])
    default = "Solve x+1=2. Put your final answer within \\boxed{}."
    assert user_text(PromptDataset(path, plain_tok), plain_tok) == default
    assert user_text(PromptDataset(path, plain_tok, suffix="\nThink."), plain_tok) == "Solve x+1=2.\nThink."
    assert user_text(PromptDataset(path, plain_tok, suffix=""), plain_tok) == "Solve x+1=2."
    templated = PromptDataset(path, plain_tok, prompt_template="Problem: {problem}\nAnswer:",
                              suffix=" Box it.")
    assert user_text(templated, plain_tok) == "Problem: Solve x+1=2. Box it.\nAnswer:"
    assert templated[0].problem == "Solve x+1=2."
    with pytest.raises(ValueError, match="no {problem} field"):
        PromptDataset(path, plain_tok, prompt_template="no field")
    with pytest.raises(ValueError, match="format string"):
        PromptDataset(path, plain_tok, prompt_template="{problem} {other}")


def test_a_problem_that_already_carries_the_suffix_is_not_given_it_twice(tmp_path, plain_tok):
    # the SCOPE reference code's parquet files: the sentence appended with no space, doubled braces
    verl = "Solve x.Put your final answer within \\boxed{{}}."
    rows = [{"prompt": [{"role": "user", "content": verl}], "reward_model": {"ground_truth": "1"}},
            {"problem": "Solve y." + DEFAULT_SUFFIX, "answer": "2"}, {"problem": "Solve z.", "answer": "3"}]
    ds = PromptDataset(make_file(tmp_path, rows, "jsonl"), plain_tok, shuffle=False)
    texts = [plain_tok.decode(list(ds[i].prompt_ids), skip_special_tokens=True) for i in range(3)]
    assert texts == [verl, "Solve y." + DEFAULT_SUFFIX, "Solve z." + DEFAULT_SUFFIX]
    assert ds.stats["suffix_already_present"] == 2


def test_toy_tokenizer_written_as_hf_gives_the_toy_prompt_ids(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from scope_megatron.convert.template import save_char_tokenizer

    world = ToyArithmetic()
    save_char_tokenizer(world.tokenizer, tmp_path / "tok")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    problems = world.held_out[:6]
    rows = [{"problem": world.prompt_text(p), "answer": world.answer(p)} for p in problems]
    ds = PromptDataset(make_file(tmp_path, rows), tok, suffix="", shuffle=False)
    assert [list(ds[i].prompt_ids) for i in range(6)] == [world.prompt_ids(p) for p in problems]
    assert [ds[i].reference for i in range(6)] == [world.answer(p) for p in problems]


# ---- length filtering --------------------------------------------------------------------------

def test_length_filter_drops_counts_and_logs(tmp_path, plain_tok, caplog):
    rows = numbered_rows(10)  # row i: 1 + len(question + suffix) tokens, growing with i
    lengths = [1 + len((r["question"] + DEFAULT_SUFFIX).encode()) for r in rows]
    limit = sorted(lengths)[6]  # keeps exactly 7
    with caplog.at_level(logging.INFO, logger="scope_megatron.data.prompts"):
        ds = PromptDataset(make_file(tmp_path, rows), plain_tok, max_prompt_len=limit)
    assert len(ds) == 7 and ds.num_filtered == 3
    assert ds.stats["rows"] == 10 and ds.stats["kept"] == 7 and ds.stats["longest_kept"] == limit
    assert sorted(ds[i].id for i in range(7)) == sorted(r["id"] for r, n in zip(rows, lengths) if n <= limit)
    assert all(len(ds[i].prompt_ids) <= limit for i in range(7))
    lines = [r.getMessage() for r in caplog.records if "3 longer than" in r.getMessage()]
    assert len(lines) == 1 and "7 of 10 kept" in lines[0]
    assert PromptDataset(make_file(tmp_path, rows), plain_tok).num_filtered == 0
    with pytest.raises(ValueError, match="no prompt .* fits max_prompt_len=5"):
        PromptDataset(make_file(tmp_path, rows), plain_tok, max_prompt_len=5)


def test_filtering_changes_the_fingerprint(tmp_path, plain_tok):
    path = make_file(tmp_path, numbered_rows(10))
    full, cut = PromptDataset(path, plain_tok), PromptDataset(path, plain_tok, max_prompt_len=60)
    assert cut.num_filtered > 0 and full.fingerprint != cut.fingerprint


# ---- the stream: determinism, resume, epochs ---------------------------------------------------

def ids(items):
    return [item.id for item in items]


@pytest.fixture
def prompt_file(tmp_path):
    return make_file(tmp_path, numbered_rows(23))


def test_same_seed_same_batches_different_seed_different(prompt_file, plain_tok):
    a, b = PromptDataset(prompt_file, plain_tok, seed=3), PromptDataset(prompt_file, plain_tok, seed=3)
    other = PromptDataset(prompt_file, plain_tok, seed=4)
    a_batches = [ids(a.batch(s, 5)) for s in range(12)]
    assert a_batches == [ids(b.batch(s, 5)) for s in range(12)]
    assert a_batches != [ids(other.batch(s, 5)) for s in range(12)]
    assert ids(a.batch(0, 23)) != [f"p{i}" for i in range(23)]  # shuffled
    in_order = PromptDataset(prompt_file, plain_tok, shuffle=False)
    assert ids(in_order.batch(0, 23)) == [f"p{i}" for i in range(23)]
    assert a.batch(7, 5) == a.batch(7, 5)  # no hidden state: asking again gives the same prompts


@pytest.mark.parametrize("batch_size", [1, 4, 23, 50])
def test_next_batch_agrees_with_batch_and_resumes(prompt_file, plain_tok, batch_size):
    pure = PromptDataset(prompt_file, plain_tok, seed=11)
    steps = 9
    expected = [pure.batch(s, batch_size) for s in range(steps)]
    walker = PromptDataset(prompt_file, plain_tok, seed=11)
    assert [walker.next_batch(batch_size) for _ in range(steps)] == expected
    # interrupt after 4 steps, resume in a fresh object from the saved state
    first = PromptDataset(prompt_file, plain_tok, seed=11)
    drawn = [first.next_batch(batch_size) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["consumed"] == 4 * batch_size and state["epoch"] == 4 * batch_size // 23
    resumed = PromptDataset(prompt_file, plain_tok, seed=11)
    resumed.load_state_dict(state)
    drawn += [resumed.next_batch(batch_size) for _ in range(steps - 4)]
    assert drawn == expected
    assert resumed.consumed == steps * batch_size and resumed.epoch == resumed.epoch_of(steps, batch_size)


def test_load_state_dict_refuses_another_stream(tmp_path, prompt_file, plain_tok):
    ds = PromptDataset(prompt_file, plain_tok, seed=1)
    ds.next_batch(3)
    state = ds.state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        PromptDataset(prompt_file, plain_tok, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        PromptDataset(prompt_file, plain_tok, seed=1, suffix="").load_state_dict(state)
    with pytest.raises(ValueError, match="num_prompts"):
        fewer = make_file(tmp_path, numbered_rows(22), name="fewer")
        PromptDataset(fewer, plain_tok, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        PromptDataset(prompt_file, plain_tok, seed=1).load_state_dict(dict(state, epoch=5))


def test_every_prompt_once_per_epoch_across_boundaries(tmp_path, plain_tok):
    n, batch_size, epochs = 11, 4, 5
    ds = PromptDataset(make_file(tmp_path, numbered_rows(n)), plain_tok, seed=5)
    stream = [i for s in range(n * epochs // batch_size + 1) for i in ids(ds.batch(s, batch_size))]
    orders = [stream[e * n:(e + 1) * n] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == sorted(f"p{i}" for i in range(n))
    assert len({tuple(o) for o in orders}) > 1  # a fresh permutation per epoch
    # step 2 covers positions 8..11: the last three of epoch 0, then the first of epoch 1
    assert ids(ds.batch(2, batch_size)) == orders[0][8:] + orders[1][:1]
    assert ds.epoch_of(2, batch_size) == 0 and ds.epoch_of(3, batch_size) == 1
    assert [f"p{i}" for i in ds.epoch_order(1)] == orders[1]


def test_bad_arguments(prompt_file, plain_tok):
    ds = PromptDataset(prompt_file, plain_tok)
    for bad in (lambda: ds.batch(-1, 2), lambda: ds.batch(0, 0), lambda: ds.next_batch(0)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="max_prompt_len"):
        PromptDataset(prompt_file, plain_tok, max_prompt_len=0)
    with pytest.raises(FileNotFoundError):
        PromptDataset(prompt_file.with_name("absent.jsonl"), plain_tok)


def test_several_files_and_limit(tmp_path, plain_tok):
    a = make_file(tmp_path, [{"problem": f"A{i}", "answer": "1"} for i in range(3)], name="a")
    b = make_file(tmp_path, [{"problem": f"B{i}", "answer": "2"} for i in range(3)], "parquet", name="b")
    ds = PromptDataset([a, b], plain_tok, shuffle=False)
    assert [ds[i].problem for i in range(6)] == ["A0", "A1", "A2", "B0", "B1", "B2"]
    assert [ds[i].id for i in range(6)] == [str(i) for i in range(6)]  # row index over all files
    limited = PromptDataset([a, b], plain_tok, shuffle=False, limit=4)
    assert [limited[i].problem for i in range(4)] == ["A0", "A1", "A2", "B0"]
    assert len(PromptDataset([a, b], plain_tok, limit=4)) == 4


def test_large_dataset_loads_in_linear_time(tmp_path):
    """20k short prompts through the toy HF tokenizer: loading and drawing stay fast."""
    import time

    from transformers import PreTrainedTokenizerFast

    from scope_megatron.convert.template import save_char_tokenizer

    world = ToyArithmetic()
    save_char_tokenizer(world.tokenizer, tmp_path / "tok")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    rows = [{"problem": f"{i % 1000:>3}+{i // 1000:>3}=", "answer": str(i % 1000 + i // 1000)}
            for i in range(20000)]
    path = make_file(tmp_path, rows)
    start = time.perf_counter()
    ds = PromptDataset(path, tok, suffix="", progress=False)
    loaded = time.perf_counter() - start
    assert len(ds) == 20000 and all(len(ds[i].prompt_ids) == world.prompt_len for i in (0, 19999))
    assert len({item.id for item in ds.batch(0, 20000)}) == 20000
    assert loaded < 15.0, f"loading 20k prompts took {loaded:.1f} s"


def test_a_prose_solution_without_a_box_is_counted_and_warned(tmp_path, plain_tok, caplog):
    """A reference taken whole from a worked solution that has no \\boxed{} answer would make
    every rollout of that prompt score 0: the load says so (a short unboxed answer does not)."""
    import logging

    rows = [{"problem": "Q1", "solution": "Adding the two gives five, so the answer is 5."},
            {"problem": "Q2", "solution": "42"},
            {"problem": "Q3", "solution": "so \\boxed{7}"}]
    with caplog.at_level(logging.WARNING, logger="scope_megatron.data.prompts"):
        ds = PromptDataset(make_file(tmp_path, rows), plain_tok)
    assert [ds[i].reference for i in range(3)] == [rows[0]["solution"], "42", "7"]
    assert ds.stats["solution_without_box"] == 1
    warned = [r.getMessage() for r in caplog.records if "no \\boxed{} answer" in r.getMessage()]
    assert len(warned) == 1 and "1 of 3 references" in warned[0] and "row 0" in warned[0]
