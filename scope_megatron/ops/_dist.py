"""Tensor-parallel plumbing of the vocab-parallel ops: which process group, which shard, and
the one collective each op needs (an all-gather of O(tokens) per-token statistics)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's vocabulary shard sits: Megatron's equal partition."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world_size: int
    local_vocab: int

    @property
    def vocab_start(self) -> int:
        return self.rank * self.local_vocab

    @property
    def padded_vocab(self) -> int:
        return self.world_size * self.local_vocab


# torch >= 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def default_tp_group() -> Optional[dist.ProcessGroup]:
    """Megatron's tensor-model-parallel group when Megatron's parallel state is initialized,
    else None (no tensor parallelism). Megatron is not imported here: if the caller never
    imported it, its parallel state cannot be initialized."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def shard_info(tp_group: Optional[dist.ProcessGroup], local_vocab: int, op: str) -> ShardInfo:
    group = tp_group if tp_group is not None else default_tp_group()
    if group is None:
        return ShardInfo(None, 0, 1, local_vocab)
    if not dist.is_initialized():
        raise RuntimeError(
            f"{op}: a tp_group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first or pass tp_group=None for a single shard"
        )
    return ShardInfo(group, dist.get_rank(group), dist.get_world_size(group), local_vocab)


def gather_stats(stats: torch.Tensor, shard: ShardInfo) -> torch.Tensor:
    """[rows, width] per-rank statistics -> [world_size, rows, width], identical on every rank of
    the group. One collective per op phase (Megatron's fused cross-entropy likewise batches its
    per-token scalars into one communication)."""
    if shard.world_size == 1:
        return stats.unsqueeze(0)
    # Concatenated along dim 0 (the layout every backend accepts, gloo included), then viewed.
    out = stats.new_empty((shard.world_size * stats.shape[0], *stats.shape[1:]))
    _all_gather_single(out, stats.contiguous(), group=shard.group)
    return out.view(shard.world_size, *stats.shape)
