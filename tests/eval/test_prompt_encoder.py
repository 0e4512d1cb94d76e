"""The evaluation's prompt construction (training.evaluate.PromptEncoder) with a Hugging Face
tokenizer: the chat template applied as transformers does it (token ids, whichever container
the installed transformers returns), plain text with special tokens otherwise, stop ids, and the
training prompts of the same problem (data.prompts) agree when configured alike."""
import pytest

from scope_megatron.eval.benchmarks import Problem
from scope_megatron.training.evaluate import EvalSettings, PromptEncoder
from tests.data.test_prompts import CHAT_TEMPLATE, byte_tokenizer

PROBLEM = Problem("7", "What is 1+1?", "2", {})


def test_chat_template_gives_token_ids():
    tok = byte_tokenizer(CHAT_TEMPLATE)
    encoder = PromptEncoder(tok, EvalSettings(prompt_template="{problem} Box it."))
    ids = encoder.prompt_ids(PROBLEM)
    assert all(isinstance(i, int) for i in ids)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1+1? Box it."}],
                                   add_generation_prompt=True, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_plain_text_without_chat_template():
    tok = byte_tokenizer(CHAT_TEMPLATE)
    encoder = PromptEncoder(tok, EvalSettings(prompt_template="{problem}", chat_template=False))
    assert encoder.prompt_ids(PROBLEM) == tok("What is 1+1?")["input_ids"]
    assert encoder.prompt_ids(PROBLEM)[0] == tok.bos_token_id
    assert encoder.stop_ids == (tok.eos_token_id,)


def test_tokenizer_without_eos_is_refused():
    tok = byte_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token_id"):
        PromptEncoder(tok, EvalSettings()).stop_ids
