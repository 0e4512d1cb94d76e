"""Next-token sampling from full-vocabulary logits: temperature, top-k, top-p, greedy."""
from __future__ import annotations

from typing import Tuple

import torch

from .types import SamplingParams


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  uniform: torch.Tensor | None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Samples one token per row.

    Args:
      logits: [N, V] next-token logits over the true vocabulary (padding columns already removed),
        any float dtype; computed in float32.
      params: temperature / top_k / top_p (temperature 0: greedy).
      uniform: [N, V] float32 noise in [0, 1) (None for greedy decoding): the only source of
        randomness (Gumbel-max sampling), so ranks with the same logits and noise draw the same
        tokens.

    Returns (tokens [N] int64, logprobs [N] float32): log softmax(logits / T)[token] over the whole
    vocabulary, before truncation (see SamplingParams).
    """
    x = logits.float()
    logprobs_all = torch.log_softmax(x / params.logprob_temperature, dim=-1)
    if params.temperature == 0:
        tokens = x.argmax(dim=-1)
    else:
        scores = _truncate(x / params.temperature, params.top_k, params.top_p)
        # Gumbel-max: argmax(scores + G) with G ~ Gumbel(0, 1) samples from softmax(scores).
        if uniform is None or uniform.shape != scores.shape:
            raise ValueError(f"sample_tokens: sampling at temperature {params.temperature} needs "
                             f"uniform noise of shape {tuple(scores.shape)}")
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        tokens = (scores + gumbel).argmax(dim=-1)
    return tokens, logprobs_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _truncate(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets the scores outside the top-k, then outside the nucleus of the renormalized top-k
    distribution, to -inf (the usual order; the most likely token always stays)."""
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # keep a token if the mass before it is below top_p (so the token crossing top_p stays)
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores
