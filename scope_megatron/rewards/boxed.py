r"""Extraction of the final `\boxed{...}` answer from a response."""
from __future__ import annotations

import re
from typing import Optional

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> Optional[str]:
    r"""The content of the LAST `\boxed{...}` in `text`, or None.

    - Only the last occurrence of `\boxed{` counts (whitespace before `{` allowed). If its braces
      never balance (a truncated or malformed final answer) the result is None, even when an
      earlier box is well formed: a broken final answer is no answer (as verl's
      last_boxed_only_string).
    - Nested braces are kept: `\boxed{\frac{1}{2}}` -> `\frac{1}{2}`; escaped braces `\{`, `\}`
      do not count towards the balance. `\boxed{}` -> "" (an empty answer).
    - EOS: this function sees text only. The caller passes the response decoded up to its first
      EOS (scope_megatron.rewards.score_responses does that), so anything generated after EOS
      cannot supply an answer.
    """
    opening = None
    for opening in _BOXED_OPEN.finditer(text):
        pass
    if opening is None:
        return None
    depth, i = 1, opening.end()
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character, e.g. \{ or \}
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[opening.end():i]
        i += 1
    return None
