"""training.tasks.PromptTask's stop ids: the tokenizer's eos plus the eos_token_id of the
--task-tokenizer directory's generation_config.json / config.json, so that rollouts stop on every
end token of the model (SGLang stops there anyway) and a response ending on any of them is graded
as finished; the first stays the pad fallback. Tokenizers are built locally (no downloads)."""
import json

import pytest

pytest.importorskip("transformers")

from scope_megatron.rewards import score_responses  # noqa: E402
from scope_megatron.training.config import TaskConfig  # noqa: E402
from scope_megatron.training.tasks import PromptTask  # noqa: E402
from tests.data.test_stop_ids import EOS, IM_END, model_dir  # noqa: E402


def prompt_task(tmp_path, tok_dir) -> PromptTask:
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    cfg = TaskConfig(name="prompts", train_data=str(data), tokenizer=str(tok_dir), prompt_suffix="",
                     reward_fn="scope_megatron.rewards.verifier:boxed_match")
    return PromptTask(cfg, seed=0)


def test_stop_ids_add_the_generation_configs_eos_ids(tmp_path):
    task = prompt_task(tmp_path, model_dir(tmp_path / "model", generation=[IM_END, EOS], config=EOS))
    assert task.stop_ids == (EOS, IM_END)
    assert task.pad_id == task.tokenizer.pad_token_id == 2
    # grading sees both as the end
    answer = task.tokenizer("\\boxed{2}", add_special_tokens=False)["input_ids"]
    responses = [answer + [IM_END, task.pad_id], answer + [EOS, task.pad_id], answer + [task.pad_id] * 2]
    scores = score_responses(responses, ["2"] * 3, decode=task.decode, eos_id=task.stop_ids,
                             reward_fn=task.reward_fn)
    assert scores.finished.tolist() == [True, True, False]
    assert scores.rewards.tolist() == [1.0, 1.0, 0.0]


def test_without_a_pad_token_the_tokenizers_eos_pads(tmp_path):
    task = prompt_task(tmp_path, model_dir(tmp_path / "model", generation=[IM_END, EOS], pad=False))
    assert task.tokenizer.pad_token_id is None
    assert task.stop_ids == (EOS, IM_END) and task.pad_id == EOS


def test_without_generation_config_the_tokenizers_eos_alone(tmp_path):
    task = prompt_task(tmp_path, model_dir(tmp_path / "model"))
    assert task.stop_ids == (EOS,)


def test_stop_ids_outside_the_vocabulary_are_refused_naming_the_file(tmp_path):
    d = model_dir(tmp_path / "model", config=[EOS, 128009])
    with pytest.raises(ValueError, match=r"model/config\.json: eos_token_id \[128009\] is outside"):
        prompt_task(tmp_path, d)
