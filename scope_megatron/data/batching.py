"""Token-id lists to the padded tensors a rollout engine or an SFT step consumes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class PromptBatch:
    """N prompt rows, padded to a common length P.

    prompt_ids: [N, P] int64; padding positions hold pad_id.
    prompt_mask: [N, P] bool, True at prompt tokens.
    prompt_lengths: [N] int64, prompt tokens per row.
    group_ids: [N] int64, the index of the source prompt of each row (0..B-1). Rows of one group
      are contiguous, so a batch from repeat_for_groups(G) has group_ids [0]*G + [1]*G + ...,
      the layout scope_megatron.scope.RolloutBatch expects.
    padding_side: "left" (prompts end at column P-1, generation continues from there) or "right".
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    group_ids: torch.Tensor
    padding_side: str

    @property
    def num_rows(self) -> int:
        return self.prompt_ids.shape[0]

    def repeat_for_groups(self, rollouts_per_prompt: int) -> "PromptBatch":
        """Each row repeated rollouts_per_prompt (G) times in place: N rows -> N*G rows, the G
        copies of a prompt adjacent and sharing its group id."""
        if not isinstance(rollouts_per_prompt, int) or rollouts_per_prompt < 1:
            raise ValueError(f"rollouts_per_prompt must be a positive integer, got "
                             f"{rollouts_per_prompt!r}")
        g = rollouts_per_prompt
        return PromptBatch(self.prompt_ids.repeat_interleave(g, 0),
                           self.prompt_mask.repeat_interleave(g, 0),
                           self.prompt_lengths.repeat_interleave(g, 0),
                           self.group_ids.repeat_interleave(g, 0), self.padding_side)


def make_prompt_batch(prompts: Sequence[Sequence[int]], *, pad_id: int, padding_side: str = "left",
                      device: Optional[torch.device | str] = None) -> PromptBatch:
    """Pad B prompts (lists of token ids, each non-empty) into a PromptBatch with group_ids 0..B-1.

    All toy-task prompts have the same length, so they come out unpadded (prompt_mask all True)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(prompts) == 0:
        raise ValueError("make_prompt_batch: no prompts")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"make_prompt_batch: prompt {lengths.index(0)} is empty")
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        cols = slice(width - len(p), width) if padding_side == "left" else slice(0, len(p))
        ids[row, cols] = torch.as_tensor(list(p), dtype=torch.int64)
        mask[row, cols] = True
    return PromptBatch(ids.to(device), mask.to(device),
                       torch.tensor(lengths, dtype=torch.int64, device=device),
                       torch.arange(len(prompts), dtype=torch.int64, device=device), padding_side)


@dataclass(frozen=True)
class SFTBatch:
    """tokens [B, T] int64: prompt + response, right-padded with pad_id.
    response_mask [B, T] bool: True at response tokens (the supervised targets).
    With next-token prediction (logits at t predict token t+1) the loss is taken over
    targets tokens[:, 1:] where response_mask[:, 1:] is True."""

    tokens: torch.Tensor
    response_mask: torch.Tensor


def make_sft_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
                   pad_id: int, device: Optional[torch.device | str] = None) -> SFTBatch:
    """Concatenate each prompt with its response (e.g. ToyArithmetic.prompt_ids / solution_ids)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"make_sft_batch needs as many responses as prompts (> 0), got "
                         f"{len(prompts)} prompts and {len(responses)} responses")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        if not r:
            raise ValueError(f"make_sft_batch: response {row} is empty (it needs at least <eos>)")
        tokens[row, :len(p) + len(r)] = torch.as_tensor(list(p) + list(r), dtype=torch.int64)
        mask[row, len(p):len(p) + len(r)] = True
    return SFTBatch(tokens.to(device), mask.to(device))
