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


def test_stop_ids_include_the_model_directorys_eos_ids(tmp_path):
    """A model that ends its turn with <|im_end|> (generation_config.json eos_token_id
    [<|im_end|>, </s>], as Qwen3 ships it): both stop sampling, and a response ending on
    <|im_end|> is graded as finished, not truncated."""
    from transformers import AutoTokenizer

    from scope_megatron.rewards import score_responses
    from scope_megatron.rewards.verifier import boxed_match
    from tests.data.test_stop_ids import EOS, IM_END, model_dir

    d = model_dir(tmp_path / "model", generation=[IM_END, EOS], config=EOS)
    tok = AutoTokenizer.from_pretrained(str(d))
    encoder = PromptEncoder(tok, EvalSettings())  # the directory the tokenizer came from
    assert encoder.stop_ids == (EOS, IM_END)
    assert PromptEncoder(tok, EvalSettings(), model_dir=d).stop_ids == (EOS, IM_END)
    answer = tok("\\boxed{2}", add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id
    responses = [answer + [IM_END, pad], answer + [EOS, pad], answer + [pad, pad]]
    scores = score_responses(responses, ["2"] * 3, decode=encoder.decode, eos_id=encoder.stop_ids,
                             reward_fn=boxed_match)
    assert scores.finished.tolist() == [True, True, False]
    assert scores.correct.tolist() == [True, True, False]


def test_stop_ids_outside_the_vocabulary_are_refused(tmp_path):
    from transformers import AutoTokenizer

    from tests.data.test_stop_ids import EOS, model_dir

    d = model_dir(tmp_path / "model", generation=[EOS, 151645])
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(str(d)), EvalSettings())
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id \[151645\]"):
        encoder.stop_ids


def test_eval_settings_pass_ks_follow_k():
    """Pass@k needs k samples: the default is (1, k), and a k above the samples drawn is an error
    (it used to vanish from the report)."""
    assert EvalSettings().pass_ks == (1, 32) and EvalSettings(k=8).pass_ks == (1, 8)
    with pytest.raises(ValueError, match=r"pass_ks \[32\] must lie in \[1, k=8\]"):
        EvalSettings(k=8, pass_ks=(1, 32))
