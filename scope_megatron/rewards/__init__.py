r"""Rewards: the verifier that grades sampled responses (0/1 by the final `\boxed{}` answer).

  extract_boxed(text) -> str | None          last `\boxed{...}` with balanced braces
  normalize_answer, exact_match              answer normalization and the default comparison
  BoxedMatchVerifier(compare=exact_match)    reward function; `compare` is the extension point
  boxed_match                                the default reward function (exact match)
  VerificationTimeout                        raised by a time-limited comparator -> reward 0
  load_reward_fn("module:function")          pluggable reward functions (signature in reward_fn)
  split_at_eos, score_responses -> Scores    token ids -> rewards / correct / finished per response
"""
from .boxed import extract_boxed
from .reward_fn import DEFAULT_REWARD_FN, RewardFn, load_reward_fn
from .scoring import Scores, score_responses, split_at_eos
from .verifier import (BoxedMatchVerifier, Comparator, VerificationTimeout, boxed_match,
                       exact_match, normalize_answer)

__all__ = [
    "extract_boxed",
    "normalize_answer", "exact_match", "Comparator", "VerificationTimeout",
    "BoxedMatchVerifier", "boxed_match",
    "RewardFn", "DEFAULT_REWARD_FN", "load_reward_fn",
    "split_at_eos", "Scores", "score_responses",
]
