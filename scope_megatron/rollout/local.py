"""LocalEngine: samples rollouts from the trainer's own model.

The engine holds the decoding loop (batching, stopping, bookkeeping, log-probs); the model side is
a small adapter, so that the same loop serves a plain PyTorch model in tests and the Megatron
student (tensor- and pipeline-parallel) in the trainer (scope_megatron.training).

Two decoding paths:
- incremental (KV cache), when the model offers it (IncrementalDecodingModel): the rows of
  prompts of one length advance in lockstep, one token per step, each step reusing the cached keys
  and values (O(length) per response); prompts of different lengths are decoded in one lockstep
  batch per length (with sampling keys derived from the call's key and the length);
- full recompute otherwise: every step runs the model on each active row's whole prefix
  (O(length^2) per response), which needs no cache and serves rows of different lengths.
Both draw the same noise for the same (seed, key), so they sample the same responses up to
floating-point rounding of the logits. Long-response training at scale samples with SGLang
(rollout/sglang) behind the same RolloutEngine interface.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Protocol, Sequence

import torch

from .sampling import sample_tokens
from .types import RolloutEngine, Rollouts, SamplingParams


class DecodingModel(Protocol):
    """What LocalEngine needs from a model.

    next_token_logits(tokens, last): tokens [N, S] int64 (each row left-aligned, pad after its
      content), last [N] int64 index of each row's last real token. Returns [N, V] float logits of
      the token after position last[i] over the true vocabulary (padding columns removed), or None
      on a rank that does not hold them (a non-last pipeline stage). Ranks that return logits for
      the same rows must return identical values (e.g. gathered over tensor parallelism).
    share(t): makes the tensor computed on the ranks holding logits available on every rank of
      the model-parallel group (e.g. a broadcast from the last pipeline stage); receives None where
      next_token_logits returned None. Identity for a single process.
    """

    vocab_size: int

    def next_token_logits(self, tokens: torch.Tensor, last: torch.Tensor) -> Optional[torch.Tensor]: ...

    def share(self, t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor: ...


class IncrementalDecodingModel(DecodingModel, Protocol):
    """A DecodingModel with a KV cache for rows that advance in lockstep.

    begin(prefix, max_new_tokens): prefix [N, P] int64 (no padding: every row has P tokens), at
      most max_new_tokens to follow; returns the logits of each row's next token [N, V] (or None
      on ranks without them, as next_token_logits).
    advance(tokens): tokens [N] int64 appended to every row; returns the next logits likewise.
    end(): drops the cache.
    """

    def begin(self, prefix: torch.Tensor, max_new_tokens: int) -> Optional[torch.Tensor]: ...

    def advance(self, tokens: torch.Tensor) -> Optional[torch.Tensor]: ...

    def end(self) -> None: ...


class LocalEngine(RolloutEngine):
    """Rollouts from a DecodingModel.

    pad_id fills unused positions; device holds the decoding state; stream_seed makes this
    engine's random streams distinct from another replica's (pass the data-parallel rank: replicas
    see different prompts, tensor- and pipeline-parallel peers must draw identically).
    """

    def __init__(self, model: DecodingModel, *, pad_id: int, device: torch.device | str = "cpu",
                 stream_seed: int = 0):
        self.model = model
        self.pad_id = int(pad_id)
        self.device = torch.device(device)
        self.stream_seed = int(stream_seed)

    def generator(self, params: SamplingParams, key: int) -> torch.Generator:
        """The generator of one generate() call: a pure function of (seed, key, stream_seed)."""
        digest = hashlib.sha256(f"{params.seed}/{key}/{self.stream_seed}".encode()).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def _generate_by_length(self, prompts, params: SamplingParams, key: int, lengths) -> Rollouts:
        """One incremental batch per prompt length, merged back into the prompts' order."""
        parts = []
        for length in lengths:
            index = [i for i, p in enumerate(prompts) if len(p) == length]
            parts.append((index, self.generate([prompts[i] for i in index], params,
                                               key=key * 1_000_003 + length)))
        n = params.n
        total = len(prompts) * n
        width = max(r.response_ids.shape[1] for _, r in parts)
        prompt_width = max(r.prompt_ids.shape[1] for _, r in parts)
        out = {
            "prompt_ids": torch.full((total, prompt_width), self.pad_id, dtype=torch.int64, device=self.device),
            "prompt_lengths": torch.zeros(total, dtype=torch.int64, device=self.device),
            "response_ids": torch.full((total, width), self.pad_id, dtype=torch.int64, device=self.device),
            "response_mask": torch.zeros(total, width, dtype=torch.bool, device=self.device),
            "logprobs": torch.zeros(total, width, dtype=torch.float32, device=self.device),
            "finished": torch.zeros(total, dtype=torch.bool, device=self.device),
        }
        for index, r in parts:
            rows = torch.tensor([i * n + j for i in index for j in range(n)], device=self.device)
            w, pw = r.response_ids.shape[1], r.prompt_ids.shape[1]
            out["prompt_ids"][rows, :pw] = r.prompt_ids
            out["prompt_lengths"][rows] = r.prompt_lengths
            out["response_ids"][rows, :w] = r.response_ids
            out["response_mask"][rows, :w] = r.response_mask
            out["logprobs"][rows, :w] = r.logprobs
            out["finished"][rows] = r.finished
        return Rollouts(group_ids=torch.arange(total, device=self.device) // n, **out)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 key: int = 0) -> Rollouts:
        if len(prompts) == 0:
            raise ValueError("LocalEngine.generate: no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("LocalEngine.generate: an empty prompt; every prompt needs >= 1 token")
        lengths_seen = sorted({len(p) for p in prompts})
        if hasattr(self.model, "begin") and len(lengths_seen) > 1:
            return self._generate_by_length(prompts, params, key, lengths_seen)
        n, steps = params.n, params.max_new_tokens
        rows = len(prompts) * n
        prompt_lengths = torch.tensor([len(p) for p in prompts for _ in range(n)], device=self.device)
        width = int(prompt_lengths.max()) + steps
        tokens = torch.full((rows, width), self.pad_id, dtype=torch.int64, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i * n:(i + 1) * n, :len(p)] = torch.tensor(list(p), dtype=torch.int64, device=self.device)
        lengths = prompt_lengths.clone()
        logprobs = torch.zeros(rows, steps, dtype=torch.float32, device=self.device)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=self.device)
        stop = torch.tensor(params.stop_token_ids or (-1,), dtype=torch.int64, device=self.device)
        generator = self.generator(params, key)
        rows_idx = torch.arange(rows, device=self.device)
        incremental = hasattr(self.model, "begin") and bool((prompt_lengths == prompt_lengths[0]).all())
        if incremental:
            logits_all = self.model.begin(tokens[:, :int(prompt_lengths[0])], steps)
        try:
            for t in range(steps):
                active = torch.nonzero(~done).flatten()
                if incremental:
                    logits = None if logits_all is None else logits_all[active]
                else:
                    current = int((lengths[active]).max())
                    logits = self.model.next_token_logits(tokens[active, :current], lengths[active] - 1)
                # Noise for every row, finished ones too, on every rank (also those without
                # logits): a row's samples depend neither on when other rows finish, nor on the
                # rank, nor on the decoding path.
                noise = (torch.rand((rows, self.model.vocab_size), generator=generator, device=self.device)
                         if params.temperature > 0 else None)
                sampled = None
                if logits is not None:
                    if logits.shape != (active.numel(), self.model.vocab_size):
                        raise ValueError(f"LocalEngine: the model returned logits {tuple(logits.shape)}, "
                                         f"expected {(active.numel(), self.model.vocab_size)}")
                    tok, lp = sample_tokens(logits, params, None if noise is None else noise[active])
                    sampled = torch.stack([tok.to(torch.float64), lp.to(torch.float64)])
                shared = self.model.share(sampled, like=torch.empty(2, active.numel(), dtype=torch.float64,
                                                                    device=self.device))
                tok, lp = shared[0].to(torch.int64), shared[1].to(torch.float32)
                tokens[active, lengths[active]] = tok
                logprobs[active, t] = lp
                lengths[active] += 1
                hit = (tok.unsqueeze(-1) == stop).any(-1)
                finished[active] = hit
                done[active] = hit
                done |= (lengths - prompt_lengths) >= steps
                if bool(done.all()):
                    break
                if incremental:  # finished rows are fed their last token; their outputs are unused
                    logits_all = self.model.advance(tokens[rows_idx, lengths - 1])
        finally:
            if incremental:
                self.model.end()
        response_len = lengths - prompt_lengths
        steps_taken = int(response_len.max())
        offsets = torch.arange(steps_taken, device=self.device)
        response_mask = offsets.unsqueeze(0) < response_len.unsqueeze(1)
        gather_at = (prompt_lengths.unsqueeze(1) + offsets.unsqueeze(0)).clamp(max=width - 1)
        response_ids = torch.where(response_mask, tokens.gather(1, gather_at),
                                   torch.full_like(gather_at, self.pad_id))
        prompt_width = int(prompt_lengths.max())
        prompt_mask = torch.arange(prompt_width, device=self.device).unsqueeze(0) < prompt_lengths.unsqueeze(1)
        prompt_ids = torch.where(prompt_mask, tokens[:, :prompt_width], torch.full_like(tokens[:, :prompt_width], self.pad_id))
        return Rollouts(
            prompt_ids=prompt_ids,
            prompt_lengths=prompt_lengths,
            response_ids=response_ids,
            response_mask=response_mask,
            logprobs=torch.where(response_mask, logprobs[:, :steps_taken], torch.zeros(())),
            group_ids=rows_idx // n,
            finished=finished,
        )
