"""Megatron-core checks of scope_megatron.training, run in real gloo process groups by
tests/distributed.py and reported one pytest test per check (test_platform.py, test_models.py,
test_checkpoint.py read them through mc_launches.py).

Three launches (megatron's import costs seconds per process, so each launch runs many checks):
  train   2 ranks: TP=2, then PP=2, then DP=2 in the same processes (Megatron's parallel state is
          torn down and rebuilt between layouts): model building, training steps, the frozen
          teacher, phase 1 of the resume checks, the checkpoints the reshard checks load.
  kill    one mc_kill_saver process per kill point, each killed by SIGKILL during a save.
  resume  2 fresh ranks: phase 2 of the resume checks, resharding loads, what each killed save
          left behind, bad loads.
The train and resume launches also return which CPU shims served which megatron call sites.
"""
from __future__ import annotations

import dataclasses
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import tests.training.mc_megatron_src  # noqa: F401  (first: may redirect `import megatron`)
from scope_megatron.training import checkpoint, models, parallel, platform

SHARED_ENV = "SCOPE_TRAINING_TEST_DIR"  # set by mc_launches: directory shared by the launches

# A toy vocabulary of 250 tokens padded to 256 rows at TP=1 and at TP=2 (64 * tp divides 256):
# checkpoints reshard between the two.
SIZES = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=64, vocab_size=250, make_vocab_size_divisible_by=64,
             max_position_embeddings=32)
STUDENT = models.ModelConfig.preset("qwen3", **SIZES, hidden_dropout=0.1, attention_dropout=0.1)
TEACHER = models.ModelConfig.preset("llama", **{**SIZES, "hidden_size": 48, "num_layers": 3})
SEQ, MBS, NUM_MB = 16, 2, 2
LR = 3e-3


def shared_dir() -> Path:
    return Path(os.environ[SHARED_ENV])


def _save_json(name: str, value) -> None:
    if dist.get_rank() == 0:
        (shared_dir() / name).write_text(json.dumps(value))
    dist.barrier()


def _load_json(name: str):
    return json.loads((shared_dir() / name).read_text())


def run_checks(checks: dict, results: dict) -> None:
    """Runs each check; records None or the traceback under its name (reported per test)."""
    for name, fn in checks.items():
        try:
            fn()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()


def _setup(tp: int, pp: int, seed: int, vpp=None) -> platform.ParallelLayout:
    platform.apply_cpu_shims()
    lay = platform.initialize_parallel(tp, pp, vpp=vpp)
    platform.seed_everything(seed)
    return lay


def _shim_hits() -> dict:
    return {name: dict(report.hits) for name, report in platform.shims_applied().items()}


# ---- training ------------------------------------------------------------------------------


def _batch(seed: int, step: int, dp_rank: int = None) -> torch.Tensor:
    """DP rank `dp_rank`'s (default: this rank's) tokens [NUM_MB * MBS, SEQ + 1] of `step`: a fixed
    pool of sequences (so the loss can fall within a few steps) drawn by a generator seeded from
    (seed, step, DP rank), the data position that a resumed run restores from the step."""
    from megatron.core import parallel_state

    if dp_rank is None:
        dp_rank = parallel_state.get_data_parallel_rank()
    pool = torch.randint(0, STUDENT.vocab_size, (8, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 1000 + step * 10 + dp_rank)
    return pool[torch.randint(0, pool.shape[0], (NUM_MB * MBS,), generator=gen)]


def _ce_forward_step(data_iterator, model):
    """Megatron's token cross entropy (vocab-parallel, labels path of GPTModel), mean over tokens."""
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    output = model(inputs, models.default_position_ids(inputs), None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


def _distill_forward_step(teacher):
    """The SCOPE pattern on vocab-parallel logits: the student's NLL through the project's
    log-prob op plus the full-vocabulary reverse KL to the frozen teacher's logits."""
    from scope_megatron.ops import vocab_parallel_kl, vocab_parallel_logprob

    def forward_step(data_iterator, model):
        from megatron.core import parallel_state, tensor_parallel

        # Megatron's pattern: TP rank 0 reads the batch, the others receive it.
        first = parallel_state.get_tensor_model_parallel_rank() == 0
        tokens = next(data_iterator)
        tokens = tensor_parallel.broadcast_data(["tokens"], {"tokens": tokens} if first else None,
                                                torch.int64)["tokens"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        teacher_logits = models.forward_logits(teacher, inputs)
        assert teacher_logits.grad_fn is None and not teacher_logits.requires_grad
        logits = model(inputs, models.default_position_ids(inputs), None)

        def loss_func(student_logits):
            nll = -vocab_parallel_logprob(student_logits, labels, vocab_size=STUDENT.vocab_size).mean()
            kl = vocab_parallel_kl(student_logits, teacher_logits, vocab_size=STUDENT.vocab_size).mean()
            loss = nll + 0.1 * kl
            return loss, {"loss": loss.detach().clone()}

        return logits, loss_func

    return forward_step


def _global_loss(outputs) -> float:
    """Mean micro-batch loss of this step, averaged over DP, on every rank (the schedule returns
    the losses on the last pipeline stage only)."""
    from megatron.core import parallel_state

    value = torch.zeros(1)
    if parallel_state.is_pipeline_last_stage():
        value += sum(float(o["loss"]) for o in outputs) / len(outputs)
    dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return float(value) / parallel_state.get_data_parallel_world_size()


def train(ddp_chunks, optimizer, scheduler, steps, seed: int, forward_step=_ce_forward_step) -> list:
    """Training steps with Megatron's schedule (NUM_MB micro-batches); returns each step's loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = []
    for step in steps:
        batch = _batch(seed, step)
        micro = [batch[i * MBS:(i + 1) * MBS] for i in range(NUM_MB)]
        iterators = [iter(micro) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(micro)
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=list(ddp_chunks),
            num_microbatches=NUM_MB, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        update_ok, _, _ = optimizer.step()
        assert update_ok, "optimizer step skipped"
        scheduler.step(increment=1)
        losses.append(_global_loss(outputs))
    return losses


def _scheduler(optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(optimizer, init_lr=LR / 10, max_lr=LR, min_lr=LR / 10,
                                   lr_warmup_steps=2, lr_decay_steps=20, lr_decay_style="cosine",
                                   start_wd=0.01, end_wd=0.01, wd_incr_steps=20, wd_incr_style="constant")


def build_student(cfg=STUDENT, *, distributed_optimizer=False, overlap=False, bucket_size=None,
                  **transformer_overrides):
    chunks = models.build_model_chunks(cfg, **transformer_overrides)
    ddp = parallel.wrap_ddp(chunks, use_distributed_optimizer=distributed_optimizer,
                            overlap_grad_reduce=overlap, bucket_size=bucket_size)
    optimizer = parallel.build_optimizer(ddp, lr=LR, min_lr=LR / 10, weight_decay=0.01,
                                         use_distributed_optimizer=distributed_optimizer)
    return ddp, optimizer, _scheduler(optimizer)


def _params(chunks) -> dict:
    return {f"{i}.{name}": p.detach().clone() for i, c in enumerate(chunks)
            for name, p in models.unwrap(c).named_parameters()}


def _param_digest(chunks) -> list:
    """Per-parameter sums in float64, gathered over all ranks (comparable across processes)."""
    local = [[name, float(p.double().sum()), float(p.double().abs().sum())]
             for name, p in sorted(_params(chunks).items())]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _eval_loss(chunks, seed: int) -> float:
    """Loss of a fixed batch, no update (compares one model's weights across layouts)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()
    batch = _batch(seed, 10_000, dp_rank=0)  # the same batch on every DP rank
    micro = [batch[i * MBS:(i + 1) * MBS] for i in range(NUM_MB)]
    iterators = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
    outputs = get_forward_backward_func()(
        forward_step_func=_ce_forward_step, data_iterator=iterators, model=list(chunks),
        num_microbatches=NUM_MB, seq_length=SEQ, micro_batch_size=MBS, forward_only=True)
    for chunk in chunks:
        chunk.train()
    return _global_loss(outputs)


def _assert_decreasing(losses) -> None:
    assert losses[-1] < losses[0] - 0.05, f"loss did not decrease: {losses}"


# ---- launch 1: train -----------------------------------------------------------------------


def _build_checks(seed: int) -> dict:
    """Presets at TP=2: shapes, padding, GQA, qkv bias, q/k norm, tying (one check each)."""
    checks = {}
    for family in ("llama", "qwen2", "qwen3"):
        for tied in (True, False):
            checks[f"build_{family}_{'tied' if tied else 'untied'}_tp2"] = \
                lambda f=family, t=tied: _check_preset(f, t, seed)
    return checks


def _check_preset(family: str, tied: bool, seed: int) -> None:
    from megatron.core.transformer.identity_op import IdentityOp

    tp = platform.layout().tp
    cfg = models.ModelConfig.preset(family, **SIZES, untie_embeddings_and_output_weights=not tied)
    model = models.build_gpt_model(cfg)
    padded = cfg.padded_vocab_size(tp)
    assert padded == 256, padded
    kv = cfg.hidden_size // cfg.num_attention_heads
    layer = model.decoder.layers[0]
    qkv = layer.self_attention.linear_qkv
    assert model.embedding.word_embeddings.weight.shape == (padded // tp, cfg.hidden_size)
    assert qkv.weight.shape == ((cfg.num_attention_heads + 2 * cfg.query_groups) * kv // tp, cfg.hidden_size)
    assert (qkv.bias is not None) == (family == "qwen2"), f"qkv bias: {qkv.bias}"
    assert layer.self_attention.linear_proj.bias is None and layer.mlp.linear_fc2.bias is None
    assert layer.mlp.linear_fc1.bias is None
    assert layer.mlp.linear_fc1.weight.shape == (2 * cfg.ffn_size // tp, cfg.hidden_size)  # SwiGLU
    q_norm = layer.self_attention.q_layernorm  # None (0.19) or IdentityOp (0.16) when absent
    has_qk_norm = q_norm is not None and not isinstance(q_norm, IdentityOp)
    assert has_qk_norm == (family == "qwen3")
    if has_qk_norm:
        assert isinstance(layer.self_attention.k_layernorm, torch.nn.RMSNorm)
        assert layer.self_attention.q_layernorm.weight.shape == (kv,)
    assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)
    assert model.share_embeddings_and_output_weights == tied
    assert (model.output_layer.weight is None) == tied
    assert model.rotary_pos_emb is not None and model.rotary_base == cfg.rotary_base
    ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(seed))
    logits = models.forward_logits(models.freeze(model), ids)
    assert logits.shape == (3, 7, padded // tp) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def _tp2_phase(results: dict, data: dict, seed: int) -> None:
    _setup(2, 1, seed)
    from megatron.core import parallel_state

    run_checks(_build_checks(seed), results)

    def bad_heads():
        cfg = models.ModelConfig.preset("llama", **{**SIZES, "num_attention_heads": 2, "num_query_groups": 1})
        try:
            models.build_gpt_model(cfg)
        except ValueError as exc:
            assert "num_query_groups 1 is not divisible by TP=2" in str(exc), str(exc)
        else:
            raise AssertionError("a model with 1 key/value head was built at TP=2")

    def gathered_logits():
        platform.seed_everything(seed + 1)
        model = models.freeze(models.build_gpt_model(STUDENT))
        ids = torch.randint(0, STUDENT.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
        local = models.forward_logits(model, ids)
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
        data["tp2_logits"] = torch.cat(parts, dim=-1)

    def train_with_frozen_teacher():
        platform.seed_everything(seed)
        teacher = models.freeze(models.build_gpt_model(TEACHER))
        models.check_same_vocab(STUDENT, TEACHER, tp=2)
        before = _params([teacher])
        ddp, optimizer, scheduler = build_student()
        assert models.offload_to_cpu(teacher) is teacher and models.load_to_device(teacher) is teacher
        losses = train(ddp, optimizer, scheduler, range(6), seed, _distill_forward_step(teacher))
        _assert_decreasing(losses)
        after = _params([teacher])
        assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights changed"
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        assert not teacher.training
        data["tp2_losses"] = losses

    def resume_phase1():
        _resume_phase1("tp2", seed, distributed_optimizer=False)

    def save_for_reshard():
        platform.seed_everything(seed + 2)
        ddp, optimizer, scheduler = build_student()
        train(ddp, optimizer, scheduler, range(2), seed)
        checkpoint.save_checkpoint(shared_dir() / "ckpt_tp2", 2, ddp, optimizer, scheduler,
                                   extra_state={"origin": "tp2"})
        _save_json("ckpt_tp2.json", {"eval_loss": _eval_loss(ddp, seed)})

    def shims_idempotent():
        import importlib

        before = platform.shims_applied()
        modules = {site.where.split(":")[0] for report in before.values() for site in report.call_sites}
        views = {m: importlib.import_module(m).torch for m in modules}
        again = platform.apply_cpu_shims()
        assert again.keys() == before.keys() and all(again[n] is before[n] for n in again)
        assert all(importlib.import_module(m).torch is views[m] for m in modules)
        assert torch.Tensor.type is platform._type_seen_by_megatron_optimizer
        assert torch.zeros(1).type() == "torch.FloatTensor"  # unchanged outside megatron's optimizer

    run_checks({"apply_cpu_shims_is_idempotent": shims_idempotent,
                "bad_config_heads_not_divisible_by_tp": bad_heads,
                "tp2_logits_for_tp1_comparison": gathered_logits,
                "train_tp2_frozen_teacher": train_with_frozen_teacher,
                "resume_tp2_phase1": resume_phase1,
                "save_tp2_for_reshard": save_for_reshard}, results)
    platform.destroy_parallel()


def _resume_phase1(tag: str, seed: int, *, distributed_optimizer: bool) -> None:
    """N steps uninterrupted; then from the same start N/2 steps and a checkpoint (phase 2 loads
    it in fresh processes and runs the other N/2 steps)."""
    n = 4
    platform.seed_everything(seed + 3)
    ddp, optimizer, scheduler = build_student(distributed_optimizer=distributed_optimizer,
                                              overlap=distributed_optimizer)
    full = train(ddp, optimizer, scheduler, range(n), seed)
    digest = _param_digest(ddp)
    platform.seed_everything(seed + 3)
    ddp, optimizer, scheduler = build_student(distributed_optimizer=distributed_optimizer,
                                              overlap=distributed_optimizer)
    half = train(ddp, optimizer, scheduler, range(n // 2), seed)
    assert half == full[:n // 2], (half, full)
    checkpoint.save_checkpoint(shared_dir() / f"resume_{tag}", n // 2, ddp, optimizer, scheduler,
                               extra_state={"next_step": n // 2})
    _save_json(f"resume_{tag}.json", {"losses": full, "digest": digest, "steps": n})


def _pp2_phase(results: dict, seed: int) -> None:
    _setup(1, 2, seed)

    def train_pp2_with_recompute():
        ddp, optimizer, scheduler = build_student(recompute_granularity="full", recompute_method="uniform",
                                                  recompute_num_layers=1)
        _assert_decreasing(train(ddp, optimizer, scheduler, range(6), seed))

    def train_pp2_interleaved():
        platform.destroy_parallel()
        _setup(1, 2, seed, vpp=2)
        cfg = models.ModelConfig.preset("qwen3", **{**SIZES, "num_layers": 4})
        ddp, optimizer, scheduler = build_student(cfg)
        assert len(ddp) == 2
        _assert_decreasing(train(ddp, optimizer, scheduler, range(6), seed))
        platform.destroy_parallel()
        _setup(1, 2, seed)

    def save_for_reshard():
        platform.seed_everything(seed + 4)
        ddp, optimizer, scheduler = build_student()
        train(ddp, optimizer, scheduler, range(2), seed)
        checkpoint.save_checkpoint(shared_dir() / "ckpt_pp2", 2, ddp, optimizer, scheduler)
        _save_json("ckpt_pp2.json", {"eval_loss": _eval_loss(ddp, seed)})

    def stages_initialize_differently():
        # Megatron-LM's rule: each stage seeds with seed + 100 * pp_rank, so that no stage draws
        # its weights (from scratch) or dropout masks from another stage's random stream
        from megatron.core import parallel_state

        platform.seed_everything(seed + 7)
        seeds = [None, None]
        dist.all_gather_object(seeds, torch.initial_seed(), group=parallel_state.get_pipeline_model_parallel_group())
        assert seeds == [seed + 7, seed + 107], seeds

    run_checks({"pp2_stages_initialize_differently": stages_initialize_differently,
                "train_pp2_activation_recompute": train_pp2_with_recompute,
                "train_pp2_vpp2_interleaved": train_pp2_interleaved,
                "save_pp2_for_reshard": save_for_reshard}, results)
    platform.destroy_parallel()


def _dp2_phase(results: dict, data: dict, seed: int) -> None:
    _setup(1, 1, seed)

    def train_dp2_distributed_optimizer():
        ddp, optimizer, scheduler = build_student(distributed_optimizer=True, overlap=True)
        _assert_decreasing(train(ddp, optimizer, scheduler, range(6), seed))

    def tp1_logits_equal_tp2():
        platform.seed_everything(seed + 1)
        model = models.freeze(models.build_gpt_model(STUDENT))
        ids = torch.randint(0, STUDENT.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(models.forward_logits(model, ids), data["tp2_logits"],
                                   rtol=1e-5, atol=1e-5)

    def resume_phase1():
        _resume_phase1("dp2", seed, distributed_optimizer=True)

    def accumulated_step_overlap():
        _accumulated_step_overlap(seed)

    def bad_world_size():
        platform.destroy_parallel()
        try:
            platform.initialize_parallel(tp=3, pp=1)
        except ValueError as exc:
            assert "does not divide the world size 2" in str(exc), str(exc)
        else:
            raise AssertionError("TP=3 was accepted on 2 ranks")
        _setup(1, 1, seed)

    run_checks({"train_dp2_distributed_optimizer": train_dp2_distributed_optimizer,
                "tp1_logits_equal_gathered_tp2": tp1_logits_equal_tp2,
                "resume_dp2_distributed_optimizer_phase1": resume_phase1,
                "accumulated_step_overlap_grad_reduce": accumulated_step_overlap,
                "bad_config_tp_not_dividing_world_size": bad_world_size,
                "bf16_dp2_regular_optimizer": lambda: _bf16_check(seed, distributed_optimizer=False),
                "bf16_dp2_distributed_optimizer": lambda: _bf16_check(seed, distributed_optimizer=True),
                }, results)
    platform.destroy_parallel()


def _accumulated_step_overlap(seed: int) -> None:
    """AccumulatedStep (one step's gradients over several schedule calls) with overlap_grad_reduce
    in several buckets, at DP=2, over steps whose number of calls varies: the updates equal those
    without overlap. Megatron counts each parameter's ready gradients in the first step and starts
    a bucket's reduction when that count is reached again, so a call other than the step's last
    must register none (else a step with fewer calls never reduces, one with more reduces early)."""
    from scope_megatron.ops import vocab_parallel_logprob
    from scope_megatron.training.schedule import AccumulatedStep, MicroBatch, position_ids_for

    cfg = dataclasses.replace(STUDENT, hidden_dropout=0.0, attention_dropout=0.0)

    def loss_fn(mb, logits):
        logprobs = vocab_parallel_logprob(logits, mb.extra["labels"], vocab_size=STUDENT.vocab_size)
        return -logprobs.sum(), torch.tensor(logprobs.numel()), {}

    def updates(distributed: bool, overlap: bool) -> list:
        platform.seed_everything(seed + 7)
        ddp, optimizer, _ = build_student(cfg, distributed_optimizer=distributed, overlap=overlap,
                                          bucket_size=3000 if overlap else None, calculate_per_token_loss=True)
        if overlap:
            assert len(ddp[0].buffers[0].buckets) > 2, len(ddp[0].buffers[0].buckets)
        digests = []
        for step, calls in enumerate(([2, 1, 1], [4], [1, 3], [1, 1, 1, 1])):  # micro-batches per call
            rows = _batch(seed, step)
            mbs = [MicroBatch(r[None, :-1], position_ids_for(r[None, :-1]), {"labels": r[None, 1:]}) for r in rows]
            assert len(mbs) == sum(calls)
            for chunk in ddp:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            accumulated, start = AccumulatedStep(ddp), 0
            for i, n in enumerate(calls):
                accumulated.run(mbs[start:start + n], loss_fn, last=i == len(calls) - 1)
                start += n
            update_ok, _, _ = optimizer.step()
            assert update_ok, "optimizer step skipped"
            digests.append(_param_digest(ddp))
        return digests

    for distributed in (False, True):
        want, got = updates(distributed, False), updates(distributed, True)
        for step, (a, b) in enumerate(zip(want, got)):
            for rank_a, rank_b in zip(a, b):
                for (name, s1, a1), (_, s2, a2) in zip(rank_a, rank_b):
                    assert abs(s1 - s2) <= 1e-6 * max(1.0, abs(s1)) and abs(a1 - a2) <= 1e-6 * max(1.0, a1), \
                        (distributed, step, name, s1, s2)


def _bf16_check(seed: int, *, distributed_optimizer: bool) -> None:
    """bf16 training, the GPU default, on CPU: every parameter bf16 (the norms too), a checkpoint
    saved after steps (an fp32 parameter broke megatron's optimizer map: "Param id N does not
    match any model sharded param"), a resume that continues identically, and a weights-only
    start whose first step starts from the loaded weights (the optimizer's fp32 main copies were
    the initialization's, and the first step wrote them back)."""
    bf16 = dict(distributed_optimizer=distributed_optimizer, params_dtype=torch.bfloat16)
    platform.seed_everything(seed + 5)
    ddp, optimizer, scheduler = build_student(**bf16)
    dtypes = {name: p.dtype for name, p in _params(ddp).items() if p.dtype != torch.bfloat16}
    assert not dtypes, f"parameters not in bf16: {dtypes}"
    _assert_decreasing(train(ddp, optimizer, scheduler, range(6), seed))
    root = shared_dir() / f"ckpt_bf16_{'dist' if distributed_optimizer else 'regular'}"
    checkpoint.save_checkpoint(root, 6, ddp, optimizer, scheduler)
    trained = _params(ddp)

    platform.seed_everything(seed + 6)
    resumed = build_student(**bf16)
    checkpoint.load_checkpoint(root, *resumed)
    for name, value in _params(resumed[0]).items():
        assert torch.equal(value, trained[name]), f"{name} differs after the resume"
    rng = platform.rng_state()  # restored by the load: the saved one, for both next steps
    after_resume = train(*resumed, [6], seed)
    platform.set_rng_state(rng)
    assert after_resume == train(ddp, optimizer, scheduler, [6], seed), "the resumed run's next step differs"

    platform.seed_everything(seed + 7)
    ddp, optimizer, scheduler = build_student(**bf16)
    init = _params(ddp)
    checkpoint.load_weights(root, ddp, optimizer)
    train(ddp, optimizer, scheduler, [6], seed)
    norm = lambda params: sum(float(p.double().norm()) ** 2 for p in params) ** 0.5
    moved = norm(value - trained[name] for name, value in _params(ddp).items())
    gap = norm(trained[name] - init[name] for name in trained)
    assert moved < 0.25 * gap, (f"one step after a weights-only load moved {moved:.3g} from the "
                                f"loaded weights, which are {gap:.3g} from the initialization")


def train_launch(ctx) -> dict:
    results, data = {}, {}
    _tp2_phase(results, data, ctx.seed)
    _pp2_phase(results, ctx.seed)
    _dp2_phase(results, data, ctx.seed)
    return {"checks": results, "hits": _shim_hits()}


# ---- launch 3: resume ----------------------------------------------------------------------


def _resume_phase2(tag: str, seed: int, *, distributed_optimizer: bool) -> None:
    expected = _load_json(f"resume_{tag}.json")
    n = expected["steps"]
    platform.seed_everything(seed + 99)  # a different start: everything must come from the checkpoint
    ddp, optimizer, scheduler = build_student(distributed_optimizer=distributed_optimizer,
                                              overlap=distributed_optimizer)
    state = checkpoint.load_checkpoint(shared_dir() / f"resume_{tag}", ddp, optimizer, scheduler)
    assert state == {"step": n // 2, "next_step": n // 2}, state
    rest = train(ddp, optimizer, scheduler, range(state["next_step"], n), seed)
    uninterrupted = expected["losses"][n // 2:]
    assert rest == uninterrupted, f"resumed {rest} != uninterrupted {uninterrupted}"
    assert _param_digest(ddp) == expected["digest"], "parameters differ from the uninterrupted run"


def _reshard_check(name: str, seed: int) -> None:
    """Loads a checkpoint saved in another layout; the fixed-batch loss must match the one
    measured at save time (the weights were resharded, not scrambled)."""
    ddp, optimizer, scheduler = build_student()
    expected = _load_json(f"{name}.json")["eval_loss"]
    state = checkpoint.load_checkpoint(shared_dir() / name, ddp, optimizer, scheduler)
    assert state["step"] == 2
    got = _eval_loss(ddp, seed)
    assert abs(got - expected) < 1e-5, f"loss after resharding {got} != {expected}"
    train(ddp, optimizer, scheduler, range(2, 3), seed)  # the loaded optimizer state steps


def _bad_checkpoint_checks(seed: int) -> dict:
    def expect(exc_type, text, fn):
        try:
            fn()
        except exc_type as exc:
            assert text in str(exc), str(exc)
        else:
            raise AssertionError(f"no {exc_type.__name__} ({text!r})")

    def other_model():
        cfg = models.ModelConfig.preset("qwen2", **SIZES)
        model = models.build_gpt_model(cfg)
        expect(checkpoint.CheckpointError, "was saved from a different model",
               lambda: checkpoint.load_checkpoint(shared_dir() / "ckpt_tp2", [model]))

    def other_padding():
        # padding rows may differ between a checkpoint and the model (256 -> 512 rows at TP=2):
        # the real vocabulary's rows load unchanged
        from megatron.core import parallel_state

        def real_rows(cfg):
            model = models.build_gpt_model(cfg)
            checkpoint.load_checkpoint(shared_dir() / "ckpt_tp2", [model])
            shard = model.embedding.word_embeddings.weight
            start = parallel_state.get_tensor_model_parallel_rank() * shard.shape[0]
            return {start + i: shard[i] for i in range(shard.shape[0]) if start + i < SIZES["vocab_size"]}

        same = real_rows(STUDENT)
        wider = real_rows(dataclasses.replace(STUDENT, make_vocab_size_divisible_by=256))
        for gid in sorted(set(same) & set(wider)):
            assert torch.equal(same[gid], wider[gid]), gid
        assert wider or parallel_state.get_tensor_model_parallel_rank() > 0, "rank 0 holds real rows"

    def distributed_vs_regular_optimizer():
        ddp, optimizer, _ = build_student(distributed_optimizer=True)
        expect(checkpoint.CheckpointError, "regular optimizer but a distributed one was passed",
               lambda: checkpoint.load_checkpoint(shared_dir() / "ckpt_tp2", ddp, optimizer))

    def distributed_optimizer_across_tp():
        ddp, optimizer, _ = build_student(distributed_optimizer=True)
        expect(checkpoint.CheckpointError, "reshards across DP only",
               lambda: checkpoint.load_checkpoint(shared_dir() / "resume_dp2", ddp, optimizer))

    def weights_only():
        model = models.build_gpt_model(STUDENT)
        rng = torch.get_rng_state()
        state = checkpoint.load_checkpoint(shared_dir() / "ckpt_tp2", [model])
        assert state == {"step": 2, "origin": "tp2"}, state
        assert torch.equal(rng, torch.get_rng_state()), "a weights-only load changed the RNG"

    return {"load_error_different_model": other_model,
            "load_different_vocab_padding": other_padding,
            "load_error_optimizer_kind_mismatch": distributed_vs_regular_optimizer,
            "load_error_distributed_optimizer_across_tp": distributed_optimizer_across_tp,
            "load_weights_only": weights_only}


def _killed_root_loads(point: str, seed: int) -> None:
    """What a save killed at `point` (mc_kill_saver, one process) left behind: `latest` names a
    complete checkpoint, which loads (resharded to this layout) with the recorded weights."""
    root = shared_dir() / f"killed_{point}"
    expected = _load_json(f"killed_{point}.json")["eval_loss"]
    info = checkpoint.checkpoint_info(root)
    if point != "outside":
        assert (root / checkpoint.LATEST).read_text() == "iter_0000001\n"
    ddp, optimizer, scheduler = build_student()
    state = checkpoint.load_checkpoint(root, ddp, optimizer, scheduler)
    assert state["step"] == info["step"]
    assert state == ({"step": 1, "tag": "good"} if state["step"] == 1 else {"step": state["step"]}), state
    want = expected["1"] if state["step"] == 1 else expected["later"]
    got = _eval_loss(ddp, seed)
    assert abs(got - want) < 1e-5, f"loaded weights give loss {got}, saved {want}"


def _next_save_repairs(point: str, leftover: str) -> None:
    """The next saves after a kill remove the interrupted save's leftovers, replace an orphaned
    complete directory, prune with keep_last and refuse to overwrite `latest` in place."""
    root = shared_dir() / f"killed_{point}"
    names = sorted(p.name for p in root.iterdir())
    assert leftover in names, names
    ddp, optimizer, scheduler = build_student()
    checkpoint.save_checkpoint(root, 2, ddp, optimizer, scheduler, keep_last=2)
    checkpoint.save_checkpoint(root, 3, ddp, optimizer, scheduler, keep_last=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["iter_0000002", "iter_0000003", "latest"], names
    try:
        checkpoint.save_checkpoint(root, 3, ddp, optimizer, scheduler)
    except checkpoint.CheckpointError as exc:
        assert "is the latest checkpoint" in str(exc), str(exc)
    else:
        raise AssertionError("the latest checkpoint was overwritten in place")


def resume_launch(ctx) -> dict:
    from tests.training.mc_kill_saver import KILL_POINTS

    results = {}
    _setup(2, 1, ctx.seed)
    run_checks({"resume_tp2_equals_uninterrupted":
                lambda: _resume_phase2("tp2", ctx.seed, distributed_optimizer=False),
                "reshard_pp2_to_tp2": lambda: _reshard_check("ckpt_pp2", ctx.seed),
                **_bad_checkpoint_checks(ctx.seed),
                **{f"killed_{point}_latest_loads": lambda p=point: _killed_root_loads(p, ctx.seed)
                   for point in KILL_POINTS},
                "next_save_removes_interrupted_save":
                lambda: _next_save_repairs("before_rename", ".tmp-iter_0000002"),
                "next_save_replaces_orphaned_checkpoint":
                lambda: _next_save_repairs("before_latest", "iter_0000002")},
               results)
    platform.destroy_parallel()

    _setup(1, 1, ctx.seed)
    run_checks({"resume_dp2_distributed_optimizer_equals_uninterrupted":
                lambda: _resume_phase2("dp2", ctx.seed, distributed_optimizer=True),
                "reshard_tp2_to_tp1_dp2": lambda: _reshard_check("ckpt_tp2", ctx.seed)}, results)
    platform.destroy_parallel()

    _setup(1, 2, ctx.seed)
    run_checks({"reshard_tp2_to_pp2": lambda: _reshard_check("ckpt_tp2", ctx.seed)}, results)
    platform.destroy_parallel()
    return {"checks": results, "hits": _shim_hits()}
