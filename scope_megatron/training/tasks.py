"""What the trainer trains on: prompts (token ids) with reference answers, a decoder of responses,
the stop ids and the reward function. Two tasks:

  toy_arithmetic  the embedded toy world (its own tokenizer, held-out split, problem families)
  prompts         a prompt dataset file (JSONL / JSON / Parquet) through a Hugging Face tokenizer,
                  held-out prompts from an evaluation file (or none)

Every task's `train_items(step, n, seed)` is a pure function of its arguments, so a resumed run
draws exactly the prompts an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from scope_megatron.rewards import load_reward_fn


@dataclass(frozen=True)
class TaskItem:
    """One prompt: its token ids, the reference answer, and what evaluations break down by."""

    prompt_ids: Tuple[int, ...]
    reference: str
    meta: Dict[str, Any] = field(default_factory=dict)


class Task:
    """The interface the trainer uses (see the module docstring)."""

    name: str
    reward_fn: Callable
    pad_id: int
    stop_ids: Tuple[int, ...]
    vocab_size: int  # ids the tokenizer can produce (the model's vocabulary may be larger)

    def train_items(self, step: int, n: int, seed: int) -> List[TaskItem]:
        raise NotImplementedError

    def held_out_items(self, n: int) -> List[TaskItem]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def families(self) -> Dict[str, Callable[[TaskItem], bool]]:
        """Named subsets of held-out items reported separately (toy world only)."""
        return {}

    def longest_prompt(self) -> int:
        """Tokens of the longest prompt the run samples from (training and held-out)."""
        raise NotImplementedError


class ToyTask(Task):
    name = "toy_arithmetic"

    def __init__(self, digits: int, reward_fn: str, family_names: Sequence[str] = ()):
        from scope_megatron.data.toy_arithmetic import ToyArithmetic, ToyArithmeticConfig

        self.world = ToyArithmetic(ToyArithmeticConfig(digits=digits))
        self.tokenizer = self.world.tokenizer
        self.reward_fn = load_reward_fn(reward_fn)
        self.pad_id = self.tokenizer.pad_id
        self.stop_ids = (self.tokenizer.eos_id,)
        self.vocab_size = self.tokenizer.vocab_size
        self.family_names = tuple(family_names)

    def _item(self, problem) -> TaskItem:
        return TaskItem(tuple(self.world.prompt_ids(problem)), self.world.answer(problem), {"problem": problem})

    def train_items(self, step: int, n: int, seed: int) -> List[TaskItem]:
        return [self._item(p) for p in self.world.train_problems(step, n, seed=seed)]

    def held_out_items(self, n: int) -> List[TaskItem]:
        return [self._item(p) for p in self.world.held_out[:n]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def families(self):
        from scope_megatron.data.toy_arithmetic import family

        return {name: (lambda item, f=family(name): f(item.meta["problem"])) for name in self.family_names}

    def longest_prompt(self) -> int:
        return self.world.prompt_len


class PromptTask(Task):
    """Prompts from a dataset file through a Hugging Face tokenizer (scope_megatron.data.prompts)."""

    name = "prompts"

    def __init__(self, cfg, seed: int):
        from transformers import AutoTokenizer

        from scope_megatron.data.prompts import PromptDataset
        from scope_megatron.data.stop_ids import stop_token_ids

        if not cfg.train_data:
            raise ValueError("task.name 'prompts' needs task.train_data (--task-train-data FILE)")
        if not cfg.tokenizer:
            raise ValueError("task.name 'prompts' needs task.tokenizer (--task-tokenizer HF_DIR): the "
                             "student's Hugging Face tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        self.reward_fn = load_reward_fn(cfg.resolved_reward_fn)
        # the tokenizer's eos, then generation_config.json's and config.json's of its directory:
        # the model (and SGLang) stops on each of them, and a response ending on one is finished
        try:
            self.stop_ids = stop_token_ids(self.tokenizer, cfg.tokenizer)
        except ValueError as e:
            raise ValueError(f"task.tokenizer {cfg.tokenizer}: {e}") from None
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]
        self.vocab_size = len(self.tokenizer)
        kw = dict(tokenizer=self.tokenizer, prompt_key=cfg.prompt_key or None, answer_key=cfg.answer_key or None,
                  suffix=cfg.prompt_suffix, chat_template=cfg.chat_template, max_prompt_len=cfg.max_prompt_len,
                  meta_keys=())  # rows of e.g. DeepMath carry long solutions: keep none of it
        self.seed = seed
        self.train = PromptDataset(cfg.train_data, seed=seed, **kw)
        self.eval = PromptDataset(cfg.eval_data, shuffle=False, **kw) if cfg.eval_data else None

    @staticmethod
    def _item(p) -> TaskItem:
        return TaskItem(tuple(p.prompt_ids), p.reference, {"id": p.id})

    def train_items(self, step: int, n: int, seed: int) -> List[TaskItem]:
        if seed != self.seed:
            raise ValueError(f"PromptTask was built for seed {self.seed}, asked for seed {seed}")
        return [self._item(p) for p in self.train.batch(step, n)]

    def held_out_items(self, n: int) -> List[TaskItem]:
        if self.eval is None:
            return []
        return [self._item(self.eval[i]) for i in range(min(n, len(self.eval)))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def longest_prompt(self) -> int:
        return max(d.stats["longest_kept"] for d in (self.train, self.eval) if d is not None)


def build_task(cfg) -> Task:
    """The task of a TrainConfig's `task` section."""
    t = cfg.task
    if t.name == "toy_arithmetic":
        return ToyTask(t.digits, t.resolved_reward_fn, t.eval_families)
    if t.name == "prompts":
        return PromptTask(t, seed=cfg.training.seed)
    raise ValueError(f"unknown task.name {t.name!r}; use 'toy_arithmetic' or 'prompts'")
