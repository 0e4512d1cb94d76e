"""Small plain-PyTorch DecodingModels for the rollout engine tests."""
from __future__ import annotations

from typing import Optional

import torch


class BigramModel:
    """Next-token logits = table[last token] + position_bias[position of that token]: a model whose
    output depends on the right row position, so that indexing mistakes show."""

    def __init__(self, vocab_size: int, max_len: int, gen: torch.Generator, scale: float = 2.0):
        self.vocab_size = vocab_size
        self.table = torch.randn(vocab_size, vocab_size, generator=gen) * scale
        self.position_bias = torch.randn(max_len, vocab_size, generator=gen) * 0.5
        self.calls = 0

    def logits_at(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(tokens.shape[0])
        return self.table[tokens[rows, last]] + self.position_bias[last]

    def next_token_logits(self, tokens: torch.Tensor, last: torch.Tensor) -> Optional[torch.Tensor]:
        self.calls += 1
        return self.logits_at(tokens, last)

    def share(self, t, like):
        return t


class CachedBigramModel(BigramModel):
    """BigramModel with the incremental protocol: the 'cache' is the rows' last token and length."""

    def begin(self, prefix, max_new_tokens):
        self.cache = {"last": prefix[:, -1].clone(), "length": prefix.shape[1], "limit": prefix.shape[1] + max_new_tokens}
        self.calls += 1
        return self._current()

    def advance(self, tokens):
        assert self.cache["length"] < self.cache["limit"], "advanced past max_new_tokens"
        self.cache["last"], self.cache["length"] = tokens.clone(), self.cache["length"] + 1
        self.calls += 1
        return self._current()

    def end(self):
        self.cache = None

    def _current(self):
        last = self.cache["last"]
        position = torch.full_like(last, self.cache["length"] - 1)
        return self.table[last] + self.position_bias[position]
