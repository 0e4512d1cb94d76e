"""Input validation shared by the ops: every message names the problem and the fix."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._library import (FLAG_NONFINITE_FIRST, FLAG_NONFINITE_SECOND, FLAG_SHARD_LAYOUT,
                       FLAG_TARGET_OUT_OF_RANGE)

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_logits(op: str, name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, bfloat16, float16 or float64, got {logits.dtype}"
        )
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"{op}: {name} must have shape [..., vocab_shard] with a non-empty last dimension, "
            f"got {tuple(logits.shape)}"
        )


def check_temperature(op: str, name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return value


def resolve_vocab_size(op: str, vocab_size: Optional[int], padded_vocab: int, local_vocab: int,
                       world_size: int) -> int:
    """The true vocabulary size; None means no padding (the whole sharded vocabulary)."""
    if vocab_size is None:
        return padded_vocab
    vocab_size = int(vocab_size)
    if vocab_size <= 0:
        raise ValueError(f"{op}: vocab_size must be > 0, got {vocab_size}")
    if vocab_size > padded_vocab:
        raise ValueError(
            f"{op}: vocab_size={vocab_size} is larger than the sharded vocabulary "
            f"{padded_vocab} (= {world_size} tensor-parallel ranks x {local_vocab} columns per "
            "shard). Pass the true (unpadded) vocabulary size, and the local shard of the "
            "logits, not the gathered ones."
        )
    return vocab_size


def flatten_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [rows, V] view (a copy only if the layout requires it)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]:
        # Broadcast rows (e.g. one teacher distribution expanded over the tokens): the kernels
        # take a single row stride with rows that do not overlap.
        rows = rows.contiguous()
    return rows


def flat_vector(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-token values [...] (an upstream gradient, expected_grad, target ids) as the contiguous
    [rows] of `dtype` the kernels take (no copy when they already are)."""
    return values.to(dtype).reshape(-1).contiguous()


def raise_on_flags(op: str, flags: torch.Tensor, names: dict, *, target: Optional[torch.Tensor] = None,
                   vocab_size: Optional[int] = None) -> None:
    """Turns the kernels' per-row error flags into one clear exception. The flags are combined
    across shards before this check, so every tensor-parallel rank raises the same error (none
    is left waiting in a collective).

    names: {FLAG_NONFINITE_FIRST: "logits", ...} naming the inputs for the messages.
    """
    if flags.numel() == 0 or int(flags.amax()) == 0:  # one reduction, one sync
        return
    flags = flags.cpu()
    rows = flags.numel()

    def first(bit):
        bad = torch.nonzero(flags & bit).flatten()
        return bad.numel(), int(bad[0]) if bad.numel() else -1

    count, idx = first(FLAG_TARGET_OUT_OF_RANGE)
    if count:
        value = int(target.reshape(-1)[idx]) if target is not None else "?"
        raise ValueError(
            f"{op}: target ids must be in [0, vocab_size={vocab_size}); {count} of {rows} tokens "
            f"are outside it (first: flattened token {idx}, target {value}). Replace padding / "
            "ignore ids by a valid id and mask those tokens' results instead."
        )
    for bit in (FLAG_NONFINITE_FIRST, FLAG_NONFINITE_SECOND):
        count, idx = first(bit)
        if count:
            raise FloatingPointError(
                f"{op}: {names.get(bit, 'inputs')} contain NaN or Inf in {count} of {rows} tokens "
                f"(first: flattened token {idx}). The op refuses to return a NaN loss: check the "
                "model's forward pass (overflow in fp16/bf16, a diverged run, a bad checkpoint) and "
                "do not mask logits with -inf (mask the result instead)."
            )
    count, idx = first(FLAG_SHARD_LAYOUT)
    if count:
        raise ValueError(
            f"{op}: the target of flattened token {idx} is owned by no vocabulary shard or by "
            "several: every rank of the tensor-parallel group must pass its own equal-sized shard "
            "(rank r holds ids [r * V_local, (r + 1) * V_local)), as Megatron partitions them."
        )
    raise RuntimeError(f"{op}: kernel reported unknown error flags {int(flags.max())}")


ERROR_CHECKS = ("forward", "backward")


def defers_error_check(op: str, error_check: str, logits: torch.Tensor) -> bool:
    """Validates error_check; True when the check moves to backward: "backward" and the result
    will be differentiated (grad enabled, logits requiring grad), else there is no backward to
    raise in and the forward checks."""
    if error_check not in ERROR_CHECKS:
        raise ValueError(f"{op}: error_check must be one of {ERROR_CHECKS}, got {error_check!r}")
    return error_check == "backward" and torch.is_grad_enabled() and logits.requires_grad


class HostScalar:
    """A 0-d device tensor's value for the host without a sync: on CUDA it is copied into pinned
    host memory behind an event (value() waits for that event alone, not for the work queued
    after it); on the CPU it is read at once."""

    def __init__(self, value: torch.Tensor):
        self.event = None
        if value.is_cuda:
            self.host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(value.device))  # the stream of the copy
        else:
            self.host = int(value)

    def value(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.host)


class DeferredFlagCheck:
    """The kernels' per-row error flags of one forward, to be checked in backward: the forward
    queues the largest flag's way to the host (HostScalar); check() in backward waits for it
    alone (the forward's kernels finished long before; the backward kernel just queued keeps
    running) and raises the error the forward would have raised."""

    def __init__(self, op: str, flags: torch.Tensor, names: dict, *, target: Optional[torch.Tensor] = None,
                 vocab_size: Optional[int] = None):
        self.op, self.flags, self.names, self.target, self.vocab_size = op, flags, names, target, vocab_size
        self.largest = HostScalar(flags.amax()) if flags.numel() else None

    def check(self) -> None:
        """Raises the op's error if any row was flagged (waits for the flags only)."""
        if self.largest is not None and self.largest.value() != 0:
            raise_on_flags(self.op, self.flags, self.names, target=self.target,
                           vocab_size=self.vocab_size)


def check_flags(op: str, flags: torch.Tensor, names: dict, *, deferred: bool,
                target: Optional[torch.Tensor] = None,
                vocab_size: Optional[int] = None) -> Optional[DeferredFlagCheck]:
    """The forward's error check: raises now (waiting for the device), or, deferred, returns the
    check for backward to run (the kernels already wrote NaN for the flagged tokens' results)."""
    if not deferred:
        raise_on_flags(op, flags, names, target=target, vocab_size=vocab_size)
        return None
    return DeferredFlagCheck(op, flags, names, target=target, vocab_size=vocab_size)


def check_same_placement(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {a_name} is on {a.device} but {b_name} is on {b.device}; move "
                         "both to the same device")
