"""What a rollout engine takes and returns, whichever engine it is (the local Megatron engine here,
SGLang servers: rollout/sglang)."""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


# The smallest sampling temperature above 0 (greedy): SGLang's own threshold.
MIN_TEMPERATURE = 1e-6


def logprob_temperature_of(temperature: float) -> float:
    """The temperature of the log-probs an engine returns when sampling at `temperature`: that
    temperature, or 1 for greedy decoding (0). The one rule for engines and config checks."""
    return temperature if temperature > 0 else 1.0


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled.

    n: rollouts per prompt (the group size G).
    temperature: softmax temperature (> 0); 0 means greedy decoding.
    top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
      (1.0 = off).
    top_k: keep the k most likely tokens (0 = off).
    max_new_tokens: response length limit; a response that reaches it without a stop token is
      "truncated" (finished=False).
    stop_token_ids: ids that end a response (included in the response, e.g. EOS).
    seed: base seed of the sampling randomness. Engines derive each call's generator from
      (seed, call key), so a resumed run samples exactly what an uninterrupted one would.

    Log-probs returned with a rollout are log softmax(logits / temperature) of the sampled token
    over the whole (unpadded) vocabulary, before top-p / top-k truncation: the quantity the trainer
    recomputes (vocab_parallel_logprob at the same temperature). With greedy decoding they are at
    temperature 1.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_token_ids: Tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            # SGLang samples greedily below 1e-6 and returns log-probs at temperature 1; the
            # trainer would recompute them at this temperature
            raise ValueError(f"SamplingParams.temperature {self.temperature!r} is below {MIN_TEMPERATURE}: "
                             "pass 0 for greedy decoding")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def logprob_temperature(self) -> float:
        return logprob_temperature_of(self.temperature)


@dataclass(frozen=True)
class Rollouts:
    """Sampled responses of B prompts x n rollouts each (rollout i answers prompt i // n).

    prompt_ids: [B*n, P] the prompt of each rollout (left-aligned, pad_id after prompt_lengths).
    prompt_lengths: [B*n] int64.
    response_ids: [B*n, L] sampled tokens, pad_id after the end of each response.
    response_mask: [B*n, L] bool, True for the response's tokens (the stop token included,
      everything after it excluded). Every response has at least one token.
    logprobs: [B*n, L] float32 log-probs of the sampled tokens (see SamplingParams), 0 where the
      mask is False.
    group_ids: [B*n] int64, the prompt index of each rollout (0..B-1).
    finished: [B*n] bool, True if the response ended with a stop token (False: truncated at
      max_new_tokens).
    """

    prompt_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    group_ids: torch.Tensor
    finished: torch.Tensor

    @property
    def num_rollouts(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def responses(self) -> list:
        """Each response's token ids as a Python list (up to and including its stop token)."""
        return [ids[mask].tolist() for ids, mask in zip(self.response_ids, self.response_mask)]


class RolloutEngine(abc.ABC):
    """Samples responses from the current student. Implementations: LocalEngine (the trainer's
    own Megatron model) and SGLangEngine (servers fed with the trainer's weights)."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 key: int = 0) -> Rollouts:
        """n rollouts for each prompt (token ids, no padding). `key` distinguishes calls (e.g. the
        training step): the same (params.seed, key, prompts) gives the same rollouts."""

    def update_weights(self, step: Optional[int] = None) -> None:
        """Makes the engine sample from the trainer's current weights (a no-op for an engine that
        shares the trainer's model)."""
