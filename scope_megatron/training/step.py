"""One SCOPE training step on Megatron models: rollouts -> model inputs -> teacher scoring ->
the SCOPE loss through Megatron's schedule -> optimizer step.

Layout of the model input: every row is prompt + response, right-padded. The logits at position
prompt_len - 1 + t predict response token t, so each micro-batch carries its response tokens
(and their masks, engine and teacher log-probs) at those positions of a [rows, width] frame,
counted only there: the loss takes the model's [rows, width, V/tp] logit shards as they come,
without gathering a response-aligned copy (which, with its gradient scattered back, would hold
two more [rows, L, V/tp] tensors). Micro-batches hold whole prompt groups (SCOPE normalizes
weights within a group); the loss of a micro-batch is summed over its groups and Megatron divides
the gradient by the number of groups over all micro-batches and data-parallel ranks
(calculate_per_token_loss), which makes it the spec's sum over groups / #groups. With
split_groups they may cut groups: group_weights_pass first weights each rollout from its whole
group (a forward pass without gradient), and each group counts once, in the micro-batch holding
its first row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from scope_megatron.ops import vocab_parallel_logprob
from scope_megatron.rollout import Rollouts
from scope_megatron.scope import (RolloutBatch, ScopeConfig, compute_loss, log_ppl_needs, path_members,
                                  rollout_weights)
from scope_megatron.scope.metrics import group_metrics, is_group_metric

from .schedule import AccumulatedStep, MicroBatch, position_ids_for, run_microbatches


@dataclass
class StepInputs:
    """The rollouts of one step on this data-parallel rank, as model input (on every rank)."""

    tokens: torch.Tensor  # [N, S] prompt + response, right-padded
    response_index: torch.Tensor  # [N, L] position of the logits predicting response token t
    response_ids: torch.Tensor  # [N, L]
    response_mask: torch.Tensor  # [N, L] bool
    old_logprobs: torch.Tensor  # [N, L] float32, the rollout engine's
    group_ids: torch.Tensor  # [N] prompt index 0..B-1
    correct: torch.Tensor  # [N] bool
    # a served teacher's scores ([N, L] teacher_logprobs, [N, L, k] teacher_top_ids / _logprobs),
    # sliced into the micro-batches like the rest
    teacher: Dict[str, torch.Tensor] = field(default_factory=dict)


def build_inputs(rollouts: Rollouts, correct: torch.Tensor, pad_id: int, *,
                 seq_multiple: int = 1) -> StepInputs:
    """Concatenates each rollout's prompt and response into one right-padded row.

    seq_multiple: the row width is rounded up to a multiple of it (sequence parallelism splits
    the sequence over the TP ranks: pass the TP size)."""
    n, length = rollouts.response_ids.shape
    plen = rollouts.prompt_lengths
    width = _round_up(int((plen + rollouts.response_lengths).max()), seq_multiple)
    device = rollouts.response_ids.device
    tokens = torch.full((n, width), pad_id, dtype=torch.int64, device=device)
    prompt_width = rollouts.prompt_ids.shape[1]
    tokens[:, :prompt_width] = rollouts.prompt_ids  # left-aligned, pad after each prompt
    t = torch.arange(length, device=device).unsqueeze(0)
    mask = rollouts.response_mask
    rows = torch.arange(n, device=device).unsqueeze(1).expand(n, length)
    tokens[rows[mask], (plen.unsqueeze(1) + t)[mask]] = rollouts.response_ids[mask]
    return StepInputs(
        tokens=tokens,
        response_index=(plen.unsqueeze(1) - 1 + t).clamp(max=width - 1),
        response_ids=rollouts.response_ids,
        response_mask=rollouts.response_mask,
        old_logprobs=rollouts.logprobs,
        group_ids=rollouts.group_ids,
        correct=correct.to(torch.bool),
    )


def micro_batches(inputs: StepInputs, micro_batch_size: int, *, trim: bool = False,
                  seq_multiple: int = 1, max_tokens: int = 0, split_groups: bool = False) -> List[MicroBatch]:
    """Micro-batches of whole prompt groups with group ids renumbered 0.. within each.

    split_groups=True: micro-batches of rollouts that may cut prompt groups (each row is its own
      unit below: trim orders and packs rows, not groups); their losses need weights from the
      whole groups (group_weights_pass). Each micro-batch's extra then also holds "rows" (its
      rows' indices in `inputs`), "step_group_ids" (their groups in `inputs`) and "owned_groups"
      (the number of groups whose first row, in micro-batch order, it holds: an int tensor, so
      that the counts sum to the step's groups) with "owned_groups_int", the same on the host.

    trim=False: micro_batch_size consecutive rows each (a multiple of the group size), every
      micro-batch as wide as the step's longest row (pipeline parallelism sends activations of
      one shape).
    trim=True (no pipeline parallelism): the groups ordered by their longest row, longest first,
      and each micro-batch cut to its own longest row (rounded up to seq_multiple: the TP size
      with sequence parallelism) and its own longest response, so that a few long responses do
      not make every micro-batch pay for their length. The loss is a sum over groups, so the
      order changes nothing but the summation order.
    max_tokens > 0 (with trim): instead of micro_batch_size rows, as many whole groups as fit
      max_tokens tokens (rows x the micro-batch's width, padding included), at least one group:
      short groups travel in larger micro-batches (a dynamic batch size)."""
    n = inputs.tokens.shape[0]
    if max_tokens and not trim:
        raise ValueError("micro_batches: max_tokens needs trim=True (micro-batches of their own width)")
    if not max_tokens and n % micro_batch_size:
        raise ValueError(f"{n} rollouts do not split into micro-batches of {micro_batch_size}")
    order = torch.arange(n, device=inputs.tokens.device)
    if trim:
        response_lengths = inputs.response_mask.sum(1)
        row_lengths = inputs.response_index[:, 0] + 1 + response_lengths  # prompt + response
        # split_groups: every row its own unit of ordering and packing
        groups = order if split_groups else inputs.group_ids.to(torch.int64)
        longest = torch.zeros(int(groups.max()) + 1, dtype=row_lengths.dtype, device=row_lengths.device)
        longest = longest.scatter_reduce(0, groups, row_lengths, reduce="amax")
        order = order[torch.sort(groups, stable=True).indices]  # rows of a group together
        # by the groups' longest rows; stable, so a group's rows stay together (ties keep the
        # group order of the sort above)
        order = order[torch.sort(longest[groups[order]], descending=True, stable=True).indices]
        # the step's second host sync (after the group count above; split_groups adds one below):
        # the micro-batches' widths below are Python maxima
        group_list, lengths, responses = torch.stack(
            [groups, row_lengths.to(torch.int64), response_lengths.to(torch.int64)])[:, order].tolist()
    if max_tokens:
        chunks = _pack_groups(order, group_list, lengths, max_tokens, seq_multiple)
    else:
        chunks = [order[start:start + micro_batch_size] for start in range(0, n, micro_batch_size)]
    if split_groups:
        # a micro-batch's rows group by group (the renumbering below needs each group's rows together)
        chunks = [rows[torch.sort(inputs.group_ids[rows], stable=True).indices] for rows in chunks]
        owned = _owned_groups(inputs.group_ids.to(torch.int64), chunks)
        owned_int = torch.stack(owned).tolist()  # one host sync: the metrics' group counts
    out, end = [], 0
    for i, rows in enumerate(chunks):  # consecutive slices of `order` (each reordered by group when split)
        start, end = end, end + rows.shape[0]
        tokens, response_index = inputs.tokens[rows], inputs.response_index[rows]
        length = inputs.response_ids.shape[1]
        if trim:
            width = min(_round_up(max(lengths[start:end]), seq_multiple), tokens.shape[1])
            length = max(1, max(responses[start:end]))
            tokens = tokens[:, :width].contiguous()
            response_index = response_index[:, :length]
        mask = inputs.response_mask[rows, :length]
        frame = _Frame(response_index, mask, tokens.shape[1])
        extra = {
            "response_ids": frame(inputs.response_ids[rows, :length], 0),
            "response_mask": frame(mask, False),
            "old_logprobs": frame(inputs.old_logprobs[rows, :length], 0.0),
            "group_ids": _renumber_groups(inputs.group_ids[rows]),
            "correct": inputs.correct[rows],
            **{key: frame(value[rows, :length], 0) for key, value in inputs.teacher.items()},
        }
        if split_groups:
            extra.update(rows=rows, step_group_ids=inputs.group_ids[rows], owned_groups=owned[i],
                         owned_groups_int=owned_int[i])
        out.append(MicroBatch(tokens, position_ids_for(tokens), extra))
    return out


def _owned_groups(groups: torch.Tensor, chunks: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per chunk, the number of groups whose first row (in the chunks' concatenated order) it
    holds, as 0-d int tensors (no host sync): they sum to the number of groups."""
    order = torch.cat(chunks)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    first = torch.full((int(groups.numel()),), order.numel(), dtype=position.dtype, device=order.device)
    first = first.scatter_reduce(0, groups, position, reduce="amin")
    owner = position == first[groups]
    return [owner[rows].sum().to(torch.int) for rows in chunks]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _renumber_groups(groups: torch.Tensor) -> torch.Tensor:
    """Group ids 0.. in order of appearance, for rows where each group's rows are consecutive
    (a micro-batch's: the rollouts come group by group, and trim's order keeps them together).
    torch.unique would sync with the host; for ascending ids (trim=False) this is its numbering."""
    out = torch.zeros(groups.shape, dtype=torch.int64, device=groups.device)
    out[1:] = (groups[1:] != groups[:-1]).cumsum(0)
    return out


class _Frame:
    """Places per-response-token values [b, L(, k)] at their logits' positions of a [b, width]
    frame (response token t of row i at prompt_len_i - 1 + t); `fill` elsewhere.

    A scatter of every token, without boolean indexing (which syncs with the host): a counted
    token's position is at most width - 2 (its row, prompt + response, fits the width), so the
    uncounted ones, clamped to width - 1 or on positions of no counted token, carry `fill`."""

    def __init__(self, response_index: torch.Tensor, mask: torch.Tensor, width: int):
        self.index = response_index.clamp(max=width - 1)
        self.mask, self.width = mask, width

    def __call__(self, values: torch.Tensor, fill) -> torch.Tensor:
        trailing = (1,) * (values.dim() - 2)
        mask = self.mask.view(*self.mask.shape, *trailing)
        index = self.index.view(*self.index.shape, *trailing).expand_as(values)
        out = values.new_full((values.shape[0], self.width, *values.shape[2:]), fill)
        return out.scatter_(1, index, values.masked_fill(~mask, fill))


def _pack_groups(order: torch.Tensor, groups: List[int], lengths: List[int], max_tokens: int,
                 seq_multiple: int) -> List[torch.Tensor]:
    """Consecutive whole groups of `order` (rows sorted longest group first) packed greedily into
    chunks of at most max_tokens padded tokens; a group alone may exceed it."""
    chunks, start, width, i = [], 0, 0, 0
    n = len(groups)
    while i < n:
        j = i
        while j < n and groups[j] == groups[i]:
            j += 1
        group_width = _round_up(max(lengths[i:j]), seq_multiple)
        new_width = max(width, group_width)
        if i > start and (j - start) * new_width > max_tokens:
            chunks.append(order[start:i])
            start, new_width = i, group_width
        width, i = new_width, j
    chunks.append(order[start:n])
    return chunks


@torch.no_grad()
def score_with_teacher(teacher_chunks: Sequence[torch.nn.Module], batches: List[MicroBatch], *,
                       scope: ScopeConfig, vocab_size: int, logprobs_only: bool = False) -> None:
    """Runs the frozen teacher over the micro-batches and stores, on the last pipeline stage, what
    the loss needs in each micro-batch's `extra` (TEACHER_KEYS), in the micro-batch's [b, width]
    frame: for the full KL, the teacher's logit shards ("teacher_logits", [b, width, V/tp]: hold
    few micro-batches at once, see train_step's score_teacher); for the top-k estimator, its
    log-probs of the sampled tokens plus its top-k ids and their log-probs ([b, width, k], what a
    served teacher returns); otherwise, or with logprobs_only, its log-probs of the sampled tokens
    ("teacher_logprobs")."""
    from scope_megatron.scope import teacher_top_k

    temperature = scope.resolved_teacher_temperature

    def collect(mb, logits):
        if scope.kl_estimator == "full" and not logprobs_only:
            return {"teacher_logits": logits}
        ids = torch.where(mb.extra["response_mask"], mb.extra["response_ids"], 0)
        logprobs = vocab_parallel_logprob(logits, ids, vocab_size=vocab_size, temperature=temperature)
        if scope.kl_estimator != "topk" or logprobs_only:
            return {"teacher_logprobs": logprobs}
        top_ids, top_logprobs = teacher_top_k(logits, ids, logprobs, k=scope.topk_k,
                                              vocab_size=vocab_size, teacher_temperature=temperature,
                                              dtype=logprobs.dtype)
        return {"teacher_logprobs": logprobs, "teacher_top_ids": top_ids, "teacher_top_logprobs": top_logprobs}

    outputs = run_microbatches(teacher_chunks, batches, collect, forward_only=True)
    for mb, out in zip(batches, outputs):
        mb.extra.update(out)


@torch.no_grad()
def group_weights_pass(student_chunks: Sequence[torch.nn.Module], batches: List[MicroBatch], inputs: StepInputs,
                       *, scope: ScopeConfig, vocab_size: int) -> Optional[Dict[str, float]]:
    """For micro-batches that cut prompt groups (micro_batches(split_groups=True)): every
    rollout's weight from its whole group (scope.rollout_weights over `inputs`, the step's rows on
    this replica) into its micro-batch's extra["weights"], which the loss uses. SCOPE's weighted
    student path needs each rollout's log PPL_S (at scope.student_temperature): a forward pass of
    the student without gradient over the micro-batches gives them; its weighted teacher path
    reads log PPL_T from the teacher's scores in the micro-batches (teacher_logprobs, else
    teacher_logits). OPD, GRPO and uniform paths need no pass.

    Every pipeline stage calls it; the weights exist on the last (the only one computing the
    loss). Returns there the step's group metrics (scope.metrics.group_metrics), else None."""
    from megatron.core import parallel_state

    needs_student, needs_teacher = log_ppl_needs(scope)
    temperature, teacher_temperature = scope.student_temperature, scope.resolved_teacher_temperature

    def log_ppls(mb, logits):
        extra = mb.extra
        batch = RolloutBatch(response_ids=extra["response_ids"], group_ids=extra["group_ids"],
                             correct=extra["correct"], old_logprobs=extra["old_logprobs"],
                             response_mask=extra["response_mask"])
        ids = batch.safe_response_ids
        student = batch.log_perplexity(vocab_parallel_logprob(logits, ids, vocab_size=vocab_size,
                                                              temperature=temperature))
        teacher_lp = extra.get("teacher_logprobs") if needs_teacher else None
        if needs_teacher and teacher_lp is None and extra.get("teacher_logits") is not None:
            teacher_lp = vocab_parallel_logprob(extra["teacher_logits"], ids, vocab_size=vocab_size,
                                                temperature=teacher_temperature)
        return student, None if teacher_lp is None else batch.log_perplexity(teacher_lp.to(student.dtype))

    n = inputs.group_ids.shape[0]
    student_log_ppl = teacher_log_ppl = None
    if needs_student or needs_teacher:
        outputs = run_microbatches(student_chunks, batches, log_ppls, forward_only=True)
        if not outputs:
            return None
        student_log_ppl = outputs[0][0].new_zeros(n)
        teacher_log_ppl = None if any(t is None for _, t in outputs) else outputs[0][0].new_zeros(n)
        for mb, (student, teacher) in zip(batches, outputs):
            student_log_ppl[mb.extra["rows"]] = student
            if teacher_log_ppl is not None:
                teacher_log_ppl[mb.extra["rows"]] = teacher.to(teacher_log_ppl.dtype)
    elif not parallel_state.is_pipeline_last_stage():
        return None
    step = RolloutBatch(response_ids=inputs.response_ids, group_ids=inputs.group_ids, correct=inputs.correct,
                        old_logprobs=inputs.old_logprobs, response_mask=inputs.response_mask)
    weights = rollout_weights(scope, step, student_log_ppl, teacher_log_ppl)
    for mb in batches:
        mb.extra["weights"] = weights.select(mb.extra["rows"])
    if scope.algorithm == "grpo":
        return group_metrics(step)
    student_members, teacher_members = path_members(scope, step)
    return group_metrics(step, student_members=student_members, student_weights=weights.student,
                         teacher_members=teacher_members, teacher_weights=weights.teacher)


# metrics that count (summed over micro-batches and data-parallel replicas, not averaged)
COUNT_KEYS = ("rollouts/total", "rollouts/empty", "rollouts/student_path", "rollouts/teacher_path",
              "groups/total", "groups/all_correct", "groups/all_wrong")


# means over a set of rollouts, combined over micro-batches by the size of that set in each
MEAN_OVER = {"kl/mean": "rollouts/teacher_path", "mle/mean": "rollouts/student_path",
             "reward/mean": "rollouts/total", "grpo/advantage_abs_mean": "rollouts/total",
             # over tokens: the micro-batches' rollouts stand in for their tokens
             "logprob_diff/mean": "rollouts/total", "clip_fraction": "rollouts/total",
             **{f"{path}/ppl_{model}": f"rollouts/{path}"
                for path in ("student_path", "teacher_path") for model in ("student", "teacher")}}


def metric_kind(key: str) -> str:
    """How a metric of the loss combines over micro-batches and data-parallel replicas: "count"
    (COUNT_KEYS) summed, "max" (logprob_diff/max, */weight_max) maximized, "mean" averaged."""
    if key in COUNT_KEYS:
        return "count"
    return "max" if key.endswith("max") else "mean"


def merge_metrics(parts: Sequence[Mapping[str, float]], weights: Sequence[float], *,
                  counts: Sequence[str] = ()) -> Dict[str, float]:
    """Metrics of several parts (micro-batches, data-parallel replicas) as one: counts
    (metric_kind, and `counts`) summed, maxima maximized, means over a path's rollouts (MEAN_OVER)
    weighted by each part's count of them, other means by `weights` (one per part). A key missing
    from some parts combines over the parts that have it."""
    out = {}
    for key in set().union(*parts):
        present = [(p[key], p, w) for p, w in zip(parts, weights) if key in p]
        values = [v for v, _, _ in present]
        kind = "count" if key in counts else metric_kind(key)
        by = MEAN_OVER.get(key)
        if kind == "count":
            out[key] = sum(values)
        elif kind == "max":
            out[key] = max(values)
        else:
            by_count = by is not None and all(by in p for _, p, _ in present)
            scale = [p[by] if by_count else w for _, p, w in present]
            total = sum(scale)
            out[key] = (sum(v * s for v, s in zip(values, scale)) / total if total
                        else sum(values) / len(values))
    return out


TEACHER_KEYS = ("teacher_logits", "teacher_logprobs", "teacher_top_ids", "teacher_top_logprobs")


def teacher_logits_bytes(batches: List[MicroBatch], local_vocab: int, dtype: torch.dtype) -> int:
    """Bytes of the largest micro-batch's teacher logit shard [b, width, local_vocab]."""
    if not batches:
        return 0
    cells = max(mb.tokens.numel() for mb in batches)
    return cells * local_vocab * torch.empty((), dtype=dtype).element_size()


def _scope_loss(scope: ScopeConfig, vocab_size: int, engine_temperature: Optional[float] = None):
    """The per-micro-batch output function of the student: (loss summed over the micro-batch's
    groups, the count Megatron divides by, {"metrics", "groups", "owned"}). The count is its number
    of groups, or with split groups the groups it owns (micro_batches' owned_groups: each group
    counted once), which "owned" holds on the host; split micro-batches' metrics leave out the
    group metrics (group_weights_pass gives them). engine_temperature: the temperature of the
    rollout engine's log-probs (old_logprobs; compute_loss's old_logprobs_temperature)."""
    def loss_fn(mb, logits):
        extra = mb.extra
        batch = RolloutBatch(response_ids=extra["response_ids"], group_ids=extra["group_ids"],
                             correct=extra["correct"], old_logprobs=extra["old_logprobs"],
                             response_mask=extra["response_mask"],
                             teacher_logprobs=extra.get("teacher_logprobs"),
                             teacher_top_ids=extra.get("teacher_top_ids"),
                             teacher_top_logprobs=extra.get("teacher_top_logprobs"))
        groups = batch.num_groups
        # loss_grad: Megatron backpropagates 1 into loss * groups (calculate_per_token_loss; the
        # bf16 loss scale is 1), i.e. `groups` into the loss, which the fused KL relies on.
        split = "owned_groups" in extra  # groups cut over micro-batches: each counted once, where it starts
        if split and extra.get("weights") is None:
            raise RuntimeError("a micro-batch that may cut prompt groups has no weights from its whole "
                               "groups: run group_weights_pass over the step's micro-batches first")
        loss, metrics = compute_loss(scope, batch, logits,
                                     teacher_logits=extra.get("teacher_logits"), vocab_size=vocab_size,
                                     loss_grad=float(groups), old_logprobs_temperature=engine_temperature,
                                     weights=extra.get("weights"))
        if split:
            count, owned = extra["owned_groups"], extra["owned_groups_int"]
            metrics = {k: v for k, v in metrics.items() if not is_group_metric(k)}
        else:
            count, owned = torch.tensor(groups, dtype=torch.int, device=loss.device), groups
        return loss * groups, count, {"metrics": metrics, "groups": groups, "owned": owned}
    return loss_fn


@torch.no_grad()
def evaluate_loss(student_chunks: Sequence[torch.nn.Module], batches: List[MicroBatch], *,
                  scope: ScopeConfig, vocab_size: int) -> Optional[float]:
    """The SCOPE loss of the micro-batches at the current weights, without an update (sum over
    groups / groups, this replica only); on the last pipeline stage, else None. Micro-batches that
    cut groups keep the rollout weights group_weights_pass gave them (from the weights then)."""
    loss_fn = _scope_loss(scope, vocab_size)
    outputs = run_microbatches(student_chunks, batches, lambda mb, logits: loss_fn(mb, logits),
                               forward_only=True)
    if not outputs:
        return None
    return float(sum(o[0] for o in outputs) / sum(int(o[1]) for o in outputs))


def train_step(student_chunks: Sequence[torch.nn.Module], optimizer, scheduler,
               batches: List[MicroBatch], *, scope: ScopeConfig, vocab_size: int,
               score_teacher: Optional[Callable[[List[MicroBatch]], None]] = None,
               micro_batches_per_wave: Optional[int] = None,
               engine_temperature: Optional[float] = None,
               step_group_metrics: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Forward + backward of the SCOPE loss over the micro-batches, then one optimizer step.

    step_group_metrics: for micro-batches that cut prompt groups, group_weights_pass's group
      metrics, reported instead of the micro-batches' (which see partial groups).

    engine_temperature: the temperature of the rollouts' log-probs (SamplingParams
      .logprob_temperature: compute_loss's old_logprobs_temperature); None: scope.student_temperature.

    score_teacher, micro_batches_per_wave: for a colocated teacher whose outputs for the whole
      step do not fit in memory at once (the full KL keeps [b, L, V/tp] logits per micro-batch):
      the micro-batches run in waves of micro_batches_per_wave (None: one wave), score_teacher
      fills each wave's teacher outputs (score_with_teacher) just before the student's forward and
      backward over it, and they are dropped after it. The gradients are those of one pass over
      all micro-batches (AccumulatedStep); with pipeline parallelism every wave pays the
      pipeline's fill and drain.

    Returns, on the last pipeline stage, the metrics of compute_loss over the micro-batches
    (counts summed, maxima maximized, means over a set of rollouts weighted by its size in each
    micro-batch (MEAN_OVER), other means by their groups; the loss over the step's groups) plus
    grad_norm, lr and update_skipped; {} on other stages.
    """
    size = len(batches) if micro_batches_per_wave is None else int(micro_batches_per_wave)
    if size < 1:
        raise ValueError(f"train_step: micro_batches_per_wave must be >= 1, got {micro_batches_per_wave}")
    waves = [batches[i:i + size] for i in range(0, len(batches), size)]
    for chunk in student_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    accumulated = AccumulatedStep(student_chunks)
    loss_fn = _scope_loss(scope, vocab_size, engine_temperature)
    reduced = []
    for i, wave in enumerate(waves):
        if score_teacher is not None:
            score_teacher(wave)
        reduced += accumulated.run(wave, loss_fn, last=i == len(waves) - 1)
        if score_teacher is not None:
            for mb in wave:
                for key in TEACHER_KEYS:
                    mb.extra.pop(key, None)
    update_successful, grad_norm, _ = optimizer.step()
    lr = optimizer.param_groups[0]["lr"]  # this update's, before the scheduler moves to the next
    scheduler.step(increment=1)
    if not reduced:
        return {}
    total = sum(r["owned"] for r in reduced)  # the groups (each counted in one micro-batch)
    # a mean over a path's rollouts weighted by the micro-batches' members (exact), others by groups
    metrics = merge_metrics([r["metrics"] for r in reduced], [r["groups"] for r in reduced])
    metrics["loss"] = sum(r["metrics"]["loss"] * r["groups"] for r in reduced) / total
    if step_group_metrics is not None:
        metrics.update(step_group_metrics)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = lr
    metrics["update_skipped"] = 0.0 if update_successful else 1.0
    return metrics
