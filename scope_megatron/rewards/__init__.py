r"""Rewards: the verifier that grades sampled responses (0/1 by the final `\boxed{}` answer).

  extract_boxed(text) -> str | None          last `\boxed{...}` with balanced braces
  normalize_answer, exact_match              answer normalization and the default comparison
  BoxedMatchVerifier(compare=exact_match)    reward function; `compare` is the extension point
  boxed_match                                the default reward function (exact match)
  VerificationTimeout                        raised by a time-limited comparator -> reward 0
  load_reward_fn("module:function")          pluggable reward functions (signature in reward_fn)
  math_verify_match, math_equal,             math equivalence with math-verify, a hard time limit
    MathVerifyComparator, WorkerCrashed      per answer in worker processes (rewards.math_verify;
                                             imported on first use: needs `pip install math-verify`)
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

_MATH_VERIFY_NAMES = ("math_verify_match", "math_equal", "MathVerifyComparator", "WorkerCrashed")


def __getattr__(name):
    # Lazy: importing scope_megatron.rewards must not need the optional math-verify package;
    # using one of these names without it raises ImportError saying how to install it.
    if name in _MATH_VERIFY_NAMES:
        from . import math_verify
        return getattr(math_verify, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
