r"""BoxedMatchVerifier: the last `\boxed{}` answer compared with the reference, reward 0 or 1.

Extension point: the comparison is one callable `compare(predicted, reference) -> bool`
(default `exact_match`). The math-equivalence comparator (rewards.math_verify) plugs in as
`BoxedMatchVerifier(compare=...)`; its per-answer time limit raises VerificationTimeout when it
expires, which the verifier scores as wrong.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from .boxed import extract_boxed

Comparator = Callable[[str, str], bool]

_INTEGER = re.compile(r"([+-]?)(\d+)")
_WHITESPACE = re.compile(r"\s+")


class VerificationTimeout(Exception):
    """Raised by a comparator whose time limit expired; the answer is scored as wrong."""


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: an integer (whitespace anywhere, sign, leading zeros) becomes
    its decimal form ("0 81" -> "81", "+007" -> "7", "-0" -> "0"); anything else is stripped with
    internal whitespace runs collapsed to one space."""
    compact = _WHITESPACE.sub("", answer)
    match = _INTEGER.fullmatch(compact)
    if match:  # string operations only: int() refuses > 4300 digits
        sign, digits = match.groups()
        digits = digits.lstrip("0") or "0"
        return digits if sign != "-" or digits == "0" else "-" + digits
    return _WHITESPACE.sub(" ", answer.strip())


def exact_match(predicted: str, reference: str) -> bool:
    """Equality after normalize_answer on both sides."""
    return normalize_answer(predicted) == normalize_answer(reference)


class BoxedMatchVerifier:
    """A reward function (see scope_megatron.rewards.reward_fn for the signature):

        verifier(response_text, reference, *, metadata) -> 1.0 or 0.0

    response_text: the response decoded up to (not including) its first EOS.
    reference: the reference answer.
    metadata["finished"] (required bool): whether the response ended with EOS. An unfinished
      (truncated) response scores 0, as does one without a balanced final `\boxed{}`, or whose
      comparison raised VerificationTimeout.
    """

    def __init__(self, compare: Comparator = exact_match):
        if not callable(compare):
            raise TypeError(f"BoxedMatchVerifier: compare must be callable (predicted, reference) "
                            f"-> bool, got {type(compare).__name__}")
        self.compare = compare

    def __call__(self, response_text: str, reference: str, *, metadata: Mapping[str, Any]) -> float:
        if "finished" not in metadata:
            raise KeyError("BoxedMatchVerifier: metadata['finished'] (did the response end with "
                           "EOS?) is required; score_responses sets it")
        if not metadata["finished"]:
            return 0.0
        predicted = extract_boxed(response_text)
        if predicted is None:
            return 0.0
        try:
            return 1.0 if self.compare(predicted, reference) else 0.0
        except VerificationTimeout:
            return 0.0


boxed_match = BoxedMatchVerifier()
"""The default reward function: BoxedMatchVerifier with exact_match."""
