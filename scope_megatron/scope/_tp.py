"""The tensor-parallel group of the loss and the two collectives the top-k estimator needs.

The group is resolved exactly as the ops resolve it (explicit tp_group, else Megatron's
tensor-model-parallel group when initialized, else none), so both always agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

# Shared with the ops on purpose: a different default group here would be a silent TP bug.
from scope_megatron.ops import default_tp_group
from scope_megatron.ops._checks import resolve_vocab_size


@dataclass(frozen=True)
class TensorParallel:
    group: Optional[dist.ProcessGroup]
    rank: int
    world_size: int

    def true_vocab(self, op: str, vocab_size: Optional[int], local_vocab: int) -> int:
        """The true vocabulary size for shards of local_vocab columns, validated as the ops
        validate it (None: local_vocab * world_size, no padding; ValueError naming op if it is
        <= 0 or beyond the sharded vocabulary)."""
        return resolve_vocab_size(op, vocab_size, local_vocab * self.world_size, local_vocab,
                                  self.world_size)


def resolve_tp(tp_group: Optional[dist.ProcessGroup]) -> TensorParallel:
    group = tp_group if tp_group is not None else default_tp_group()
    if group is None:
        return TensorParallel(None, 0, 1)
    if not dist.is_initialized():
        raise RuntimeError("compute_loss: a tp_group was given but torch.distributed is not "
                           "initialized; call torch.distributed.init_process_group first or pass "
                           "tp_group=None for a single shard")
    return TensorParallel(group, dist.get_rank(group), dist.get_world_size(group))


class _SumOverRanks(torch.autograd.Function):
    """Forward: sum over the TP group. Backward: identity, because everything downstream is
    replicated on every rank (Megatron's reduce_from_tensor_model_parallel_region); an
    all-reduce in backward would multiply the gradients by the TP size."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_ranks(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Differentiable sum of per-rank partial tensors (each rank holds the entries it owns and
    zeros elsewhere); the result is replicated."""
    return x if tp.world_size == 1 else _SumOverRanks.apply(x, tp.group)


def gather_ranks(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """[...] per rank -> [world_size, ...], identical on every rank; no gradient."""
    if tp.world_size == 1:
        return x.unsqueeze(0)
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.stack(parts)
