"""Score a batch of sampled responses (token ids) with a reward function."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Mapping, Optional, Sequence, Union

import torch

from .reward_fn import RewardFn
from .verifier import boxed_match

EosIds = Union[int, Collection[int]]


def eos_ids(eos_id) -> set:
    """The EOS ids as a set of Python ints, from one id (int, NumPy integer, 0-d tensor) or a
    collection of them (list, tuple, set, 1-D tensor or array)."""
    def is_id(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    values = eos_id.tolist() if hasattr(eos_id, "tolist") else eos_id  # tensors, NumPy values
    if is_id(values):
        return {int(values)}
    try:
        values = [v.tolist() if hasattr(v, "tolist") else v for v in values]
    except TypeError:
        values = []
    if not values or not all(is_id(v) for v in values):
        raise TypeError(f"eos_id must be a token id or a non-empty collection of token ids (ints), got "
                        f"{eos_id!r}")
    return {int(v) for v in values}


def split_at_eos(ids: Iterable[int], eos_id: EosIds) -> tuple[list[int], bool]:
    """(the ids before the first EOS, whether an EOS occurred). eos_id: one id or a collection
    (models with several end tokens). `ids` may be a list or a 1-D integer tensor."""
    eos = eos_ids(eos_id)
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    for pos, token in enumerate(ids):
        if token in eos:
            return ids[:pos], True
    return ids, False


@dataclass(frozen=True)
class Scores:
    """rewards [B] float32 in [0, 1]; correct [B] bool (reward == 1: SCOPE's correct path);
    finished [B] bool (the response had an EOS); texts: the responses decoded up to EOS."""

    rewards: torch.Tensor
    correct: torch.Tensor
    finished: torch.Tensor
    texts: tuple[str, ...]


def score_responses(responses: Iterable[Iterable[int]], references: Sequence[str], *,
                    decode: Callable[[Sequence[int]], str], eos_id: EosIds,
                    reward_fn: RewardFn = boxed_match,
                    metadata: Optional[Sequence[Mapping[str, Any]]] = None) -> Scores:
    """Grade B responses against their references.

    responses: B token-id sequences (lists, or the rows of a [B, L] tensor), the generated
      response only. Each is cut at its first EOS; tokens after it (padding, or text generated
      past EOS) are never seen. A row without EOS is unfinished (truncated); padding inside such
      a row must be a special token that `decode` drops.
    references: B reference answers (one per response; repeat a prompt's answer for its G
      rollouts, e.g. [refs[g] for g in prompt_batch.group_ids.tolist()]).
    decode: ids -> text with special tokens dropped (CharTokenizer.decode, or
      `lambda ids: hf_tokenizer.decode(ids, skip_special_tokens=True)`).
    metadata: optional per-response mappings passed on to reward_fn; "finished" is set here.
    Raises ValueError naming the response when reward_fn returns anything but a finite real
    number (float, int, bool, numpy scalar) in [0, 1].
    """
    responses = list(responses)
    if len(references) != len(responses):
        raise ValueError(f"score_responses: {len(responses)} responses but {len(references)} "
                         "references (one reference per response)")
    if metadata is not None and len(metadata) != len(responses):
        raise ValueError(f"score_responses: {len(responses)} responses but {len(metadata)} "
                         "metadata entries")
    eos = eos_ids(eos_id)
    rewards, finished, texts = [], [], []
    for i, (ids, reference) in enumerate(zip(responses, references)):
        kept, done = split_at_eos(ids, eos)
        text = decode(kept)
        extra = metadata[i] if metadata is not None else {}
        reward = reward_fn(text, reference, metadata={**extra, "finished": done})
        if (not isinstance(reward, numbers.Real) or not math.isfinite(reward)
                or not 0.0 <= reward <= 1.0):
            name = getattr(reward_fn, "__qualname__", type(reward_fn).__qualname__)
            raise ValueError(f"reward function {name} returned {reward!r} for response {i}; it "
                             "must return a finite float in [0, 1] (1 = correct)")
        rewards.append(float(reward))
        finished.append(done)
        texts.append(text)
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    return Scores(rewards_t, rewards_t >= 1.0, torch.tensor(finished, dtype=torch.bool),
                  tuple(texts))
