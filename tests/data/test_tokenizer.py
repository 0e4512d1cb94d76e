"""CharTokenizer: the toy vocabulary table, round trips, longest-match symbols, errors."""
import pytest
import torch

from scope_megatron.data import BOS_ID, EOS_ID, PAD_ID, TOY_TOKENIZER, CharTokenizer

TOY_TABLE = ("<pad>", "<bos>", "<eos>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
             "+", "=", " ", "\\boxed{", "}")


def test_toy_vocabulary_table_is_pinned():
    # Checkpoints depend on these ids: changing the table is a breaking change.
    assert TOY_TOKENIZER.tokens == TOY_TABLE
    assert TOY_TOKENIZER.vocab_size == 18
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert TOY_TOKENIZER.token_to_id("\\boxed{") == 16


def test_random_strings_round_trip(gen):
    symbols = TOY_TABLE[3:]
    for _ in range(50):
        picks = torch.randint(0, len(symbols), (int(torch.randint(0, 40, (1,), generator=gen)),),
                              generator=gen)
        text = "".join(symbols[i] for i in picks.tolist())
        ids = TOY_TOKENIZER.encode(text, bos=True, eos=True)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) == len(picks) + 2
        assert ids[1:-1] == [i + 3 for i in picks.tolist()]
        assert TOY_TOKENIZER.decode(ids) == text
        assert TOY_TOKENIZER.decode(torch.tensor(ids)) == text


def test_multi_character_symbol_is_one_token():
    assert TOY_TOKENIZER.encode("\\boxed{12}") == [16, 4, 5, 17]


def test_decode_keeps_specials_on_request():
    ids = TOY_TOKENIZER.encode("1+1", bos=True, eos=True) + [PAD_ID]
    assert TOY_TOKENIZER.decode(ids, skip_special=False) == "<bos>1+1<eos><pad>"


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'x' at position 2"):
        TOY_TOKENIZER.encode("12x")
    with pytest.raises(ValueError, match=r"'\\\\' at position 0"):
        TOY_TOKENIZER.encode("\\box")  # the prefix of a symbol is not a symbol
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOY_TOKENIZER.decode([18])
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="clash with the special"):
        CharTokenizer(["a", "<eos>"])
    with pytest.raises(KeyError, match="not in the vocabulary"):
        TOY_TOKENIZER.token_to_id("x")
