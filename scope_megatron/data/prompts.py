r"""PromptDataset: the training prompts a trainer draws each step's batch from (math problems with
reference answers, from JSONL / JSON / Parquet files), tokenized with a Hugging Face tokenizer.

Rows. Field lookup and value rules are those of the benchmark loaders (scope_megatron.eval.
benchmarks): the problem is the first non-empty of `prompt_key` (default: problem, Problem,
question, Question, prompt, input; a string, or a chat list such as verl's parquet `prompt`, whose
last user message is taken); the reference answer the first non-empty of `answer_key` (default:
answer, Answer, final_answer, reward_model.ground_truth, ground_truth, target, expected_answer,
and only when none of those is present solution / Solution); numeric answers 27.0 -> "27". A value
taken from a solution field is a worked solution: its last `\boxed{}` is the answer (as is, if it
has none; a warning and `stats["solution_without_box"]` count those of several words). Dotted
keys reach into nested fields. The id is `id_key` (default: id, ID, unique_id,
idx, problem_id, uid, else the row's index over all files, counted before filtering). Other
top-level fields go to `meta` (only `meta_keys` when given: DeepMath-103K rows carry three long
R1 solutions each, pass meta_keys=() or a short list there). A row without a problem or an
answer is a ValueError naming the file, the row (0-based, blank JSONL lines not counted) and the
fields it has.

Prompt. user = prompt_template.format(problem=problem + suffix); DEFAULT_SUFFIX is
" Put your final answer within \boxed{}." (the SCOPE reference code appends the same sentence,
literally "...\boxed{{}}." with no space; a problem that already ends with the suffix, modulo
whitespace and that doubled brace, is not given it twice, so the reference parquet files can be
read with the defaults). With `chat_template=True` and a tokenizer that has one, the ids are
tokenizer.apply_chat_template([system?, user], add_generation_prompt=True) (rendered to text,
then tokenized without special tokens, which is exactly what apply_chat_template(tokenize=True)
does); otherwise tokenizer(text) with its special tokens, the system prompt (if any) prepended to
the text followed by a blank line.

Cost. Every prompt is tokenized once, at construction, in batches of 1024 (fast tokenizers
tokenize a batch in Rust): linear in the dataset; ids live in one flat int32 array, and
PromptItems are built only for the prompts a batch returns. Prompts longer than
`max_prompt_len` tokens are dropped at load, counted in `stats` / `num_filtered` and reported in
one logged line; nothing left is a ValueError.

Order. The prompt stream is epoch after epoch of a permutation of the kept prompts drawn from
(seed, epoch) (shuffle=False: file order). batch(step, batch_size) is stream positions
[step * batch_size, (step + 1) * batch_size): a pure function of (seed, step, batch_size) and the
kept prompts, so a resumed run draws exactly what an uninterrupted one would, with no loader
state (like ToyArithmetic.train_problems). A batch that crosses an epoch's end continues into the
next epoch's permutation; every prompt appears exactly once per epoch. next_batch(batch_size)
walks the same stream from a cursor; state_dict() / load_state_dict() save and restore that
cursor (consumed prompts, epoch) and refuse a state from a different seed or dataset (the
fingerprint covers ids and prompt tokens: a changed file, tokenizer, template or max_prompt_len
changes the stream). Data parallelism: every rank draws the same global batch and takes its
slice.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from scope_megatron.eval.benchmarks import (ANSWER_FIELDS, ID_FIELDS, PROBLEM_FIELDS, _answer, _lookup, _rows,
                                           _text)
from scope_megatron.rewards.boxed import extract_boxed

logger = logging.getLogger(__name__)

DEFAULT_SUFFIX = " Put your final answer within \\boxed{}."
SOLUTION_FIELDS = ("solution", "Solution")
_TOKENIZE_CHUNK = 1024

PathLike = Union[str, os.PathLike]
Keys = Union[None, str, Sequence[str]]


@dataclass(frozen=True)
class PromptItem:
    """One training prompt: `prompt_ids` are what the model sees, `reference` what the verifier
    compares the final boxed answer with, `problem` the raw problem text (no suffix/template)."""

    id: str
    prompt_ids: Tuple[int, ...]
    reference: str
    problem: str
    meta: Dict[str, Any] = field(default_factory=dict, hash=False)


def _keys(keys: Keys, default: Sequence[str], what: str) -> Tuple[str, ...]:
    if keys is None:
        return tuple(default)
    if isinstance(keys, str):
        keys = (keys,)
    keys = tuple(keys)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"{what} must be a field name or a non-empty list of field names, got {keys!r}")
    return keys


def _normalized(text: str) -> str:
    return " ".join(text.replace("{{}}", "{}").split())


def _hash_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def encode_prompts(tokenizer, user_texts: Sequence[str], *, chat_template: bool, system_prompt: Optional[str] = None,
                   chat_kwargs: Optional[Mapping[str, Any]] = None, progress: Optional[bool] = False
                   ) -> List[List[int]]:
    """Prompt token ids of user messages with a Hugging Face tokenizer, in chunks.

    chat_template True: the tokenizer's chat template (system prompt first when given, then the
    user turn, add_generation_prompt) rendered to text and tokenized without special tokens (the
    template holds them). False: the text (after "system_prompt\n\n" when given) with the
    tokenizer's special tokens. progress: a tqdm bar (None: for more than one chunk, on a terminal).
    """
    from tqdm import tqdm

    chat_kwargs = dict(chat_kwargs or {})
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    out: List[List[int]] = []
    disable = (None if len(user_texts) > _TOKENIZE_CHUNK else True) if progress is None else not progress
    with tqdm(total=len(user_texts), desc="tokenizing prompts", unit="prompt", disable=disable) as bar:
        for start in range(0, len(user_texts), _TOKENIZE_CHUNK):
            chunk = list(user_texts[start:start + _TOKENIZE_CHUNK])
            if chat_template:
                rendered = tokenizer.apply_chat_template([system + [{"role": "user", "content": t}] for t in chunk],
                                                         tokenize=False, add_generation_prompt=True, **chat_kwargs)
                encoded = tokenizer(list(rendered), add_special_tokens=False)["input_ids"]
            else:
                if system_prompt:
                    chunk = [f"{system_prompt}\n\n{t}" for t in chunk]
                encoded = tokenizer(chunk, add_special_tokens=True)["input_ids"]
            out.extend(list(ids) for ids in encoded)
            bar.update(len(chunk))
    return out


class PromptDataset:
    """Training prompts from one or more files (see the module docstring for the contract).

        ds = PromptDataset("deepmath.parquet", tokenizer, max_prompt_len=1024, seed=0)
        items = ds.batch(step, batch_size)        # pure function of (seed, step, batch_size)
        items = ds.next_batch(batch_size)         # cursor API; ds.state_dict() to checkpoint
    """

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]], tokenizer, *,
                 prompt_key: Keys = None, answer_key: Keys = None, id_key: Optional[str] = None,
                 meta_keys: Optional[Sequence[str]] = None,
                 suffix: str = DEFAULT_SUFFIX, prompt_template: str = "{problem}",
                 system_prompt: Optional[str] = None, chat_template: bool = True,
                 chat_template_kwargs: Optional[Mapping[str, Any]] = None,
                 max_prompt_len: Optional[int] = None, seed: int = 0, shuffle: bool = True,
                 limit: Optional[int] = None, progress: Optional[bool] = None):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("PromptDataset needs at least one file")
        if max_prompt_len is not None and (not isinstance(max_prompt_len, int) or max_prompt_len < 1):
            raise ValueError(f"max_prompt_len must be a positive integer or None, got {max_prompt_len!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not isinstance(suffix, str):
            raise ValueError(f"suffix must be a string ('' for none), got {suffix!r}")
        try:
            probe = prompt_template.format(problem="\0")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"prompt_template {prompt_template!r} must be a format string whose only "
                             f"field is {{problem}} (write literal braces as {{{{ }}}}): {exc!r}") from exc
        if "\0" not in probe:
            raise ValueError(f"prompt_template {prompt_template!r} has no {{problem}} field")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        self.prompt_keys = _keys(prompt_key, PROBLEM_FIELDS, "prompt_key")
        self.answer_keys = _keys(answer_key, ANSWER_FIELDS + SOLUTION_FIELDS, "answer_key")
        self.id_key = id_key
        self.meta_keys = None if meta_keys is None else tuple(meta_keys)
        self.suffix = suffix
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.chat_kwargs = dict(chat_template_kwargs or {})
        self.uses_chat_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self.max_prompt_len = max_prompt_len
        self.seed = seed
        self.shuffle = shuffle

        self._unboxed = []  # (file, row) of references taken verbatim from a prose solution
        ids, problems, references, metas, suffixed_already, rows = self._read(limit)
        token_lists = self._tokenize([self._user_text(p) for p in problems], progress)
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        keep = np.ones(len(token_lists), dtype=bool) if max_prompt_len is None else lengths <= max_prompt_len
        kept = np.flatnonzero(keep).tolist()
        self._ids = [ids[i] for i in kept]
        self._problems = [problems[i] for i in kept]
        self._references = [references[i] for i in kept]
        self._metas = [metas[i] for i in kept]
        self._lengths = lengths[keep]
        self._offsets = np.zeros(len(kept) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=self._offsets[1:])
        flat = np.empty(int(self._offsets[-1]), dtype=np.int32)
        for j, i in enumerate(kept):
            flat[self._offsets[j]:self._offsets[j + 1]] = token_lists[i]
        self._tokens = flat
        self.stats = {
            "rows": rows,
            "kept": len(kept),
            "filtered_too_long": int(len(token_lists) - len(kept)),
            "max_prompt_len": max_prompt_len,
            "longest_kept": int(self._lengths.max()) if len(kept) else 0,
            "mean_len": float(self._lengths.mean()) if len(kept) else 0.0,
            "suffix_already_present": suffixed_already,
            "solution_without_box": len(self._unboxed),
            "chat_template": self.uses_chat_template,
        }
        names = ", ".join(str(p) for p in self.paths)
        logger.info("prompts from %s: %d of %d kept, %d longer than %s tokens dropped; longest kept %d "
                    "tokens; chat template %s", names, len(kept), rows, self.stats["filtered_too_long"],
                    max_prompt_len, self.stats["longest_kept"], "on" if self.uses_chat_template else "off")
        if self._unboxed:
            path, row = self._unboxed[0]
            logger.warning(
                "%d of %d references were taken verbatim from a solution with no \\boxed{} answer "
                "(first: %s row %d); rollouts rarely match a whole worked solution, so those prompts "
                "will score 0 for every rollout. Name the field holding the final answer "
                "(answer_key=...) or box the answers in the solutions", len(self._unboxed), rows, path, row)
        if not kept:
            raise ValueError(f"no prompt of {names} fits max_prompt_len={max_prompt_len} "
                             f"(all {rows} are longer); raise max_prompt_len")
        self.fingerprint = self._fingerprint()
        self._perms: Dict[int, np.ndarray] = {}
        self._consumed = 0

    # ---- loading ------------------------------------------------------------------------------

    def _read(self, limit: Optional[int]):
        ids: List[str] = []
        problems: List[str] = []
        references: List[str] = []
        metas: List[Dict[str, Any]] = []
        suffixed_already = 0
        index = 0
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {path} does not exist")
            for i, row in enumerate(_rows(path)):
                if limit is not None and index >= limit:
                    break
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: row {i} is not an object but {type(row).__name__}")
                problem, pkey = self._problem(row)
                answer, akey, unboxed = self._reference(row)
                if unboxed:
                    self._unboxed.append((path, i))
                if problem is None or answer is None:
                    missing, tried = (("problem", self.prompt_keys) if problem is None
                                      else ("answer", self.answer_keys))
                    raise ValueError(f"{path}: row {i} has no {missing} (its fields: {sorted(row)}); "
                                     f"looked for {list(tried)}")
                ids.append(self._row_id(row, path, i, index))
                if self.suffix and _normalized(problem).endswith(_normalized(self.suffix)):
                    suffixed_already += 1
                problems.append(problem)
                references.append(answer)
                used = {pkey.split(".")[0], akey.split(".")[0]}
                if self.id_key is not None:
                    used.add(self.id_key.split(".")[0])
                else:
                    used.update(ID_FIELDS)
                wanted = self.meta_keys
                metas.append({k: v for k, v in row.items()
                              if k not in used and (wanted is None or k in wanted)})
                index += 1
        return ids, problems, references, metas, suffixed_already, index

    def _problem(self, row) -> Tuple[Optional[str], Optional[str]]:
        for key in self.prompt_keys:
            text = _text(_lookup(row, key))
            if text and text.strip():
                return text, key
        return None, None

    def _reference(self, row) -> Tuple[Optional[str], Optional[str], bool]:
        """(reference, its key, whether it is a solution field's prose taken whole for want of a
        \\boxed{} answer: several words, not a short answer such as "42")."""
        for key in self.answer_keys:
            value = _answer(_lookup(row, key))
            if not value:
                continue
            if key.split(".")[-1] in SOLUTION_FIELDS:
                boxed = extract_boxed(value)
                if boxed and boxed.strip():
                    return boxed.strip(), key, False
                return value, key, len(value.split()) > 3
            return value, key, False
        return None, None, False

    def _row_id(self, row, path: Path, i: int, index: int) -> str:
        if self.id_key is not None:
            value = _lookup(row, self.id_key)
            if value is None:
                raise ValueError(f"{path}: row {i} has no id field {self.id_key!r} "
                                 f"(its fields: {sorted(row)})")
            return str(value)
        return next((str(row[f]) for f in ID_FIELDS if row.get(f) is not None), str(index))

    def _user_text(self, problem: str) -> str:
        if self.suffix and not _normalized(problem).endswith(_normalized(self.suffix)):
            problem = problem + self.suffix
        return self.prompt_template.format(problem=problem)

    def _tokenize(self, texts: List[str], progress: Optional[bool]) -> List[List[int]]:
        return encode_prompts(self.tokenizer, texts, chat_template=self.uses_chat_template,
                              system_prompt=self.system_prompt, chat_kwargs=self.chat_kwargs, progress=progress)

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(np.int64(len(self)).tobytes())
        h.update(self._offsets.tobytes())
        h.update(self._tokens.tobytes())
        h.update("\0".join(self._ids).encode())
        h.update("\0".join(self._references).encode())
        return h.hexdigest()[:16]

    # ---- items --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def num_filtered(self) -> int:
        """Prompts dropped at load for being longer than max_prompt_len."""
        return self.stats["filtered_too_long"]

    def __getitem__(self, index: int) -> PromptItem:
        """The index-th kept prompt in file order (not the shuffled stream)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"prompt index {index} out of range for {n} prompts")
        index %= n
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return PromptItem(self._ids[index], tuple(self._tokens[lo:hi].tolist()), self._references[index],
                          self._problems[index], dict(self._metas[index]))

    # ---- the stream ---------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset indices of epoch `epoch` in stream order (a permutation of range(len))."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_hash_seed("scope-prompts", self.seed, epoch))
                perm = torch.randperm(len(self), generator=gen).numpy()
            else:
                perm = np.arange(len(self))
            if len(self._perms) >= 2:  # the stream only ever needs the current and next epoch
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def window(self, start: int, count: int) -> List[PromptItem]:
        """Stream positions [start, start + count)."""
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"stream position must be a non-negative integer, got {start!r}")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"batch size must be a positive integer, got {count!r}")
        n = len(self)
        return [self[int(self.epoch_order(s // n)[s % n])] for s in range(start, start + count)]

    def batch(self, step: int, batch_size: int) -> List[PromptItem]:
        """The prompts of step `step`: a pure function of (seed, step, batch_size)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        return self.window(step * batch_size, batch_size)

    def epoch_of(self, step: int, batch_size: int) -> int:
        """The epoch the first prompt of step `step` belongs to."""
        return step * batch_size // len(self)

    def next_batch(self, batch_size: int) -> List[PromptItem]:
        """The next `batch_size` prompts of the stream; advances the cursor. With a constant batch
        size, the k-th call returns batch(k, batch_size) (counting from a fresh dataset)."""
        items = self.window(self._consumed, batch_size)
        self._consumed += batch_size
        return items

    @property
    def consumed(self) -> int:
        """Prompts drawn with next_batch so far (the cursor's stream position)."""
        return self._consumed

    @property
    def epoch(self) -> int:
        """The epoch of the next prompt next_batch returns."""
        return self._consumed // len(self)

    def state_dict(self) -> Dict[str, Any]:
        return {"consumed": self._consumed, "epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle,
                "num_prompts": len(self), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the cursor. Raises ValueError for a state saved with another seed, order or set
        of prompts (it would silently draw a different stream)."""
        if "consumed" not in state:
            raise ValueError(f"a PromptDataset state needs 'consumed', got keys {sorted(state)}")
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_prompts", "fingerprint"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"the saved prompt state has {key}={state[key]!r} but this dataset has "
                                 f"{mine[key]!r}: resuming would draw a different prompt stream (same files, "
                                 f"tokenizer, template, max_prompt_len and seed are needed)")
        consumed = state["consumed"]
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"saved 'consumed' must be a non-negative integer, got {consumed!r}")
        if "epoch" in state and state["epoch"] != consumed // len(self):
            raise ValueError(f"saved epoch {state['epoch']} does not match consumed={consumed} with "
                             f"{len(self)} prompts (epoch {consumed // len(self)})")
        self._consumed = consumed
