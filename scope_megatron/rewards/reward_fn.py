"""Pluggable reward functions, named by import path "module:attribute".

Signature every reward function follows:

    reward_fn(response_text: str, reference: str, *, metadata: Mapping[str, Any]) -> float

  response_text  the response decoded up to (not including) its first EOS
  reference      the reference answer (str)
  metadata       metadata["finished"]: bool, True iff the response ended with EOS (False =
                 truncated; the default verifier scores it 0), plus whatever the caller attaches
                 per response (e.g. the problem); read-only
  returns        a real number in [0, 1]; 1 = correct (the rollout goes on SCOPE's MLE path)
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping, Protocol

DEFAULT_REWARD_FN = "scope_megatron.rewards.verifier:boxed_match"


class RewardFn(Protocol):
    def __call__(self, response_text: str, reference: str, *,
                 metadata: Mapping[str, Any]) -> float: ...


def load_reward_fn(spec: str = DEFAULT_REWARD_FN) -> RewardFn:
    """Import the reward function `spec` = "package.module:name" (name may be dotted, e.g.
    "mod:Class.method"). Raises ValueError for a malformed spec, ImportError when the module is
    missing or fails to import, AttributeError when the name is missing, TypeError when the
    object is not callable with the reward-function signature."""
    if not isinstance(spec, str) or spec.count(":") != 1 or "" in spec.split(":"):
        raise ValueError(f"reward function must be given as 'module:function' (e.g. "
                         f"'{DEFAULT_REWARD_FN}'), got {spec!r}")
    module_name, attr_path = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ImportError(f"reward function {spec!r}: module {module_name!r} not found "
                              f"(no module named {e.name!r}); install it or add its directory to "
                              "PYTHONPATH") from e
        raise ImportError(f"reward function {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:
        raise ImportError(f"reward function {spec!r}: importing {module_name!r} raised "
                          f"{type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward function {spec!r}: {module_name!r} has no attribute "
                                 f"{attr_path!r} (missing {part!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"reward function {spec!r} is a {type(obj).__name__}, not a callable")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have no signature: trust the caller
        return obj
    try:
        signature.bind("response", "reference", metadata={})
    except TypeError as e:
        raise TypeError(f"reward function {spec!r} has signature {signature}, which cannot be "
                        "called as reward_fn(response_text, reference, *, metadata); "
                        f"({e})") from None
    return obj
