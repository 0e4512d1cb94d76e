"""Running model chunks over micro-batches with Megatron's schedules, and decoding through them.

Every forward pass of the trainer (student decoding, teacher scoring, the training step) goes
through `get_forward_backward_func()`, so the same code serves PP=1 and pipelined layouts: each
stage receives its input from the previous one and only the last stage sees the output layer's
logits. With pipeline parallelism the micro-batches of one call share one shape
([micro_batch_size, seq_length] tokens), as the point-to-point transfers require; without it
each may have its own.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .models import unwrap


@dataclass
class MicroBatch:
    """The model input of one micro-batch (the same on every pipeline stage) plus whatever the
    last stage's output function needs (`extra`)."""

    tokens: torch.Tensor  # [b, s] int64, right-padded
    position_ids: torch.Tensor  # [b, s] int64
    extra: Dict


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    """0..s-1 for every row (right padding needs no special positions)."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s).contiguous()


def run_microbatches(model_chunks: Sequence[torch.nn.Module], micro_batches: List[MicroBatch],
                     output_fn: Callable, *, forward_only: bool, model_kwargs: Optional[Dict] = None) -> List:
    """Runs the chunks over the micro-batches with Megatron's schedule for this layout.

    output_fn(micro_batch, output_tensor) runs on the last pipeline stage with the model's output
    (the logit shard [b, s, V/tp]):
      forward_only=True: returns anything; the list of its values comes back (last stage only).
      forward_only=False: returns (loss_sum, count, metrics) where loss_sum is a 0-d tensor summed
        over `count` units (int tensor); gradients are those of sum(loss_sum) / sum(count) over all
        micro-batches and data-parallel ranks (the model's config must set
        calculate_per_token_loss=True). The metrics of every micro-batch come back.
    Other stages get []. Gradients accumulate in the chunks' DDP buffers. model_kwargs are passed
    to every model call (e.g. an inference context).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    from megatron.core import parallel_state

    b, s = micro_batches[0].tokens.shape
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        for mb in micro_batches:
            if tuple(mb.tokens.shape) != (b, s):
                raise ValueError(f"run_microbatches: with pipeline parallelism the micro-batches must "
                                 f"share one shape, got {tuple(mb.tokens.shape)} and {(b, s)}")

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb.tokens, mb.position_ids, None, **(model_kwargs or {}))
        if forward_only:
            return output, lambda out, non_loss_data=True: output_fn(mb, out)
        return output, lambda out: output_fn(mb, out)

    chunks = list(model_chunks)
    # one iterator per model chunk: with virtual pipeline stages every chunk reads every batch
    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators[0] if len(chunks) == 1 else iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )


class AccumulatedStep:
    """One optimizer step's gradients over several run_microbatches calls (forward_only=False),
    e.g. the micro-batches in waves, each wave after its teacher scores: the gradients are those
    of one call over all the micro-batches. Each call accumulates into the DDP buffers; only the
    last one finalizes (data-parallel reduction, then the division by the count summed over every
    call's micro-batches and data-parallel ranks, as calculate_per_token_loss does in one call).
    With overlap_grad_reduce the buckets start reducing during the last call's last backward pass
    (Megatron's schedule), never in an earlier call (whose gradients are partial).

        step = AccumulatedStep(chunks)
        for i, wave in enumerate(waves):
            outputs += step.run(wave, loss_fn, last=i == len(waves) - 1)
    """

    def __init__(self, model_chunks: Sequence[torch.nn.Module]):
        self.chunks = list(model_chunks)
        self.config = self.chunks[0].config
        self.overlap = any(getattr(getattr(chunk, "ddp_config", None), "overlap_grad_reduce", False)
                           for chunk in self.chunks)
        self._earlier: Optional[torch.Tensor] = None
        self._finished = False

    def run(self, micro_batches: List[MicroBatch], output_fn: Callable, *, last: bool) -> List:
        if self._finished:
            raise RuntimeError("AccumulatedStep: the step's last call has run, or an earlier call raised "
                               "(its partial gradients are in the buffers); zero them and start a new step")
        config = self.config
        finalize = config.finalize_model_grads_func
        counts: List[torch.Tensor] = []  # each micro-batch's count tensor, read without a host sync

        def counted(mb, out):
            result = output_fn(mb, out)
            counts.append(result[1])
            return result

        no_sync = config.no_sync_func
        try:
            with contextlib.ExitStack() as held:
                if not last:
                    config.finalize_model_grads_func = None
                    if self.overlap:
                        # The schedule leaves its no_sync context before its last micro-batch, which
                        # would start the buckets' reductions on partial gradients: hold it over the
                        # whole call instead.
                        config.no_sync_func = None
                        for chunk in self.chunks:
                            held.enter_context(chunk.no_sync())
                elif finalize is not None and self._earlier is not None:
                    config.finalize_model_grads_func = _counting_earlier(finalize, self._earlier)
                out = run_microbatches(self.chunks, micro_batches, counted, forward_only=False)
        except BaseException:
            self._finished = True  # the step's gradients are incomplete: no further call may add to them
            raise
        finally:
            config.finalize_model_grads_func = finalize
            config.no_sync_func = no_sync
        if last:
            self._finished = True
        elif counts:  # last pipeline stage only: the other stages' counts come from it in finalize
            total = torch.stack([c.reshape(()) for c in counts]).sum()
            self._earlier = total if self._earlier is None else self._earlier + total
        return out


def _counting_earlier(finalize: Callable, earlier: torch.Tensor) -> Callable:
    """finalize_model_grads with the earlier calls' count added to this call's num_tokens."""
    def finalize_all(model, num_tokens=None, *args, **kwargs):
        if num_tokens is not None:
            num_tokens = num_tokens + earlier.to(device=num_tokens.device, dtype=num_tokens.dtype)
        return finalize(model, num_tokens, *args, **kwargs)
    return finalize_all


def is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def gather_vocab_shards(shard: torch.Tensor) -> torch.Tensor:
    """[..., V/tp] on each TP rank -> [..., V] (the padded vocabulary) on every TP rank."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def broadcast_from_last_stage(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's tensor on every stage of this pipeline (identity with PP=1)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    out = t.contiguous() if is_last_stage() else torch.empty_like(like)
    dist.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return out


def pad_rows(t: torch.Tensor, rows: int, value) -> torch.Tensor:
    """t with extra rows of `value` appended up to `rows` rows."""
    if t.shape[0] == rows:
        return t
    pad = t.new_full((rows - t.shape[0], *t.shape[1:]), value)
    return torch.cat([t, pad])


class MegatronDecoder:
    """The trainer's model as a rollout.DecodingModel: next-token logits through the pipeline,
    gathered over tensor parallelism (every TP rank of the last stage holds the same values), and
    the sampled tokens broadcast from the last stage to the other stages.

    It is also an IncrementalDecodingModel: begin / advance / end decode rows in lockstep with
    Megatron's static KV cache (StaticInferenceContext), one micro-batch of all rows per step.
    """

    def __init__(self, model_chunks: Sequence[torch.nn.Module], *, vocab_size: int,
                 micro_batch_size: int, pad_id: int):
        self.model_chunks = list(model_chunks)
        self.vocab_size = int(vocab_size)
        self.micro_batch_size = int(micro_batch_size)
        self.pad_id = int(pad_id)
        self._cache = None
        self._training = None
        self._sp_disabled = False

    def _eval(self) -> None:
        self._training = [chunk.training for chunk in self.model_chunks]
        for chunk in self.model_chunks:
            chunk.eval()
        self._set_sequence_parallel(False)

    def _restore(self) -> None:
        self._set_sequence_parallel(True)
        for chunk, mode in zip(self.model_chunks, self._training or []):
            chunk.train(mode)
        self._training = None

    def _set_sequence_parallel(self, on: bool) -> None:
        """Sequence parallelism splits the sequence over the TP ranks, which decoding cannot do
        (one new token per step, prefixes of any length; Megatron's own text generation refuses
        it for dense models): decode with it off, as Megatron does for its MoE static batching,
        and turn it back on for training. Only for models built with it."""
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        if on and not self._sp_disabled:
            return
        for chunk in self.model_chunks:
            model = unwrap(chunk)  # set_model_to_sequence_parallel reads the GPTModel's position_embedding_type
            if not on and not model.config.sequence_parallel:
                return
            set_model_to_sequence_parallel(model, on)
        self._sp_disabled = not on

    @torch.no_grad()
    def next_token_logits(self, tokens: torch.Tensor, last: torch.Tensor) -> Optional[torch.Tensor]:
        n = tokens.shape[0]
        mbs = min(self.micro_batch_size, n)
        rows = -(-n // mbs) * mbs
        tokens = pad_rows(tokens, rows, self.pad_id)
        last = pad_rows(last, rows, 0)
        micro_batches = [MicroBatch(tokens[i:i + mbs], position_ids_for(tokens[i:i + mbs]),
                                    {"last": last[i:i + mbs]}) for i in range(0, rows, mbs)]

        def at_last_position(mb, logits):
            return logits[torch.arange(logits.shape[0], device=logits.device), mb.extra["last"]].float()

        self._eval()
        try:
            outputs = run_microbatches(self.model_chunks, micro_batches, at_last_position, forward_only=True)
        finally:
            self._restore()
        if not is_last_stage():
            return None
        return gather_vocab_shards(torch.cat(outputs))[:n, :self.vocab_size]

    # ---- incremental decoding (KV cache) -------------------------------------------------------

    @torch.no_grad()
    def begin(self, prefix: torch.Tensor, max_new_tokens: int) -> Optional[torch.Tensor]:
        from megatron.core.inference.contexts import StaticInferenceContext

        n, p = prefix.shape
        self._cache = StaticInferenceContext(n, p + max_new_tokens)
        self._eval()
        return self._step(prefix, position_ids_for(prefix))

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        offset = self._cache.sequence_len_offset
        positions = torch.full((tokens.shape[0], 1), offset, dtype=torch.int64, device=tokens.device)
        return self._step(tokens.unsqueeze(1), positions)

    def end(self) -> None:
        self._cache = None
        self._restore()

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """One forward of every row through the cache; the gathered next-token logits."""
        outputs = run_microbatches(
            self.model_chunks, [MicroBatch(tokens, positions, {})],
            lambda mb, logits: logits[:, -1].float(), forward_only=True,
            model_kwargs={"inference_context": self._cache, "runtime_gather_output": True})
        self._cache.sequence_len_offset += tokens.shape[1]
        self._cache.enable_decode_mode()
        if not is_last_stage():
            return None
        return outputs[0][:, :self.vocab_size]

    def share(self, t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return broadcast_from_last_stage(t, like)
