"""The SCOPE training loop on Megatron-core:

    rollout (LocalEngine on the student, or SGLang servers: rollout.engine) -> reward (verifier)
    -> teacher scoring (a frozen Megatron teacher, or an SGLang teacher: teacher_serving.engine)
    -> SCOPE loss -> optimizer step (-> weight sync to the SGLang servers) -> periodic evaluation
    (Avg@k, Pass@k on held-out prompts) -> checkpoint

The task (tasks.py) is the embedded toy world or a prompt file through an HF tokenizer.

Every rank runs the loop. Data-parallel replicas take disjoint slices of each step's prompts;
tensor- and pipeline-parallel peers of a replica hold the same rollouts (the decoder shares the
samples). Rank 0 logs: a progress bar, metrics.jsonl, TensorBoard and curves.png in
logging.log_dir. Randomness is a pure function of (seed, step) everywhere (prompts, sampling),
and the model / optimizer / RNG state is in the checkpoints, so a resumed run continues exactly
as an uninterrupted one.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from scope_megatron.eval import summarize
from scope_megatron.rewards import score_responses
from scope_megatron.rollout import LocalEngine, SamplingParams
from scope_megatron.scope import log_ppl_needs
from scope_megatron.utils.config_io import ConfigError, save_config, to_dict
from scope_megatron.utils.logging import (RESERVED_KEYS, MetricsLogger, ProgressBar, logged_metrics, plot_curves,
                                          read_metrics)

from . import checkpoint, models, parallel, platform
from .config import TrainConfig
from .schedule import MegatronDecoder, is_last_stage
from .step import (build_inputs, group_weights_pass, merge_metrics, micro_batches, score_with_teacher,
                   teacher_logits_bytes, train_step)
from .tasks import Task, TaskItem, build_task

EVAL_KEY_OFFSET = 1 << 40  # sampling keys of evaluations, apart from the training steps'


def params_dtype(cfg: TrainConfig) -> torch.dtype:
    precision = cfg.training.precision
    if precision == "auto":
        precision = "bf16" if platform.cuda_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _replica_slice(items: Sequence, dp_rank: int, dp: int) -> list:
    per = len(items) // dp
    return list(items[dp_rank * per:(dp_rank + 1) * per])


def _reports_metrics() -> bool:
    """One rank per data-parallel replica reports its metrics: the last pipeline stage's TP rank 0."""
    from megatron.core import parallel_state

    return is_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def _gather_to_rank0(value) -> Optional[list]:
    """Every rank's value (None where a rank has nothing to report) -> the list on rank 0."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return [v for v in out if v is not None] if out is not None else None


def preflight(cfg: TrainConfig, world_size: int, task: Optional[Task] = None) -> int:
    """Everything that can be checked before a process group or a model exists: the parallel
    layout against the world size and both models, the vocabularies (the task's, the student's,
    the teacher's, padded alike), and the checkpoint paths. Raises ConfigError naming the field
    and the fix; returns the data-parallel size. `task`: the built task (else built here)."""
    dp = cfg.check_world(world_size)
    task = task or build_task(cfg)
    vocab = task.vocab_size
    if task.name == "toy_arithmetic" and cfg.student.vocab_size != vocab:
        raise ConfigError(f"student.vocab_size {cfg.student.vocab_size} is not the task tokenizer's "
                          f"{vocab}; the model must be built for the task's vocabulary")
    if cfg.student.vocab_size < vocab:
        raise ConfigError(f"student.vocab_size {cfg.student.vocab_size} is smaller than the tokenizer's "
                          f"{vocab} tokens; the model cannot score every token the tokenizer makes")
    remote_teacher = cfg.teacher_serving.engine == "sglang"
    # prompt + response within the position embeddings of the models that see them (RoPE past
    # them extrapolates silently; learned positions would index out of range)
    longest, budget = task.longest_prompt(), cfg.rollout.max_new_tokens
    seen_by = [("student", cfg.student)] + ([("teacher", cfg.teacher)]
                                           if cfg.scope.uses_teacher and not remote_teacher else [])
    for name, model in seen_by:
        if longest + budget > model.max_position_embeddings:
            room = model.max_position_embeddings - longest
            fix = (f"lower --rollout-max-response-len to at most {room}" if room > 0 else
                   "lower the task's max_prompt_len (--task-max-prompt-len)")
            raise ConfigError(f"the longest prompt ({longest} tokens) plus rollout.max_new_tokens {budget} "
                              f"exceeds {name}.max_position_embeddings {model.max_position_embeddings}: {fix}")
    if cfg.scope.uses_teacher and not remote_teacher:
        try:
            models.check_same_vocab(cfg.student, cfg.teacher, cfg.parallel.tensor_model_parallel_size)
        except ValueError as exc:
            raise ConfigError(f"student/teacher vocabulary mismatch: {exc}") from exc
    held_out = len(task.held_out_items(cfg.eval.num_prompts)) if cfg.eval.eval_interval else 0
    if 0 < held_out < dp:
        raise ConfigError(f"eval: {held_out} held-out prompt(s) cannot be split over the data-parallel size "
                          f"{dp} (each replica evaluates an equal share): raise --eval-num-prompts to at "
                          f"least {dp} (with that many held-out problems), or --eval-interval 0")
    c = cfg.checkpoint
    if c.save is not None and checkpoint.is_checkpoint_root(c.save):
        # A run that started over here would overwrite or prune the checkpoints already there.
        try:
            checkpoint.resolve_checkpoint(c.save)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"checkpoint.save {c.save!r} holds checkpoints but none to resume from ({exc}); "
                              "starting over would overwrite them. Point `latest` at a complete "
                              "iter_XXXXXXX directory, move them away, or pass another --save") from exc
        if not c.resume:
            raise ConfigError(f"checkpoint.save {c.save!r} already holds a checkpoint and checkpoint.resume is "
                              "false: this run would overwrite it. Pass another --save (and --log-dir), "
                              "delete it, or --resume true to continue it")
    resuming = c.resume and c.save is not None and checkpoint.has_checkpoint(c.save)
    if c.load is not None and not resuming and not checkpoint.has_checkpoint(c.load):
        raise ConfigError(f"checkpoint.load {c.load!r} holds no checkpoint; build the toy starting "
                          "points with tools/make_toy_checkpoints.py, fix the path, or pass "
                          "--load null to start from random weights")
    if cfg.scope.uses_teacher and not remote_teacher and not checkpoint.has_checkpoint(c.teacher_load):
        raise ConfigError(f"checkpoint.teacher_load {c.teacher_load!r} holds no checkpoint; the "
                          f"teacher must be trained (algorithm {cfg.scope.algorithm!r})")
    return dp


class Trainer:
    """Builds everything from a TrainConfig and runs the loop (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        platform.init_distributed()
        if not platform.cuda_available():
            platform.apply_cpu_shims()
        self.task = build_task(cfg)
        dp = preflight(cfg, dist.get_world_size(), self.task)
        self.layout = platform.initialize_parallel(cfg.parallel.tensor_model_parallel_size,
                                                   cfg.parallel.pipeline_model_parallel_size,
                                                   sequence_parallel=cfg.parallel.sequence_parallel)
        assert self.layout.dp == dp
        from megatron.core import parallel_state

        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.is_rank0 = dist.get_rank() == 0
        platform.seed_everything(cfg.training.seed)
        vocab = cfg.student.vocab_size
        self.uses_teacher = cfg.scope.uses_teacher
        dtype = params_dtype(cfg)
        self.student = parallel.wrap_ddp(
            models.build_model_chunks(cfg.student, params_dtype=dtype, calculate_per_token_loss=True,
                                      **cfg.training.transformer_overrides()),
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce, bucket_size=cfg.parallel.ddp_bucket_size)
        o = cfg.optimizer
        self.optimizer = parallel.build_optimizer(
            self.student, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        self.scheduler = self._scheduler()
        self.teacher = None
        self.remote_teacher = None
        self.sglang_rollouts = None
        remote_teacher = cfg.teacher_serving.engine == "sglang"
        if self.uses_teacher and not remote_teacher:
            self.teacher = [models.freeze(c) for c in models.build_model_chunks(cfg.teacher, params_dtype=dtype)]
        self.start_step = self._load()
        if cfg.rollout.engine == "sglang":
            from .serving import SGLangRollouts

            self.sglang_rollouts = SGLangRollouts(cfg, self.student, self.task.pad_id, self.dp_rank, platform.device())
            self.engine = self.sglang_rollouts.engine
            # the servers start from an HF directory; give them the weights this run starts from
            self.engine.update_weights(self.start_step)
        else:
            self.engine = LocalEngine(
                MegatronDecoder(self.student, vocab_size=vocab, micro_batch_size=cfg.rollout.decode_micro_batch_size,
                                pad_id=self.task.pad_id),
                pad_id=self.task.pad_id, device=platform.device(), stream_seed=self.dp_rank)
        if self.uses_teacher and remote_teacher:
            from .serving import SGLangTeacherScorer

            self.remote_teacher = SGLangTeacherScorer(cfg, self.task.pad_id, cfg.scope.resolved_teacher_temperature,
                                                      tokenizer=self.task.tokenizer)
        self._logprob_checked = False
        self._waves_reported = False

    # ---- setup ---------------------------------------------------------------------------------

    def _scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o, iters = self.cfg.optimizer, self.cfg.training.train_iters
        # override_opt_param_scheduler: on a resume the schedule is this configuration's (only the
        # step count comes from the checkpoint). Megatron's default keeps the checkpoint's values
        # silently, so a finished run continued with a larger --train-iters would decay over the
        # old length and train at min_lr, and a changed --lr / --min-lr would be ignored.
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.lr_warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_iters, lr_decay_steps=max(iters, o.lr_warmup_iters + 1),
            lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=iters, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)

    def _load(self) -> int:
        """Resumes from this run's latest checkpoint, else loads the starting points. Returns the
        first step to run."""
        c = self.cfg.checkpoint
        if self.teacher is not None:
            checkpoint.load_checkpoint(c.teacher_load, self.teacher)
        if c.resume and c.save is not None and checkpoint.has_checkpoint(c.save):
            # restores this rank's own RNG streams too (a resume)
            extra = checkpoint.load_checkpoint(c.save, self.student, self.optimizer, self.scheduler)
            self._configured_optimizer_values()
            return int(extra["step"])
        if c.load is not None:
            checkpoint.load_weights(c.load, self.student, self.optimizer)
        return 0

    def _configured_optimizer_values(self) -> None:
        """After a resume, this configuration's lr, min_lr and Adam betas / eps (the scheduler's
        override above covers the schedule only): the loaded optimizer state brings back the saved
        run's param groups, whose max_lr / min_lr Megatron's scheduler reads ahead of its own, so a
        resume with a changed --lr would silently keep the old one."""
        o = self.cfg.optimizer
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = o.lr, o.min_lr
            if "betas" in group:
                group["betas"] = (o.adam_beta1, o.adam_beta2)
            if "eps" in group:
                group["eps"] = o.adam_eps
        self.scheduler.step(0)  # this step's lr and weight decay from the values above

    def _save(self, step: int) -> None:
        c = self.cfg.checkpoint
        if c.save is None:
            return
        checkpoint.save_checkpoint(c.save, step, self.student, self.optimizer, self.scheduler,
                                   extra_state={"config": to_dict(self.cfg)},
                                   keep_last=c.keep_last)

    # ---- one step ------------------------------------------------------------------------------

    def _sample(self, items: List[TaskItem], params: SamplingParams, key: int):
        rollouts = self.engine.generate([list(i.prompt_ids) for i in items], params, key=key)
        references = [items[g].reference for g in rollouts.group_ids.tolist()]
        scores = score_responses(rollouts.responses(), references, decode=self.task.decode,
                                 eos_id=self.task.stop_ids, reward_fn=self.task.reward_fn)
        return rollouts, scores

    def train_sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens,
                              stop_token_ids=self.task.stop_ids, seed=self.cfg.training.seed)

    def prepare(self, step: int):
        """Rollouts of `step` for this replica, rewarded, as micro-batches scored by the teacher
        (a colocated teacher's in waves during the training step: see teacher_wave_size), with
        training.split_groups weighted from their whole groups (group_weights_pass, whose group
        metrics only step() reports). Returns (micro-batches, rollouts, scores)."""
        return self._prepare(step)[:3]

    def _prepare(self, step: int):
        """prepare's (micro-batches, rollouts, scores), the step's teacher_wave_size and, with
        training.split_groups, the step's group metrics (group_weights_pass; else None)."""
        cfg = self.cfg
        items = _replica_slice(self.task.train_items(step, cfg.training.prompts_per_step, cfg.training.seed),
                               self.dp_rank, self.layout.dp)
        rollouts, scores = self._sample(items, self.train_sampling(), key=step)
        # sequence parallelism splits each row's sequence over the TP ranks: widths divisible by TP
        multiple = cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1
        inputs = build_inputs(rollouts, scores.correct.to(rollouts.response_ids.device), self.task.pad_id,
                              seq_multiple=multiple)
        if self.remote_teacher is not None:
            inputs.teacher = self.remote_teacher.score(rollouts, rollouts.response_ids.device)
        split = cfg.training.split_groups
        batches = micro_batches(inputs, cfg.training.micro_batch_size, trim=self.layout.pp == 1,
                                seq_multiple=multiple, max_tokens=cfg.training.max_tokens_per_micro_batch,
                                split_groups=split)
        waves = self.teacher_wave_size(batches)
        # in waves the logits come during the step, but split groups' weights may need the
        # teacher's log-probs of every rollout first (one value per token)
        early_logprobs = split and waves is not None and log_ppl_needs(cfg.scope)[1]
        if self.teacher is not None and (waves is None or early_logprobs):
            self._teacher_on_device(True)
            try:
                self._score_teacher(batches, logprobs_only=waves is not None)
            finally:  # back to host memory even if scoring raised (as the wave path does)
                self._teacher_on_device(False)
        group_metrics = None
        if split:
            started = time.perf_counter()
            group_metrics = group_weights_pass(self.student, batches, inputs, scope=cfg.scope,
                                               vocab_size=cfg.student.vocab_size)
            if group_metrics is not None:
                group_metrics["time/weights_pass_s"] = time.perf_counter() - started
            if early_logprobs:
                for mb in batches:  # the waves' logits are the loss's teacher source
                    mb.extra.pop("teacher_logprobs", None)
        return batches, rollouts, scores, waves, group_metrics

    def _score_teacher(self, batches, logprobs_only: bool = False) -> None:
        score_with_teacher(self.teacher, batches, scope=self.cfg.scope, vocab_size=self.cfg.student.vocab_size,
                           logprobs_only=logprobs_only)

    def _teacher_on_device(self, on: bool) -> None:
        """The colocated teacher to the device (for scoring), or back to host memory (the device
        memory goes to the student's pass and optimizer step)."""
        move = models.load_to_device if on else models.offload_to_cpu
        for chunk in self.teacher:
            move(chunk)

    def teacher_wave_size(self, batches) -> Optional[int]:
        """Micro-batches per teacher wave when the colocated teacher's logit shards for the whole
        step exceed training.teacher_logits_gib (kl_estimator "full"); None when they fit (prepare
        scores them all; the other estimators keep k or 1 values per token)."""
        if self.teacher is None or self.cfg.scope.kl_estimator != "full" or not batches:
            return None
        local_vocab = self.cfg.teacher.padded_vocab_size(self.layout.tp) // self.layout.tp  # a logit shard's
        per_batch = teacher_logits_bytes(batches, local_vocab, params_dtype(self.cfg))
        budget = int(self.cfg.training.teacher_logits_gib * 2**30)
        if per_batch * len(batches) <= budget:
            return None
        size = max(1, budget // per_batch)
        if not self._waves_reported and self.is_rank0:
            self._waves_reported = True
            print(f"[scope-megatron] the teacher's logits for a step take {per_batch * len(batches) / 2**30:.3g} "
                  f"GiB per rank, above training.teacher_logits_gib {self.cfg.training.teacher_logits_gib}: "
                  f"scoring in waves of {size} micro-batch(es), each followed by the student's pass", flush=True)
        return size

    def _train_step(self, batches, waves: Optional[int], group_metrics=None) -> Dict[str, float]:
        """The training step over the prepared micro-batches; waves: teacher_wave_size(batches);
        group_metrics: group_weights_pass's (split_groups)."""
        cfg = self.cfg
        common = dict(scope=cfg.scope, vocab_size=cfg.student.vocab_size,
                      engine_temperature=self.train_sampling().logprob_temperature,
                      step_group_metrics=group_metrics)
        if waves is None:
            return train_step(self.student, self.optimizer, self.scheduler, batches, **common)

        def score(wave):
            self._score_teacher(wave)
            if wave[-1] is batches[-1]:  # scored the last wave: off the device before the optimizer step
                self._teacher_on_device(False)

        self._teacher_on_device(True)
        try:
            return train_step(self.student, self.optimizer, self.scheduler, batches, **common,
                              score_teacher=score, micro_batches_per_wave=waves)
        finally:  # also when the step fails before its last wave (a no-op otherwise)
            self._teacher_on_device(False)

    def step(self, step: int) -> Dict[str, float]:
        """One training step; returns this replica's metrics (where it reports them) else {}."""
        started = time.perf_counter()
        batches, rollouts, scores, waves, group_metrics = self._prepare(step)
        prepared = time.perf_counter()
        metrics = self._train_step(batches, waves, group_metrics)
        if self.sglang_rollouts is not None:
            synced = time.perf_counter()
            self.engine.update_weights(step + 1)  # the next step samples from the updated student
            if metrics:
                metrics["time/weight_sync_s"] = time.perf_counter() - synced
                self._check_logprob_gap(metrics)
        if not _reports_metrics():
            return {}
        elapsed = time.perf_counter() - started
        tokens = int(rollouts.response_lengths.sum())
        metrics.update({
            "reward/mean": float(scores.rewards.mean()),
            "response/length": float(rollouts.response_lengths.float().mean()),
            "response/truncated": float((~rollouts.finished).float().mean()),
            "time/step_s": elapsed, "time/rollout_and_teacher_s": prepared - started,
            "throughput/tokens_per_s": tokens / elapsed, "tokens": tokens,
        })
        return metrics

    def _check_logprob_gap(self, metrics: Dict[str, float]) -> None:
        """Once: the engine's log-probs of its samples against the trainer's recomputation (the
        loss reports logprob_diff/*); a large gap means the servers sample from other weights or
        another temperature / numerics than the trainer assumes."""
        if self._logprob_checked or "logprob_diff/mean" not in metrics:
            return
        self._logprob_checked = True
        gap, limit = metrics["logprob_diff/mean"], self.cfg.rollout.logprob_gap_warn
        if gap > limit:
            import warnings

            warnings.warn(f"SGLang log-probs differ from the trainer's by {gap:.4f} on average (max "
                          f"{metrics.get('logprob_diff/max', float('nan')):.4f}), above rollout.logprob_gap_warn "
                          f"{limit}: check that the servers got the weights (weight_version), the dtype and "
                          "the rollout temperature", stacklevel=2)

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate(self, step: int) -> Dict[str, float]:
        """Avg@k and Pass@k on the held-out prompts (split over replicas); the summary on rank 0."""
        e = self.cfg.eval
        held_out = self.task.held_out_items(e.num_prompts)
        held_out = held_out[: len(held_out) - len(held_out) % self.layout.dp]
        if not held_out:
            return {}
        problems = _replica_slice(held_out, self.dp_rank, self.layout.dp)
        params = SamplingParams(n=e.k, temperature=e.temperature, top_p=e.top_p,
                                max_new_tokens=self.cfg.rollout.max_new_tokens,
                                stop_token_ids=self.task.stop_ids, seed=self.cfg.training.seed)
        rollouts, scores = self._sample(problems, params, key=EVAL_KEY_OFFSET + step)
        grades = scores.correct.reshape(len(problems), e.k) if _reports_metrics() else None
        gathered = _gather_to_rank0(grades)
        if gathered is None:
            return {}
        grades = torch.cat(gathered)  # [problems, k] in held_out order (replicas in rank order)
        out = self._summary("eval", grades)
        for name, member in self.task.families().items():
            inside = torch.tensor([member(p) for p in held_out])
            out.update(self._summary(f"eval/{name}", grades[inside]))
            out.update(self._summary(f"eval/not_{name}", grades[~inside]))
        return out

    def _summary(self, prefix: str, grades: torch.Tensor) -> Dict[str, float]:
        if grades.shape[0] == 0:
            return {}
        summary = summarize(grades, ks=self.cfg.eval.pass_ks)
        return {f"{prefix}/{k}": float(v) for k, v in summary.items() if k.startswith(("Avg@", "Pass@"))}

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> Dict[str, float]:
        """Trains from start_step to training.train_iters; returns rank 0's last metrics (for a
        run whose checkpoint already holds step train_iters: those logged at that step)."""
        cfg = self.cfg
        if self.start_step >= cfg.training.train_iters:
            return self._finished()
        log_dir = Path(cfg.logging.log_dir)
        resumed = self.start_step > 0
        overwrite = cfg.logging.overwrite or (not resumed and self._restarting_unsaved_run(log_dir))
        logger = MetricsLogger(log_dir, is_rank0=self.is_rank0,
                               resume_step=self.start_step if resumed else None,
                               overwrite=overwrite, tensorboard=cfg.logging.tensorboard)
        if self.is_rank0:
            save_config(cfg, log_dir / "config.yaml")
        bar = ProgressBar(cfg.training.train_iters, is_rank0=self.is_rank0, initial=self.start_step,
                          print_every=cfg.training.log_interval)
        last: Dict[str, float] = {}
        e = cfg.eval
        try:
            if e.eval_interval and not resumed:
                last.update(self._log(logger, 0, self.evaluate(0)))
            for step in range(self.start_step, cfg.training.train_iters):
                reported = _gather_to_rank0(self.step(step) or None)
                done = step + 1
                if reported:
                    metrics = combine_replicas(reported)
                    last.update(self._log(logger, done, metrics))
                    bar.update(done, tokens=int(metrics["tokens"]), reward=metrics["reward/mean"],
                               loss=metrics["loss"], kl=metrics.get("kl/mean", float("nan")))
                if e.eval_interval and (done % e.eval_interval == 0 or done == cfg.training.train_iters):
                    last.update(self._log(logger, done, self.evaluate(done)))
                if done % cfg.checkpoint.save_interval == 0 or done == cfg.training.train_iters:
                    self._save(done)
        finally:
            bar.close()
            logger.close()
        if self.is_rank0 and logger.jsonl_path.exists():
            keys = ["reward/mean", "loss", "kl/mean"] + [f"eval/Avg@{e.k}"] + [f"eval/Pass@{k}" for k in e.pass_ks]
            plot_curves(logger.jsonl_path, log_dir / "curves.png", keys=keys,
                        title=f"{cfg.scope.algorithm} on {cfg.task.name}")
        return last

    def _finished(self) -> Dict[str, float]:
        """Nothing to train: says so (rank 0) and returns the metrics logged at the checkpoint's
        step, so that the same command run twice reports the run instead of starting it over."""
        cfg = self.cfg
        if not self.is_rank0:
            return {}
        path = Path(cfg.logging.log_dir) / "metrics.jsonl"
        last: Dict[str, float] = {}
        for record in read_metrics(path) if path.exists() else []:
            if record["step"] == self.start_step:
                last.update({k: v for k, v in record.items() if k not in RESERVED_KEYS and v is not None})
        print(f"[scope-megatron] {cfg.checkpoint.save} already holds step {self.start_step} and "
              f"--train-iters is {cfg.training.train_iters}: nothing to train. Raise --train-iters to "
              "continue this run, or start another with a new --save and --log-dir (or delete "
              f"{cfg.logging.log_dir}).", flush=True)
        return last

    def _restarting_unsaved_run(self, log_dir: Path) -> bool:
        """A run starting from step 0 into a log_dir that already holds metrics: True (start over,
        replacing them) when they are this run's own, stopped before its first checkpoint (the
        log_dir's config.yaml names the same checkpoint.save); ConfigError (on every rank) when
        they belong to another run, naming the flags that decide; False when log_dir holds none."""
        verdict = [None]
        if self.is_rank0:
            verdict[0] = _log_dir_verdict(log_dir, self.cfg.checkpoint.save)
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(verdict, src=0)
        kind = verdict[0]
        if kind == "own":
            if self.is_rank0:
                print(f"[scope-megatron] {log_dir} holds the logs of this run, stopped before its first "
                      f"checkpoint in {self.cfg.checkpoint.save}: starting over", flush=True)
            return True
        if kind == "other":
            raise ConfigError(
                f"logging.log_dir {log_dir} already holds the metrics of another run (no checkpoint of it "
                f"in checkpoint.save {self.cfg.checkpoint.save!r} to resume from): choose another "
                "--log-dir, or pass --logging-overwrite true to replace them")
        return False

    def _log(self, logger: MetricsLogger, step: int, metrics: Dict[str, float]) -> Dict[str, float]:
        if metrics:
            logger.log(step, metrics)
        return metrics

    def close(self) -> None:
        for holder in (self.sglang_rollouts, self.remote_teacher):
            if holder is not None:
                holder.close()
        platform.destroy()


def _log_dir_verdict(log_dir: Path, save: Optional[str]) -> Optional[str]:
    """None: log_dir holds no metrics; "own": they were logged by a run with checkpoint.save
    `save` (not None); "other": anything else."""
    import yaml

    if logged_metrics(log_dir) is None:
        return None
    try:
        earlier = yaml.safe_load((log_dir / "config.yaml").read_text())["checkpoint"]["save"]
    except (OSError, TypeError, KeyError, yaml.YAMLError):
        return "other"
    same = save and earlier and Path(earlier).resolve() == Path(save).resolve()
    return "own" if same else "other"


def combine_replicas(reported: List[Dict[str, float]]) -> Dict[str, float]:
    """One step's metrics from every data-parallel replica's (step.merge_metrics): tokens and
    throughput summed too, plain means averaged (each replica has the same number of prompts)."""
    return merge_metrics(reported, [1.0] * len(reported), counts=("tokens", "throughput/tokens_per_s"))
