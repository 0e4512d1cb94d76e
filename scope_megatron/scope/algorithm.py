"""compute_loss: the one entry point for SCOPE and its baselines (OPD, GRPO) on plain tensors.

    L = sum over groups g of [ sum_{i in Omega_c(g)} w_i^stu L_MLE(y_i)
                               + sum_{i in Omega_w(g)} w_i^tea L_OPD(y_i) ] / (number of groups)

Every per-rollout loss is a token mean over the rollout's counted response tokens; rollouts are
combined by their weights (0 off a path) and the sum is divided by the number of groups in the
batch. OPD: every rollout on the teacher path with uniform weights (1/|group| for "sum", 1 for
"mean"), no MLE path. GRPO: the PPO-clip surrogate with the group-normalized outcome advantage,
uniform weights, no teacher. The loss is replicated on every rank of the tensor-parallel group and
each rank's backward gives the exact gradient of its own logit shard.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from scope_megatron.ops import vocab_parallel_logprob
from scope_megatron.ops._checks import check_temperature

from ._tp import TensorParallel, resolve_tp
from .batch import RolloutBatch
from .config import ScopeConfig
from .losses import grpo_advantages, grpo_path_loss, opd_path_loss
from .metrics import collect_metrics
from .weights import RolloutWeights, dual_path_weights, log_ppl_needs, path_members, uniform_group_weights


def compute_loss(
    config: ScopeConfig,
    batch: RolloutBatch,
    student_logits: torch.Tensor,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    loss_grad: float = 1.0,
    old_logprobs_temperature: Optional[float] = None,
    weights: Optional[RolloutWeights] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The loss of `config.algorithm` on one batch of rollouts, and its metrics.

    Args:
      config: a ScopeConfig.
      batch: a RolloutBatch (padded [B, L] or packed [N] responses).
      student_logits: this rank's vocabulary shard of the student's logits aligned with the
        response tokens: [B, L, V_local] for a padded batch, [N, V_local] for a packed one, where
        position t holds the logits that predict response token t (i.e. the model's output at the
        position before it: drop the prompt positions and shift by one before calling).
        float32 / bfloat16 / float16 (float64 for tests); gradients flow into it.
      teacher_logits: the teacher's logits, same shape, dtype and sharding as student_logits
        (build the teacher with the student's padded vocabulary); required by kl_estimator
        "full" and "topk", optional otherwise (then it supplies the teacher's token log-probs).
        No teacher (neither this nor batch.teacher_logprobs) is needed when no rollout is on
        the teacher path (e.g. every rollout correct): that batch has only the MLE term.
        Never receives a gradient. Give either this or batch.teacher_logprobs, not both.
      tp_group: the tensor-parallel group the vocabulary is sharded over; default: Megatron's
        tensor-model-parallel group if initialized, else none (logits hold the whole vocabulary).
      vocab_size: the true vocabulary size; logit columns with a global id >= vocab_size
        (embedding padding) are excluded from every softmax. Default: V_local * tp_size.
      loss_grad: the gradient the caller will backpropagate into the returned loss (1 for
        loss.backward(); the number of groups when it returns loss * groups). With
        kl_estimator="full" and no tensor parallelism, the per-token gradient of the KL is then
        known before the forward, and the fused kernel computes KL and gradient in one pass
        (vocab_parallel_kl's expected_grad). Any other gradient stays exact (it is recomputed).
      old_logprobs_temperature: the temperature of batch.old_logprobs (a rollout engine's
        log-probs are at its sampling temperature); None: config.student_temperature. When it
        differs, the old log-probs may not enter a PPO ratio (ValueError), and logprob_diff/*
        compares them with the student's log-probs at that temperature (one more pass over the
        logits, without gradient).
      weights: the rollouts' weights computed beforehand over their whole prompt groups
        (rollout_weights on a batch holding the groups, then .select of this batch's rows), for a
        batch that holds only part of some groups: they replace the weights (and GRPO's
        advantages) this batch's own groups would give. The loss is still the weighted sum over
        this batch's rollouts / batch.num_groups; a caller summing micro-batches that split groups
        multiplies it back by batch.num_groups and divides by the step's number of groups.
        Group metrics (groups/*, */weight_entropy) then describe the partial groups.

    Returns:
      (loss, metrics): loss is a 0-d float32 tensor (float64 for float64 logits), identical on
      every rank of tp_group; metrics is a dict of Python floats (scope.metrics lists the keys).

    Raises (never a silent zero or NaN loss):
      ValueError / TypeError for misaligned or mismatched logits (teacher vs student vocabulary),
      a missing teacher, or teacher log-probs missing for a rollout on the teacher path;
      FloatingPointError for NaN / Inf logits, naming the rollout and token.
    """
    if not isinstance(config, ScopeConfig):
        raise TypeError(f"compute_loss: config must be a ScopeConfig, got {type(config).__name__}")
    if not isinstance(batch, RolloutBatch):
        raise TypeError(f"compute_loss: batch must be a RolloutBatch, got {type(batch).__name__}")
    tp = resolve_tp(tp_group)
    if weights is not None:
        _check_given_weights(config, batch, weights)
    members = None if config.algorithm == "grpo" else path_members(config, batch)
    # The one host sync on routing: whether any rollout is distilled. A batch whose teacher path
    # is empty (e.g. every rollout correct) has no teacher term and needs no teacher.
    distills = members is not None and config.uses_teacher and bool(members[1].any())
    _check_logits(config, batch, student_logits, teacher_logits, tp, vocab_size, distills)
    ids = batch.safe_response_ids
    student_lp = _guard_nonfinite(
        batch, tp, vocab_size, {"student": student_logits},
        lambda: vocab_parallel_logprob(student_logits, ids, tp_group=tp.group, vocab_size=vocab_size,
                                       temperature=config.student_temperature))
    engine_lp = _at_old_logprobs_temperature(config, batch, student_logits, student_lp, tp, vocab_size,
                                             old_logprobs_temperature)
    # Differentiable: the MLE loss of every rollout; detached where it weights rollouts.
    student_log_ppl = batch.log_perplexity(student_lp)
    dtype = student_lp.dtype
    if config.algorithm == "grpo":
        members = batch.nonempty
        if weights is None:
            weights = rollout_weights(config, batch, student_log_ppl)
        advantages = weights.advantages.to(dtype)
        path = grpo_path_loss(config, batch, members, advantages, student_lp)
        loss = (weights.student.to(dtype) * path.losses).sum() / batch.num_groups
        return loss, collect_metrics(batch, loss=loss, student_logprobs=engine_lp,
                                     student_log_ppl=student_log_ppl, policy_path=path,
                                     advantages=advantages)

    teacher_lp, teacher_rows = _teacher_logprobs(config, batch, teacher_logits, tp, vocab_size)
    student_members, teacher_members = members
    # Without teacher log-probs the teacher path is empty (_check_logits / _require_teacher raised
    # otherwise): no weight, loss or metric of the teacher reads them.
    _require_teacher(config, batch, teacher_members, teacher_lp, teacher_rows)
    teacher_log_ppl = None
    if teacher_lp is not None:
        teacher_log_ppl = batch.log_perplexity(
            torch.where(batch.counted(teacher_rows), teacher_lp, teacher_lp.new_zeros(())))

    if weights is None:
        weights = rollout_weights(config, batch, student_log_ppl, teacher_log_ppl)
    student_weights, teacher_weights = weights.student.to(dtype), weights.teacher.to(dtype)

    loss = (student_weights * student_log_ppl).sum()
    teacher_path = None
    if distills:
        kl_grad = None
        if (config.fused_kl and config.kl_estimator == "full" and torch.is_grad_enabled()
                and student_logits.requires_grad):
            kl_grad = _token_term_grad(batch, teacher_members, teacher_weights, loss_grad)
        teacher_path = _guard_nonfinite(
            batch, tp, vocab_size, {"student": student_logits, "teacher": teacher_logits},
            lambda: opd_path_loss(config, batch, teacher_members, student_logprobs=student_lp,
                                  teacher_logprobs=teacher_lp, student_logits=student_logits,
                                  teacher_logits=teacher_logits, tp=tp, vocab_size=vocab_size,
                                  kl_grad=kl_grad))
        loss = loss + (teacher_weights * teacher_path.losses).sum()
    loss = loss / batch.num_groups
    return loss, collect_metrics(
        batch, loss=loss, student_logprobs=engine_lp, student_log_ppl=student_log_ppl,
        teacher_log_ppl=teacher_log_ppl, teacher_rows=teacher_rows,
        student_members=student_members, student_weights=student_weights,
        teacher_members=teacher_members, teacher_weights=teacher_weights,
        teacher_path=teacher_path)


def rollout_weights(config: ScopeConfig, batch: RolloutBatch, student_log_ppl: Optional[torch.Tensor] = None,
                    teacher_log_ppl: Optional[torch.Tensor] = None) -> RolloutWeights:
    """The weights compute_loss gives each rollout (it calls this on its own batch), computed over
    whole prompt groups without any logits: also for a caller that then splits the groups over
    micro-batches (compute_loss(weights=result.select(rows))).

    batch: the whole groups (its logits are never needed; teacher log-probs are not read).
    student_log_ppl, teacher_log_ppl: [B] log PPL_S / log PPL_T of each rollout (batch
      .log_perplexity of the token log-probs at the student / teacher temperature, e.g. from a
      forward pass without gradient); read only where SCOPE's weighted paths need them (the
      members of a weighted path), else may be None.
    Returns float32 weights (float64 when a log-perplexity is float64)."""
    if not isinstance(config, ScopeConfig):
        raise TypeError(f"rollout_weights: config must be a ScopeConfig, got {type(config).__name__}")
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64
                                 for t in (student_log_ppl, teacher_log_ppl)) else torch.float32
    zeros = torch.zeros(batch.num_rollouts, dtype=dtype, device=batch.response_ids.device)
    if config.algorithm == "grpo":
        return RolloutWeights(uniform_group_weights(batch, batch.nonempty, config.normalize, dtype), zeros,
                              grpo_advantages(batch, dtype))
    if config.algorithm == "opd":
        _, teacher_members = path_members(config, batch)
        return RolloutWeights(zeros, uniform_group_weights(batch, teacher_members, config.normalize, dtype))
    members = path_members(config, batch)
    needs = log_ppl_needs(config)
    for name, values, path_rows, needed in zip(("student_log_ppl", "teacher_log_ppl"),
                                               (student_log_ppl, teacher_log_ppl), members, needs):
        if needed and values is None and bool(path_rows.any()):
            raise ValueError(f"rollout_weights: {name} is needed: SCOPE's {name.split('_')[0]} path is "
                             "'weighted' and has members; pass each rollout's log perplexity")
    weights = dual_path_weights(config, batch, student_log_ppl, teacher_log_ppl if needs[1] else None)
    return RolloutWeights(weights.student.to(dtype), weights.teacher.to(dtype))


def _check_given_weights(config: ScopeConfig, batch: RolloutBatch, weights: RolloutWeights) -> None:
    if not isinstance(weights, RolloutWeights):
        raise TypeError(f"compute_loss: weights must be RolloutWeights (rollout_weights), got "
                        f"{type(weights).__name__}")
    for name in ("student", "teacher", "advantages"):
        value = getattr(weights, name)
        if value is None and name == "advantages" and config.algorithm != "grpo":
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch.num_rollouts,):
            raise ValueError(f"compute_loss: weights.{name} must be a [{batch.num_rollouts}] tensor (one value "
                             f"per rollout of the batch), got {tuple(getattr(value, 'shape', ())) or value!r}; "
                             "compute them with rollout_weights on the whole groups and .select this batch's rows")


def _token_term_grad(batch: RolloutBatch, members: torch.Tensor, weights: torch.Tensor,
                     loss_grad: float) -> torch.Tensor:
    """d loss / d (per-token term of the teacher path), shaped like response_ids: the loss is
    linear in those terms (token mean per rollout, times the detached rollout weight, summed,
    over the number of groups), so its gradient is known before they are computed. Computed by
    autograd through the same reduction as compute_loss, so that it is what backward sends."""
    with torch.enable_grad():
        x = torch.zeros(batch.response_ids.shape, dtype=weights.dtype, device=weights.device,
                        requires_grad=True)
        loss = (weights.detach() * batch.token_mean(x, batch.counted(members))).sum() / batch.num_groups
        (grad,) = torch.autograd.grad(loss, x, torch.full((), loss_grad, dtype=loss.dtype,
                                                          device=loss.device))
    return grad


def _at_old_logprobs_temperature(config: ScopeConfig, batch: RolloutBatch, student_logits: torch.Tensor,
                                 student_lp: torch.Tensor, tp: TensorParallel, vocab_size: Optional[int],
                                 temperature: Optional[float]) -> torch.Tensor:
    """The student's log-probs comparable with batch.old_logprobs (for logprob_diff/*): student_lp
    when both are at config.student_temperature, else a recomputation at the old log-probs'
    temperature, which then must not enter a PPO ratio."""
    if temperature is None:
        return student_lp
    temperature = check_temperature("compute_loss", "old_logprobs_temperature", temperature)
    if temperature == config.student_temperature:
        return student_lp
    if "old_logprobs" in config.effective_fields() and config.old_logprobs == "rollout":
        raise ValueError(
            f"compute_loss: the PPO ratio would divide log-probs at student_temperature "
            f"{config.student_temperature} by batch.old_logprobs at {temperature}; compute both at one "
            "temperature, or use ScopeConfig.old_logprobs='recomputed'")
    with torch.no_grad():
        return vocab_parallel_logprob(student_logits.detach(), batch.safe_response_ids, tp_group=tp.group,
                                      vocab_size=vocab_size, temperature=temperature)


def _check_logits(config: ScopeConfig, batch: RolloutBatch, student: torch.Tensor,
                  teacher: Optional[torch.Tensor], tp: TensorParallel,
                  vocab_size: Optional[int], distills: bool) -> None:
    """distills: whether the batch has a teacher term (a teacher-path rollout, config.uses_teacher)."""
    layout = "[N, V_local] (packed)" if batch.packed else "[B, L, V_local] (padded)"
    ids_shape = tuple(batch.response_ids.shape)
    if not isinstance(student, torch.Tensor) or not student.dtype.is_floating_point:
        raise TypeError(f"compute_loss: student_logits must be a floating-point tensor, got "
                        f"{getattr(student, 'dtype', type(student).__name__)}")
    if student.dim() != len(ids_shape) + 1 or tuple(student.shape[:-1]) != ids_shape:
        raise ValueError(
            f"compute_loss: student_logits has shape {tuple(student.shape)}; it must be {layout} "
            f"aligned with response_ids {ids_shape}: position t holds the logits that predict "
            "response token t (drop the prompt positions and shift by one)")
    if student.device != batch.response_ids.device:
        raise ValueError(f"compute_loss: student_logits are on {student.device} but the batch is on "
                         f"{batch.response_ids.device}")
    if config.algorithm == "grpo":
        if teacher is not None:
            raise ValueError("compute_loss: algorithm='grpo' uses no teacher; do not pass "
                             "teacher_logits (and skip the teacher's forward pass)")
        return
    if teacher is None:
        served_topk = config.kl_estimator == "topk" and batch.teacher_top_ids is not None
        if served_topk and config.uses_teacher:
            served_k = batch.teacher_top_ids.shape[-1]
            vocab = tp.true_vocab("compute_loss", vocab_size, student.shape[-1])
            if served_k != min(config.topk_k, vocab):
                raise ValueError(
                    f"compute_loss: the served teacher's top-k has k={served_k} ids per token "
                    f"(batch.teacher_top_ids), but ScopeConfig.topk_k={config.topk_k}; the top-k "
                    "estimator would silently use the served k. Request top_logprobs_num="
                    f"{config.topk_k} from the teacher or set topk_k={served_k}.")
        if distills and config.kl_estimator in ("full", "topk") and not served_topk:
            raise ValueError(
                f"compute_loss: kl_estimator={config.kl_estimator!r} needs teacher_logits (a "
                "colocated teacher's vocabulary shard, aligned and sharded like student_logits). "
                "With a remote teacher that returns only the sampled tokens' log-probs, use "
                "kl_estimator='sampled' or 'k3' and batch.teacher_logprobs ('topk' also works from its "
                "top-k: batch.teacher_top_ids and teacher_top_logprobs).")
        return
    if batch.teacher_logprobs is not None:
        raise ValueError("compute_loss: both teacher_logits and batch.teacher_logprobs were given; "
                         "pass one source of teacher log-probs")
    if not isinstance(teacher, torch.Tensor) or teacher.dim() != student.dim():
        raise ValueError(f"compute_loss: teacher_logits must be a tensor shaped like student_logits "
                         f"{tuple(student.shape)}, got {tuple(getattr(teacher, 'shape', ()))}")
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(
            f"compute_loss: teacher/student vocabulary mismatch: the teacher's logit shard has "
            f"{teacher.shape[-1]} columns, the student's {student.shape[-1]}. Both models must share "
            "the tokenizer and be sharded identically: build the teacher with the student's padded "
            "vocabulary size and the same tensor-parallel size, and pass the true vocabulary as "
            "vocab_size.")
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"compute_loss: teacher_logits {tuple(teacher.shape)} and student_logits "
                         f"{tuple(student.shape)} must be aligned token by token")
    if teacher.dtype != student.dtype:
        raise TypeError(f"compute_loss: teacher_logits ({teacher.dtype}) and student_logits "
                        f"({student.dtype}) must have the same dtype; cast the teacher's output")
    if teacher.device != student.device:
        raise ValueError(f"compute_loss: teacher_logits are on {teacher.device}, student_logits on "
                         f"{student.device}")


def _teacher_logprobs(config, batch, teacher_logits, tp, vocab_size):
    """log p_T of the sampled tokens (detached, shaped like response_ids) and the [B] bool rows
    that have them; (None, all False) without a teacher."""
    if teacher_logits is not None:
        with torch.no_grad():
            lp = _guard_nonfinite(
                batch, tp, vocab_size, {"teacher": teacher_logits},
                lambda: vocab_parallel_logprob(teacher_logits, batch.safe_response_ids,
                                               tp_group=tp.group, vocab_size=vocab_size,
                                               temperature=config.resolved_teacher_temperature))
        return lp, torch.ones_like(batch.nonempty)
    if batch.teacher_logprobs is not None:
        return batch.teacher_logprobs.detach(), batch.has_teacher_logprobs
    return None, torch.zeros_like(batch.nonempty)


def _require_teacher(config, batch, members, teacher_lp, teacher_rows):
    """Every teacher-path rollout must have teacher token log-probs when the estimator or the
    teacher weights read them ("full" and "topk" have teacher logits, checked before)."""
    needs = []
    if config.uses_teacher and (config.kl_estimator in ("sampled", "k3")
                                or (config.kl_estimator == "topk" and batch.teacher_top_ids is not None)):
        needs.append(f"kl_estimator={config.kl_estimator!r} needs log p_T of the sampled tokens")
    if config.algorithm == "scope" and config.teacher_path == "weighted":
        needs.append("teacher_path='weighted' needs PPL_T")
    missing = members & ~teacher_rows
    if not needs or not bool(missing.any()):
        return
    r = int(torch.nonzero(missing)[0])
    kind = "correct" if bool(batch.correct[r]) else "incorrect"
    source = ("batch.teacher_logprobs is None and no teacher_logits were given" if teacher_lp is None
              else f"batch.has_teacher_logprobs is False for {int(missing.sum())} of them")
    raise ValueError(
        f"compute_loss: rollout {r} (group {int(batch.group_ids[r])}, {kind}) is on the teacher "
        f"path but has no teacher log-probs ({source}); {' and '.join(needs)}. Query the teacher "
        "for every teacher-path rollout (the incorrect ones; all of them for OPD or "
        "routing=False), or pass teacher_logits.")


def _guard_nonfinite(batch: RolloutBatch, tp: TensorParallel, vocab_size: Optional[int],
                     logits: Dict[str, Optional[torch.Tensor]], fn):
    """Runs an op call; if it reports non-finite logits, re-raises naming the rollout and token
    (the ops only know the flattened token index)."""
    try:
        return fn()
    except FloatingPointError as exc:
        for name, tensor in logits.items():
            if tensor is None:
                continue
            idx = _first_nonfinite_row(tensor, tp, vocab_size)
            if idx is not None:
                raise FloatingPointError(
                    f"compute_loss: the {name} logits are NaN or Inf at "
                    f"{batch.describe_token(idx)}: {exc}") from exc
        raise FloatingPointError(f"compute_loss: non-finite logits on another tensor-parallel "
                                 f"rank's shard: {exc}") from exc


def _first_nonfinite_row(logits: torch.Tensor, tp: TensorParallel, vocab_size: Optional[int],
                         chunk: int = 4096) -> Optional[int]:
    """First flattened row whose real (non-padding) columns of this shard are not finite;
    scanned in chunks so that the error path allocates no [tokens, V] mask."""
    local = logits.shape[-1]
    vocab = tp.true_vocab("compute_loss", vocab_size, local)
    real = max(0, min(local, vocab - tp.rank * local))
    rows = logits.detach().reshape(-1, local)[:, :real]
    for start in range(0, rows.shape[0], chunk):
        bad = ~torch.isfinite(rows[start:start + chunk]).all(-1)
        if bool(bad.any()):
            return start + int(torch.nonzero(bad)[0])
    return None
