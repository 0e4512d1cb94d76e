"""Small collectives shared by the packages (torch.distributed only, no Megatron)."""
from __future__ import annotations

from typing import Any, Callable, Type

import torch.distributed as dist


def result_from_source(fn: Callable[[], Any], *, is_source: bool, group=None,
                       error_cls: Type[Exception] = RuntimeError, what: str = "the operation") -> Any:
    """fn() on the source rank (rank 0 of `group`; None: the default group) and its result on every
    rank of the group. If fn raised, the source re-raises that error and the other ranks raise
    error_cls quoting it, instead of waiting in their next collective for a rank that left."""
    outcome, error = [None], None
    if is_source:
        try:
            outcome[0] = ("ok", fn())
        except Exception as exc:  # re-raised below, after the other ranks heard of it
            error, outcome[0] = exc, ("error", f"{type(exc).__name__}: {exc}")
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(outcome, src=src, group=group)
    status, value = outcome[0]
    if status == "error":
        if error is not None:
            raise error
        raise error_cls(f"{what} failed on rank {src}: {value}")
    return value
