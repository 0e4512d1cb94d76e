"""RolloutBatch: one batch of rollouts (prompt groups of sampled responses), validated on
construction, plus the per-rollout reductions the losses need."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from scope_megatron.ops import sequence_perplexity

# A log-prob is <= 0; a small positive value can only be rounding, a larger one a broken
# computation (e.g. a fused log-softmax in bf16) that would otherwise turn into a wrong reward.
LOGPROB_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class RolloutBatch:
    """A batch of B rollouts: for each prompt group, the student's sampled responses.

    Response layout (tokens are the response only: prompt tokens excluded, EOS included):
      padded: response_ids [B, L]; response_mask [B, L] bool (True = a response token that
        counts; padding False), required.
      packed: response_ids [N] holding the B responses back to back; cu_seqlens [B + 1] integer
        offsets with cu_seqlens[0] = 0 and cu_seqlens[-1] = N (response b = tokens
        cu_seqlens[b]:cu_seqlens[b + 1]); response_mask [N] bool optional (None = all count).
    Per-token tensors below have the shape of response_ids.

    Fields:
      response_ids: integer token ids; counted tokens must be >= 0 (ids of uncounted positions are
        never read).
      group_ids: [B] integer prompt-group id of each rollout, 0..G-1, every id with >= 1 rollout
        (re-index arbitrary ids with torch.unique(ids, return_inverse=True)[1]). A group's
        rollouts must all be in this batch: weights are normalized within it.
      correct: [B] bool verifier outcome (True = correct, r_i = 1).
      old_logprobs: float, the rollout engine's log-probs of the sampled tokens, computed at
        ScopeConfig.student_temperature.
      teacher_logprobs: optional float, the teacher's log-probs of the sampled tokens (a remote
        teacher), computed at the teacher temperature.
      has_teacher_logprobs: optional [B] bool, which rollouts carry teacher log-probs (None = all
        of them when teacher_logprobs is given); the other rows are never read.
      teacher_top_ids, teacher_top_logprobs: optional, both or neither: a served teacher's k most
        likely ids at each response position and their log-probs (the response_ids shape plus a
        trailing k), for kl_estimator="topk" without teacher logits; read where
        has_teacher_logprobs holds.
      prompt_ids: optional prompt token ids, padded [B, P] with prompt_mask [B, P] bool, or packed
        [M] with prompt_cu_seqlens [B + 1] (prompt_mask [M] optional). Carried for the trainer
        that builds the model input; the loss does not read them.
      allow_empty_responses: False (default) makes a response with no counted token an error.
        True keeps such rollouts in their group (they count for GRPO's reward statistics) but on
        no path: they have no tokens, hence no loss, perplexity or weight.

    Validation (on construction) raises ValueError / TypeError naming the offending rollout (and
    token position) and FloatingPointError for non-finite log-probs.

    Derived attributes: num_rollouts, num_groups, lengths ([B] counted tokens), nonempty ([B]
    bool), token_rollout (rollout index of every token position), safe_response_ids (ids with
    uncounted positions set to 0, a valid target for the ops), packed (bool).
    """

    response_ids: torch.Tensor
    group_ids: torch.Tensor
    correct: torch.Tensor
    old_logprobs: torch.Tensor
    response_mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    teacher_logprobs: Optional[torch.Tensor] = None
    has_teacher_logprobs: Optional[torch.Tensor] = None
    teacher_top_ids: Optional[torch.Tensor] = None
    teacher_top_logprobs: Optional[torch.Tensor] = None
    prompt_ids: Optional[torch.Tensor] = None
    prompt_mask: Optional[torch.Tensor] = None
    prompt_cu_seqlens: Optional[torch.Tensor] = None
    allow_empty_responses: bool = False

    num_rollouts: int = field(init=False)
    num_groups: int = field(init=False)
    lengths: torch.Tensor = field(init=False)
    nonempty: torch.Tensor = field(init=False)
    token_rollout: torch.Tensor = field(init=False)
    safe_response_ids: torch.Tensor = field(init=False)

    def __post_init__(self):
        ids = self.response_ids
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"RolloutBatch.response_ids must be an integer tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        device = ids.device
        if self.cu_seqlens is None:
            self._init_padded()
        else:
            self._init_packed()
        b = self.num_rollouts
        self._set("nonempty", self.lengths > 0)
        self._set("safe_response_ids", torch.where(self.response_mask, ids, torch.zeros_like(ids)))

        _check_vector("group_ids", self.group_ids, b, integer=True, device=device)
        _check_vector("correct", self.correct, b, integer=False, device=device)
        self._init_groups()

        empty = torch.nonzero(~self.nonempty).flatten()
        if empty.numel() and not self.allow_empty_responses:
            r = int(empty[0])
            raise ValueError(
                f"RolloutBatch: rollout {r} (group {int(self.group_ids[r])}) has an empty response "
                f"(no counted token; {empty.numel()} such rollouts). A response needs at least "
                "its EOS token: fix the response_mask / cu_seqlens, drop the rollout, or pass "
                "allow_empty_responses=True to keep it on no path.")

        bad = torch.nonzero((self.response_mask & (ids < 0)).flatten()).flatten()
        if bad.numel():
            idx = int(bad[0])
            raise ValueError(f"RolloutBatch.response_ids: {self.describe_token(idx)} is a counted "
                             f"token with a negative id {int(ids.flatten()[idx])}; give padding "
                             "positions response_mask=False instead of an ignore id")

        self._check_logprobs("old_logprobs", self.old_logprobs, None)
        if self.teacher_logprobs is None:
            if self.has_teacher_logprobs is not None:
                raise ValueError("RolloutBatch.has_teacher_logprobs was given without "
                                 "teacher_logprobs")
        else:
            if self.has_teacher_logprobs is None:
                self._set("has_teacher_logprobs", torch.ones(b, dtype=torch.bool, device=device))
            _check_vector("has_teacher_logprobs", self.has_teacher_logprobs, b, integer=False,
                          device=device)
            self._check_logprobs("teacher_logprobs", self.teacher_logprobs,
                                 self.has_teacher_logprobs)
        self._check_teacher_top()
        self._check_prompts()

    def _check_teacher_top(self):
        ids, lps = self.teacher_top_ids, self.teacher_top_logprobs
        if ids is None and lps is None:
            return
        if ids is None or lps is None:
            raise ValueError("RolloutBatch: teacher_top_ids and teacher_top_logprobs go together; got one")
        if self.teacher_logprobs is None:
            raise ValueError("RolloutBatch: teacher_top_ids need teacher_logprobs (the sampled tokens' "
                             "log-probs from the same teacher)")
        want = tuple(self.response_ids.shape)
        if ids.dim() != len(want) + 1 or tuple(ids.shape[:-1]) != want or ids.shape[-1] < 1 \
                or lps.shape != ids.shape:
            raise ValueError(f"RolloutBatch: teacher_top_ids {tuple(ids.shape)} and teacher_top_logprobs "
                             f"{tuple(lps.shape)} must both be response_ids' shape {want} plus a trailing k >= 1")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"RolloutBatch.teacher_top_ids must be integer ids, got {ids.dtype}")
        if not lps.dtype.is_floating_point:
            raise TypeError(f"RolloutBatch.teacher_top_logprobs must be floating point, got {lps.dtype}")
        rows = self.response_mask & self.has_teacher_logprobs[self.token_rollout]
        top_lp = lps[rows]
        if bool((ids[rows] < 0).any()):
            raise ValueError("RolloutBatch.teacher_top_ids holds a negative id at a counted token")
        if not bool(torch.isfinite(top_lp).all()) or bool((top_lp > 0).any()):
            raise FloatingPointError("RolloutBatch.teacher_top_logprobs must be finite log-probs <= 0 at "
                                     "every counted token of the rollouts that carry them")

    # ---- layouts -----------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def _init_padded(self):
        ids = self.response_ids
        if ids.dim() != 2:
            raise ValueError(f"RolloutBatch.response_ids must be [B, L] (padded) or [N] with "
                             f"cu_seqlens (packed), got shape {tuple(ids.shape)}")
        if self.response_mask is None:
            raise ValueError("RolloutBatch.response_mask is required for a padded batch "
                             "([B, L] bool, True = counted response token)")
        _check_mask("response_mask", self.response_mask, ids)
        b, length = ids.shape
        if b == 0:
            raise ValueError("RolloutBatch: the batch has no rollouts")
        self._set("num_rollouts", b)
        self._set("lengths", self.response_mask.sum(-1))
        self._set("token_rollout",
                  torch.arange(b, device=ids.device).unsqueeze(1).expand(b, length))

    def _init_packed(self):
        ids, cu = self.response_ids, self.cu_seqlens
        if ids.dim() != 1:
            raise ValueError(f"RolloutBatch: a packed batch (cu_seqlens given) needs 1-D "
                             f"response_ids [N], got shape {tuple(ids.shape)}")
        offsets = _check_offsets("cu_seqlens", cu, ids.numel(), ids.device)
        if self.response_mask is None:
            self._set("response_mask", torch.ones_like(ids, dtype=torch.bool))
        _check_mask("response_mask", self.response_mask, ids)
        b = offsets.numel() - 1
        self._set("num_rollouts", b)
        self._set("cu_seqlens", offsets)
        seq_len = offsets[1:] - offsets[:-1]
        token_rollout = torch.repeat_interleave(torch.arange(b, device=ids.device), seq_len)
        self._set("token_rollout", token_rollout)
        counts = torch.zeros(b, dtype=torch.int64, device=ids.device)
        self._set("lengths", counts.index_add(0, token_rollout, self.response_mask.to(torch.int64)))

    def _init_groups(self):
        gids = self.group_ids
        if bool((gids < 0).any()):
            r = int(torch.nonzero(gids < 0)[0])
            raise ValueError(f"RolloutBatch.group_ids: rollout {r} has negative group id "
                             f"{int(gids[r])}; group ids must be 0..G-1")
        num_groups = int(gids.max()) + 1
        sizes = torch.bincount(gids.to(torch.int64), minlength=num_groups)
        missing = torch.nonzero(sizes == 0).flatten()
        if missing.numel():
            raise ValueError(
                f"RolloutBatch.group_ids: group {int(missing[0])} has no rollout (group ids must "
                f"be 0..G-1 with at least one rollout each; ids present: 0..{num_groups - 1} "
                f"minus {missing.tolist()[:8]}). Re-index with "
                "torch.unique(group_ids, return_inverse=True)[1].")
        self._set("num_groups", num_groups)

    def _check_logprobs(self, name, values, rows):
        ids = self.response_ids
        if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point:
            raise TypeError(f"RolloutBatch.{name} must be a floating-point tensor, got "
                            f"{getattr(values, 'dtype', type(values).__name__)}")
        if values.shape != ids.shape:
            raise ValueError(f"RolloutBatch.{name} has shape {tuple(values.shape)} but "
                             f"response_ids has {tuple(ids.shape)}; they must agree token by token")
        if values.device != ids.device:
            raise ValueError(f"RolloutBatch.{name} is on {values.device}, response_ids on "
                             f"{ids.device}; put the batch on one device")
        counted = self.response_mask if rows is None else self.response_mask & rows[self.token_rollout]
        nonfinite = (counted & ~torch.isfinite(values)).flatten()
        if bool(nonfinite.any()):
            idx = int(torch.nonzero(nonfinite)[0])
            raise FloatingPointError(
                f"RolloutBatch.{name}: {self.describe_token(idx)} has log-prob "
                f"{float(values.flatten()[idx])} ({int(nonfinite.sum())} non-finite counted tokens "
                "in all). Log-probs of sampled tokens must be finite: check the engine's output and "
                "temperature, and that padding positions have response_mask=False.")
        positive = (counted & (values > LOGPROB_TOLERANCE)).flatten()
        if bool(positive.any()):
            idx = int(torch.nonzero(positive)[0])
            raise ValueError(
                f"RolloutBatch.{name}: {self.describe_token(idx)} has log-prob "
                f"{float(values.flatten()[idx]):.6g} > 0; a log-probability is <= 0, so these "
                "were computed wrongly (e.g. log-softmax accumulated in bf16).")

    def _check_prompts(self):
        if self.prompt_ids is None:
            if self.prompt_mask is not None or self.prompt_cu_seqlens is not None:
                raise ValueError("RolloutBatch: prompt_mask / prompt_cu_seqlens given without "
                                 "prompt_ids")
            return
        p = self.prompt_ids
        if not isinstance(p, torch.Tensor) or p.dtype.is_floating_point or p.dtype == torch.bool:
            raise TypeError(f"RolloutBatch.prompt_ids must be an integer tensor, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
        b = self.num_rollouts
        if self.prompt_cu_seqlens is None:
            if p.dim() != 2 or p.shape[0] != b:
                raise ValueError(f"RolloutBatch.prompt_ids must be [B={b}, P] (padded) or [M] with "
                                 f"prompt_cu_seqlens, got shape {tuple(p.shape)}")
            if self.prompt_mask is None:
                raise ValueError("RolloutBatch.prompt_mask ([B, P] bool) is required with padded "
                                 "prompt_ids")
            _check_mask("prompt_mask", self.prompt_mask, p)
            counts = self.prompt_mask.sum(-1)
        else:
            if p.dim() != 1:
                raise ValueError(f"RolloutBatch: packed prompt_ids must be 1-D [M], got shape "
                                 f"{tuple(p.shape)}")
            offsets = _check_offsets("prompt_cu_seqlens", self.prompt_cu_seqlens, p.numel(), p.device)
            if offsets.numel() - 1 != b:
                raise ValueError(f"RolloutBatch.prompt_cu_seqlens describes {offsets.numel() - 1} "
                                 f"prompts but the batch has {b} rollouts (one prompt per rollout)")
            self._set("prompt_cu_seqlens", offsets)
            mask = self.prompt_mask
            if mask is not None:
                _check_mask("prompt_mask", mask, p)
            owner = torch.repeat_interleave(torch.arange(b, device=p.device), offsets[1:] - offsets[:-1])
            weight = torch.ones_like(owner) if mask is None else mask.to(torch.int64)
            counts = torch.zeros(b, dtype=torch.int64, device=p.device).index_add(0, owner, weight)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            raise ValueError(f"RolloutBatch: rollout {int(empty[0])} has an empty prompt "
                             "(no counted prompt token)")

    def describe_token(self, flat_index: int) -> str:
        """'rollout r (group g, correct|incorrect), response token t' for a flattened token index
        (for error messages)."""
        if self.packed:
            r = int(self.token_rollout[flat_index])
            t = flat_index - int(self.cu_seqlens[r])
        else:
            r, t = divmod(flat_index, self.response_ids.shape[1])
        kind = "correct" if bool(self.correct[r]) else "incorrect"
        return f"rollout {r} (group {int(self.group_ids[r])}, {kind}), response token {t}"

    # ---- per-rollout reductions --------------------------------------------------------------

    def per_token(self, per_rollout: torch.Tensor) -> torch.Tensor:
        """[B] -> a tensor shaped like response_ids holding each token's rollout value."""
        return per_rollout[self.token_rollout]

    def counted(self, rollouts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The counted tokens (response_mask), restricted to the [B] bool `rollouts` if given."""
        return self.response_mask if rollouts is None else self.response_mask & rollouts[self.token_rollout]

    def token_mean(self, values: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-rollout mean over the counted tokens of `values` (shaped like response_ids):
        [B], differentiable. `tokens` (bool, same shape) restricts the counted tokens; a rollout
        with none gets 0. Uncounted positions are never read (NaN there does not propagate)."""
        tokens = self.response_mask if tokens is None else tokens
        masked = torch.where(tokens, values, torch.zeros((), dtype=values.dtype, device=values.device))
        if self.packed:
            sums = masked.new_zeros(self.num_rollouts).index_add(0, self.token_rollout, masked)
            counts = torch.zeros(self.num_rollouts, dtype=torch.int64, device=values.device)
            counts = counts.index_add(0, self.token_rollout, tokens.to(torch.int64))
        else:
            sums, counts = masked.sum(-1), tokens.sum(-1)
        return sums / counts.clamp(min=1).to(values.dtype)

    def log_perplexity(self, token_logprobs: torch.Tensor) -> torch.Tensor:
        """log PPL = -(1/|y|) sum_t log pi(y_t) per rollout over its counted tokens, via the
        sequence_perplexity op: [B], differentiable (it is also the token-mean NLL). Empty
        rollouts (allowed only with allow_empty_responses) get 0 and must be kept off the paths.
        Uncounted positions are never read."""
        lp = torch.where(self.response_mask, token_logprobs,
                         torch.zeros((), dtype=token_logprobs.dtype, device=token_logprobs.device))
        if bool(self.nonempty.all()):
            if self.packed:
                return sequence_perplexity(lp, self.response_mask, cu_seqlens=self.cu_seqlens)
            return sequence_perplexity(lp, self.response_mask)
        keep = torch.nonzero(self.nonempty).flatten()
        if keep.numel() == 0:
            return lp.new_zeros(self.num_rollouts) + 0 * lp.sum()
        if self.packed:
            # Drop the end offset of each empty rollout: its (uncounted) tokens join the next
            # non-empty segment, trailing ones fall outside the last; no counted token moves.
            offsets = torch.cat([self.cu_seqlens[:1], self.cu_seqlens[1:][self.nonempty]])
            values = sequence_perplexity(lp, self.response_mask, cu_seqlens=offsets)
        else:
            values = sequence_perplexity(lp[keep], self.response_mask[keep])
        return lp.new_zeros(self.num_rollouts).index_put((keep,), values)


def _check_vector(name, value, b, *, integer, device):
    want = "an integer" if integer else "a bool"
    ok = isinstance(value, torch.Tensor) and (
        (integer and not value.dtype.is_floating_point and value.dtype != torch.bool)
        or (not integer and value.dtype == torch.bool))
    if not ok:
        hint = "" if integer else " (convert with .bool(); for rewards use reward > 0)"
        raise TypeError(f"RolloutBatch.{name} must be {want} tensor of shape [{b}], got "
                        f"{getattr(value, 'dtype', type(value).__name__)}{hint}")
    if tuple(value.shape) != (b,):
        raise ValueError(f"RolloutBatch.{name} has shape {tuple(value.shape)} but the batch has "
                         f"{b} rollouts; it needs one entry per rollout")
    if value.device != device:
        raise ValueError(f"RolloutBatch.{name} is on {value.device}, response_ids on {device}; "
                         "put the batch on one device")


def _check_mask(name, mask, like):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"RolloutBatch.{name} must be a bool tensor (True = counted), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}; convert with .bool()")
    if mask.shape != like.shape:
        raise ValueError(f"RolloutBatch.{name} has shape {tuple(mask.shape)} but the ids have "
                         f"{tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"RolloutBatch.{name} is on {mask.device}, the ids on {like.device}")


def _check_offsets(name, offsets, total, device):
    if (not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 2
            or offsets.dtype.is_floating_point or offsets.dtype == torch.bool):
        raise ValueError(f"RolloutBatch.{name} must be a 1-D integer tensor [B + 1] with B >= 1, "
                         f"got {getattr(offsets, 'dtype', type(offsets).__name__)} "
                         f"{tuple(getattr(offsets, 'shape', ()))}")
    offsets = offsets.to(device=device, dtype=torch.int64)
    host = offsets.cpu()
    dec = torch.nonzero(host[1:] < host[:-1]).flatten()
    if dec.numel():
        raise ValueError(f"RolloutBatch.{name} decreases at rollout {int(dec[0])} "
                         f"({host.tolist()[:16]}); offsets must be non-decreasing")
    if int(host[0]) != 0 or int(host[-1]) != total:
        raise ValueError(f"RolloutBatch.{name} must start at 0 and end at the number of packed "
                         f"tokens ({total}), got {int(host[0])}..{int(host[-1])}")
    return offsets
