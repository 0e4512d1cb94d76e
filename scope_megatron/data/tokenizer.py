"""A tiny fixed-vocabulary tokenizer: special tokens, then single characters or short symbols.

Ids are deterministic: 0 <pad>, 1 <bos>, 2 <eos>, then the symbols in the order given. Encoding
matches the longest symbol first, so a multi-character symbol such as `\\boxed{` is one token.
"""
from __future__ import annotations

from typing import Iterable, Sequence

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class CharTokenizer:
    """Tokenizer over SPECIAL_TOKENS + `symbols` (ids 0, 1, 2, then 3, 4, ... in `symbols` order).

    Special tokens are never produced by `encode` from text: they are added with bos=/eos= and
    dropped by `decode` unless skip_special=False (then rendered as "<pad>", "<bos>", "<eos>").
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, symbols: Sequence[str]):
        symbols = tuple(symbols)
        if not symbols:
            raise ValueError("CharTokenizer needs at least one symbol")
        for s in symbols:
            if not isinstance(s, str) or not s:
                raise ValueError(f"CharTokenizer: every symbol must be a non-empty string, "
                                 f"got {s!r}")
        repeated = {s for s in symbols if symbols.count(s) > 1}
        clashing = set(symbols) & set(SPECIAL_TOKENS)
        if repeated or clashing:
            raise ValueError(f"CharTokenizer: symbols {sorted(repeated)} are repeated and "
                             f"{sorted(clashing)} clash with the special tokens {SPECIAL_TOKENS}")
        self._tokens = SPECIAL_TOKENS + symbols
        self._ids = {tok: i for i, tok in enumerate(self._tokens)}
        # Longest match first: a multi-character symbol wins over its first character.
        self._by_length = sorted(symbols, key=len, reverse=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the true vocabulary, before any model padding)."""
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[str, ...]:
        """The vocabulary table: tokens[i] is the token with id i."""
        return self._tokens

    def token_to_id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the vocabulary {self._tokens}") from None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (greedy longest match), optionally framed by <bos> / <eos>.

        Raises ValueError naming the first character that no symbol matches."""
        ids = [BOS_ID] if bos else []
        pos = 0
        while pos < len(text):
            for sym in self._by_length:
                if text.startswith(sym, pos):
                    ids.append(self._ids[sym])
                    pos += len(sym)
                    break
            else:
                raise ValueError(f"cannot encode {text[pos]!r} at position {pos} of {text!r}: "
                                 f"not in the vocabulary {self._tokens[len(SPECIAL_TOKENS):]}")
        if eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of `ids` (a list or a 1-D integer tensor). Special tokens are dropped wherever they
        are unless skip_special=False; to read a response only up to its EOS, cut it first
        (scope_megatron.rewards.split_at_eos)."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._tokens):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self._tokens)})")
            if i < len(SPECIAL_TOKENS) and skip_special:
                continue
            out.append(self._tokens[i])
        return "".join(out)
