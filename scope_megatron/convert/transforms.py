"""Tensor transforms between Hugging Face and Megatron layouts (pure functions, no I/O).

Megatron's fused attention input projection `linear_qkv` is grouped by key/value head: for each
of the G query groups it holds the group's query heads, then its key head, then its value head,

    [G, (heads_per_group + 2) * head_dim, hidden]   flattened to   [G * (hpg + 2) * head_dim, hidden]

so that a tensor-parallel rank holds whole groups. Hugging Face keeps q_proj [heads * head_dim,
hidden], k_proj and v_proj [G * head_dim, hidden] apart. Biases follow the same row layout.
Megatron's SwiGLU `linear_fc1` is [gate; up] stacked along the rows.
"""
from __future__ import annotations

from typing import Tuple

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: int,
             head_dim: int) -> torch.Tensor:
    """HF q, k, v projections (weights [rows, hidden] or biases [rows]) -> Megatron's grouped
    linear_qkv. q has heads * head_dim rows, k and v groups * head_dim rows."""
    tail = q.shape[1:]
    q = q.reshape(groups, -1, *tail)
    k = k.reshape(groups, head_dim, *tail)
    v = v.reshape(groups, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, *, heads: int, groups: int,
              head_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`: Megatron's grouped linear_qkv -> contiguous HF q, k, v."""
    tail = qkv.shape[1:]
    per_group = heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate_proj, up_proj [ffn, hidden] -> Megatron's linear_fc1 [2 * ffn, hidden]."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_gate_up`."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def resize_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary table (embedding or output layer) with `rows` rows: row r is the input's row r
    where the input has one, zero beyond it (rows past `rows` are dropped)."""
    if table.shape[0] == rows:
        return table
    out = table.new_zeros((rows, *table.shape[1:]))
    keep = min(rows, table.shape[0])
    out[:keep] = table[:keep]
    return out
