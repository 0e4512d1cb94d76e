"""Workers of test_trainer.py: whole training runs of the embedded default (shortened) inside
real gloo process groups (tests/distributed.py). Each returns plain data the test asserts on."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from scope_megatron.training.config import load_config
from scope_megatron.training.trainer import Trainer
from scope_megatron.utils.logging import read_metrics

REPO = Path(__file__).resolve().parents[2]
SHORT = ["--prompts-per-step", "4", "--n-samples-per-prompt", "4", "--micro-batch-size", "8",
         "--eval-num-prompts", "8", "--eval-k", "4", "--eval-pass-ks", "1,4", "--rollout-max-response-len", "36",
         "--load", str(REPO / "checkpoints/toy/student"), "--teacher-load", str(REPO / "checkpoints/toy/teacher")]


def _run_dir(ctx, name: str) -> Path:
    path = Path(f"/tmp/scope-trainer-test-{ctx.seed}-{name}")
    if dist.get_rank() == 0 and path.exists():
        shutil.rmtree(path)
    dist.barrier()
    return path


def _train(ctx, run_dir: Path, flags, *, iters: int):
    cfg = load_config(SHORT + ["--train-iters", str(iters), "--log-dir", str(run_dir / "logs"),
                               "--save", str(run_dir / "ckpt"), "--seed", str(ctx.seed % 100000)] + flags)
    trainer = Trainer(cfg)
    teacher = [p.detach().clone() for c in trainer.teacher for p in c.parameters()]
    try:
        returned = trainer.run()
        # frozen: no gradient, in eval mode (no dropout), and out of the optimizer's reach
        optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        frozen = (all(not p.requires_grad and p.grad is None and id(p) not in optimized
                      for c in trainer.teacher for p in c.parameters())
                  and not any(m.training for c in trainer.teacher for m in c.modules())
                  and len(optimized) > 0)
        unchanged = all(torch.equal(a, b) for a, b in
                        zip(teacher, [p for c in trainer.teacher for p in c.parameters()]))
        layout = trainer.layout
    finally:
        trainer.close()
    records = read_metrics(run_dir / "logs" / "metrics.jsonl") if dist.get_rank() == 0 else []
    return {"frozen_teacher": frozen, "teacher_unchanged": unchanged,
            "layout": [layout.tp, layout.pp, layout.dp],
            "loss": [[r["step"], r["loss"]] for r in records if "loss" in r],
            "kl": [[r["step"], r["kl/mean"]] for r in records if "kl/mean" in r],
            "eval": [[r["step"], r["eval/Avg@4"]] for r in records if "eval/Avg@4" in r],
            "lr": [[r["step"], r["lr"]] for r in records if "lr" in r],
            "checkpoints": sorted(p.name for p in (run_dir / "ckpt").glob("iter_*")),
            "returned": returned if dist.get_rank() == 0 else None}


def layouts(ctx):
    """The default run shortened, at TP=2, PP=2 and DP=2 (2 processes), and a resume."""
    out = {}
    for name, flags in (("tp2", ["--tensor-model-parallel-size", "2"]),
                        ("pp2", ["--pipeline-model-parallel-size", "2"]),
                        ("dp2", [])):
        out[name] = _train(ctx, _run_dir(ctx, name), flags + ["--eval-interval", "2", "--save-interval", "2"],
                           iters=3)
    # resume: 2 steps, stop, continue to 4 == 4 steps uninterrupted (TP=2, fresh Trainer objects)
    tp2 = ["--tensor-model-parallel-size", "2", "--save-interval", "2", "--eval-interval", "0"]
    out["uninterrupted"] = _train(ctx, _run_dir(ctx, "full"), tp2, iters=4)
    part = _run_dir(ctx, "part")
    out["first_half"] = _train(ctx, part, tp2, iters=2)
    out["resumed"] = _train(ctx, part, tp2, iters=4)
    # the same command once more: the run is complete, nothing is trained or logged, and the
    # metrics logged at its last step come back
    out["again"] = _train(ctx, part, tp2, iters=4)
    return out


def bf16(ctx):
    """The GPU default, bf16, on CPU at TP=2 (2 processes): 4 steps from the toy checkpoint with
    checkpoints at steps 2 and 4."""
    return _train(ctx, _run_dir(ctx, "bf16"), ["--precision", "bf16", "--tensor-model-parallel-size", "2",
                                              "--save-interval", "2", "--eval-interval", "0"], iters=4)


def learning(ctx):
    """At DP=2, for 6 steps: the SCOPE loss of each step's batch before and after its update."""
    from scope_megatron.training.step import evaluate_loss, train_step

    run_dir = _run_dir(ctx, "learn")
    # beta1=0 and a small lr: each update is the gradient rescaled per element by a positive
    # factor (no momentum from earlier batches), so to first order it must lower this batch's loss
    cfg = load_config(SHORT + ["--log-dir", str(run_dir / "logs"), "--save", "null",
                               "--lr", "2e-5", "--adam-beta1", "0", "--seed", str(ctx.seed % 100000)])
    trainer = Trainer(cfg)
    before, after = [], []
    try:
        for step in range(6):
            batches, _, _ = trainer.prepare(step)
            kw = dict(scope=cfg.scope, vocab_size=cfg.student.vocab_size)
            before.append(evaluate_loss(trainer.student, batches, **kw))
            train_step(trainer.student, trainer.optimizer, trainer.scheduler, batches, **kw)
            after.append(evaluate_loss(trainer.student, batches, **kw))
    finally:
        trainer.close()
    return {"before": before, "after": after}


def paddings(ctx):
    """The toy teacher checkpoint (32 padded rows) loaded at TP=2 into teachers padded to 32 and
    to 40 rows: the real vocabulary's logits agree (padding rows may differ between checkpoint and
    model, e.g. a teacher built with the student's padding)."""
    import dataclasses

    from scope_megatron.training import checkpoint, models, platform
    from scope_megatron.training.config import toy_teacher
    from scope_megatron.training.schedule import gather_vocab_shards

    platform.init_distributed()
    platform.apply_cpu_shims()
    platform.initialize_parallel(2, 1)
    platform.seed_everything(ctx.seed % 100000)
    try:
        tokens = torch.randint(3, 18, (2, 12), generator=torch.Generator().manual_seed(ctx.seed))
        logits = []
        for padded in (32, 40):
            chunk = models.freeze(models.build_model_chunks(dataclasses.replace(toy_teacher(), padded_vocab=padded))[0])
            checkpoint.load_checkpoint(REPO / "checkpoints/toy/teacher", [chunk])
            logits.append(gather_vocab_shards(models.forward_logits(chunk, tokens)))
        return {"shapes": [list(x.shape) for x in logits],
                "max_diff": float((logits[0][..., :18] - logits[1][..., :18]).abs().max()),
                "scale": float(logits[0][..., :18].abs().max())}
    finally:
        platform.destroy_parallel()


def decoding(ctx):
    """LocalEngine on the toy student at TP=2 and at PP=2: the KV-cache path samples what full
    recompute (micro-batched) samples."""
    from scope_megatron.data.toy_arithmetic import ToyArithmetic, ToyArithmeticConfig
    from scope_megatron.rollout import LocalEngine, SamplingParams
    from scope_megatron.training import checkpoint, models, platform
    from scope_megatron.training.config import toy_student
    from scope_megatron.training.schedule import MegatronDecoder

    platform.init_distributed()
    platform.apply_cpu_shims()
    world = ToyArithmetic(ToyArithmeticConfig())
    prompts = [world.prompt_ids(p) for p in world.held_out[:4]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=34, stop_token_ids=(world.tokenizer.eos_id,),
                            seed=ctx.seed % 100000)
    out = {}
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        platform.initialize_parallel(tp, pp)
        platform.seed_everything(0)
        try:
            chunks = models.build_model_chunks(toy_student())
            checkpoint.load_checkpoint(REPO / "checkpoints/toy/student", chunks)
            decoder = MegatronDecoder(chunks, vocab_size=world.tokenizer.vocab_size, micro_batch_size=5,
                                      pad_id=world.tokenizer.pad_id)

            class FullRecompute:  # the same decoder without its KV cache
                vocab_size = decoder.vocab_size
                next_token_logits = decoder.next_token_logits
                share = decoder.share

            a = LocalEngine(decoder, pad_id=world.tokenizer.pad_id).generate(prompts, params, key=1)
            b = LocalEngine(FullRecompute(), pad_id=world.tokenizer.pad_id).generate(prompts, params, key=1)
            out[name] = {"same_ids": bool(torch.equal(a.response_ids, b.response_ids)),
                         "logprob_diff": float((a.logprobs - b.logprobs).abs().max()),
                         "finished": float(a.finished.float().mean())}
        finally:
            platform.destroy_parallel()
    return out


def _toy_prompt_files(root: Path) -> dict:
    """The toy world as a 'prompts' task: its tokenizer as an HF tokenizer, training and held-out
    problems as JSONL files (written by rank 0)."""
    import json

    from scope_megatron.convert import save_char_tokenizer
    from scope_megatron.data.toy_arithmetic import ToyArithmetic

    world = ToyArithmetic()
    paths = {"tokenizer": root / "tokenizer", "train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        save_char_tokenizer(world.tokenizer, paths["tokenizer"])
        train = world.train_problems(0, 64, seed=7)
        paths["train"].write_text("".join(json.dumps({"question": world.prompt_text(p), "answer": world.answer(p)})
                                          + "\n" for p in train))
        paths["eval"].write_text("".join(json.dumps({"problem": world.prompt_text(p), "answer": int(world.answer(p))})
                                         + "\n" for p in world.held_out[:8]))
    dist.barrier()
    return paths


def prompt_task(ctx):
    """The 'prompts' task (a JSONL file through an HF tokenizer) trains at DP=2 like the toy task:
    its prompts are the toy prompt ids, rewards are graded, held-out evaluation runs."""
    from scope_megatron.data.toy_arithmetic import ToyArithmetic

    run_dir = _run_dir(ctx, "prompts")
    files = _toy_prompt_files(run_dir / "data")
    flags = ["--task-name", "prompts", "--task-train-data", str(files["train"]), "--task-eval-data",
             str(files["eval"]), "--task-tokenizer", str(files["tokenizer"]), "--task-prompt-suffix", "",
             "--task-chat-template", "false", "--task-max-prompt-len", "16", "--eval-interval", "2"]
    cfg = load_config(SHORT + ["--train-iters", "2", "--log-dir", str(run_dir / "logs"), "--save", "null",
                               "--seed", str(ctx.seed % 100000)] + flags)
    trainer = Trainer(cfg)
    world = ToyArithmetic()
    try:
        items = trainer.task.train_items(0, 4, cfg.training.seed)
        toy_ids = {tuple(world.prompt_ids(p)) for p in world.train_problems(0, 64, seed=7)}
        same_ids = all(i.prompt_ids in toy_ids for i in items)
        trainer.run()
    finally:
        trainer.close()
    records = read_metrics(run_dir / "logs" / "metrics.jsonl") if dist.get_rank() == 0 else []
    return {"same_ids": same_ids, "stop_ids": list(trainer.task.stop_ids), "pad_id": trainer.task.pad_id,
            "steps": [r["step"] for r in records if "loss" in r],
            "eval": [[r["step"], r["eval/Avg@4"]] for r in records if "eval/Avg@4" in r]}


def sglang(ctx):
    """rollout.engine 'sglang' and teacher_serving.engine 'sglang' against the protocol-faithful
    test servers (tests/rollout/fake_sglang_server.py, run by rank 0) holding the toy student and
    teacher as HF models: at DP=2 and TP=2 (weights through disk), PP=2 (weights as tensors),
    TP=2 with the top-k estimator from the served teacher's top-k, and TP=2 sampling at
    temperature 0.6 while training at 1, 2 steps with an evaluation each."""
    from scope_megatron.convert import export_hf, write_toy_template
    from scope_megatron.training.checkpoint import checkpoint_info
    from tests.rollout.fake_sglang_server import FakeSGLangServer, toy_hf_dir

    root = _run_dir(ctx, "sglang")
    servers, info = [], [None]
    if dist.get_rank() == 0:
        teacher_ckpt = REPO / "checkpoints/toy/teacher"
        write_toy_template(checkpoint_info(teacher_ckpt)["model_config"], root / "teacher-template")
        export_hf(teacher_ckpt, root / "teacher-template", root / "teacher-hf")
        student_hf = toy_hf_dir()
        servers = [FakeSGLangServer(student_hf).start(), FakeSGLangServer(root / "teacher-hf").start()]
        info[0] = {"student_hf": str(student_hf), "urls": [s.url for s in servers]}
    dist.broadcast_object_list(info, src=0)
    import scope_megatron.rollout.sglang.weight_sync as weight_sync
    from tests.rollout.fake_sglang_server import PickleSerializer

    # the tensor path's payload: by value (the test server's stand-in for sglang's CUDA IPC handles)
    weight_sync.sglang_serializer = lambda: PickleSerializer
    out = {}
    try:
        for name, flags in (("dp2", []), ("tp2", ["--tensor-model-parallel-size", "2"]),
                            ("pp2_tensor", ["--pipeline-model-parallel-size", "2", "--rollout-weight-sync", "tensor"]),
                            ("tp2_topk", ["--tensor-model-parallel-size", "2", "--scope-kl-estimator", "topk",
                                          "--scope-topk-k", "4"]),
                            # sampling at 0.6, training at 1 (TP=2): the gap is measured at 0.6
                            ("tp2_t06", ["--tensor-model-parallel-size", "2", "--rollout-temperature", "0.6",
                                         "--scope-kl-estimator", "topk", "--scope-topk-k", "4"])):
            run_dir = root / name
            cfg = load_config(SHORT + [
                "--train-iters", "2", "--eval-interval", "2", "--log-dir", str(run_dir / "logs"), "--save", "null",
                "--seed", str(ctx.seed % 100000), "--rollout-engine", "sglang",
                "--rollout-sglang-urls", info[0]["urls"][0], "--rollout-hf-template", info[0]["student_hf"],
                "--rollout-weight-sync-dir", str(run_dir / "weights"), "--teacher-engine", "sglang",
                "--teacher-serving-sglang-urls", info[0]["urls"][1], "--teacher-load", "null",
                "--scope-kl-estimator", "sampled"] + flags)
            trainer = Trainer(cfg)
            try:
                trainer.run()
                built_teacher = trainer.teacher is not None
            finally:
                trainer.close()
            records = read_metrics(run_dir / "logs" / "metrics.jsonl") if dist.get_rank() == 0 else []
            out[name] = {
                "built_teacher": built_teacher,
                "steps": [r["step"] for r in records if "loss" in r],
                "kl": [r.get("kl/mean") for r in records if "loss" in r],
                "teacher_path": [r.get("rollouts/teacher_path") for r in records if "loss" in r],
                "gap": [r.get("logprob_diff/max") for r in records if "loss" in r],
                "eval": [[r["step"], r["eval/Avg@4"]] for r in records if "eval/Avg@4" in r],
                "versions": sorted({c[1]["weight_version"] for c in servers[0].calls
                                    if c[0].startswith("/update_weights_from") and c[1].get("weight_version")})
                if servers else [],
                "update_calls": sorted({c[0] for c in servers[0].calls if c[0].startswith("/update_weights_from")})
                if servers else [],
                "server_version": servers[0].weight_version if servers else None,
            }
            if servers:
                servers[0].calls.clear()
    finally:
        for s in servers:
            s.stop()
    return out


def _toy_student_tp2(ctx, decode_micro_batch_size: int):
    """At TP=2 (the caller destroys the parallel state): the toy world, the toy student loaded from
    its checkpoint, and a local engine sampling from it."""
    from scope_megatron.data.toy_arithmetic import ToyArithmetic, ToyArithmeticConfig
    from scope_megatron.rollout import LocalEngine
    from scope_megatron.training import checkpoint, models, platform
    from scope_megatron.training.config import toy_student
    from scope_megatron.training.schedule import MegatronDecoder

    platform.init_distributed()
    platform.apply_cpu_shims()
    world = ToyArithmetic(ToyArithmeticConfig())
    platform.initialize_parallel(2, 1)
    platform.seed_everything(0)
    student = models.build_model_chunks(toy_student())[0]
    checkpoint.load_checkpoint(REPO / "checkpoints/toy/student", [student])
    decoder = MegatronDecoder([student], vocab_size=world.tokenizer.vocab_size,
                              micro_batch_size=decode_micro_batch_size, pad_id=world.tokenizer.pad_id)
    return world, student, LocalEngine(decoder, pad_id=world.tokenizer.pad_id)


def sequence_parallel(ctx):
    """TP=2 with Megatron's sequence parallelism switched on in the toy student (its CPU layers
    accept it once built; TransformerEngine's are what a GPU run uses): decoding and the training
    forward must work and agree with the same model without it."""
    import dataclasses

    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    from scope_megatron.rollout import SamplingParams
    from scope_megatron.scope import ScopeConfig
    from scope_megatron.training import platform
    from scope_megatron.training.step import build_inputs, evaluate_loss, micro_batches

    out = {}
    try:
        world, chunk, engine = _toy_student_tp2(ctx, 8)
        prompts = [world.prompt_ids(p) for p in world.held_out[:4]]
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=34, stop_token_ids=(world.tokenizer.eos_id,),
                                seed=ctx.seed % 100000)
        ref = engine.generate(prompts, params, key=1)
        correct = torch.zeros(ref.num_rollouts, dtype=torch.bool)
        correct[::2] = True
        scope = ScopeConfig(teacher_path="off")
        kw = dict(scope=scope, vocab_size=world.tokenizer.vocab_size)
        inputs = build_inputs(ref, correct, world.tokenizer.pad_id)
        loss_ref = evaluate_loss([chunk], micro_batches(inputs, 8), **kw)

        set_model_to_sequence_parallel(chunk, True)  # as built with --sequence-parallel true
        out["sp_on"] = bool(chunk.config.sequence_parallel)
        sp = engine.generate(prompts, params, key=1)
        out["sp_on_after_decoding"] = bool(chunk.config.sequence_parallel)
        out["same_ids"] = bool(torch.equal(sp.response_ids, ref.response_ids))
        out["logprob_diff"] = float((sp.logprobs - ref.logprobs).abs().max())
        padded = build_inputs(ref, correct, world.tokenizer.pad_id, seq_multiple=2)
        out["padded_width"] = [int(inputs.tokens.shape[1]), int(padded.tokens.shape[1])]
        out["loss"] = [loss_ref, evaluate_loss([chunk], micro_batches(padded, 8), **kw)]
        # unpadded rows of odd width cannot be split over 2 TP ranks: one more pad column when the
        # sampled width is even, so the case is checked whatever the samples
        odd = inputs if inputs.tokens.shape[1] % 2 else dataclasses.replace(
            inputs, tokens=torch.nn.functional.pad(inputs.tokens, (0, 1), value=world.tokenizer.pad_id))
        try:
            evaluate_loss([chunk], micro_batches(odd, 8), **kw)
            out["odd_width_error"] = f"no error at width {odd.tokens.shape[1]}"
        except AssertionError as exc:
            out["odd_width_error"] = str(exc)
    finally:
        platform.destroy_parallel()
    return out


def teacher_waves(ctx):
    """One step of the full KL with the whole step's teacher logits at once, against the same step
    with the teacher scoring one micro-batch at a time (training.teacher_logits_gib tiny), at
    TP=2, PP=2 and DP=2: the updated student must be the same, on every rank ({layout: [rank 0's
    entry, rank 1's]}: at PP=2 only rank 1, the last stage, has the loss). And the top-k estimator:
    the colocated teacher keeps [b, L, k] values per token, whose loss equals the one from its logits."""
    import dataclasses

    from megatron.core import parallel_state

    from scope_megatron.scope import RolloutBatch, compute_loss
    from scope_megatron.training import models
    from scope_megatron.training.step import score_with_teacher

    out = {}
    # dp2_overlap: the waves with overlap_grad_reduce in small buckets (the gradients of the earlier
    # waves must not be reduced on their own), against one pass without overlap
    overlap = ["--overlap-grad-reduce", "true", "--ddp-bucket-size", "20000"]
    for name, flags, in_waves in (("tp2", ["--tensor-model-parallel-size", "2"], []),
                                  ("pp2", ["--pipeline-model-parallel-size", "2"], []), ("dp2", [], []),
                                  ("dp2_overlap", [], overlap)):
        params, metrics, waves, scored = [], [], [], []
        for budget in ("8", "1e-12"):
            cfg = load_config(SHORT + flags + (in_waves if budget == "1e-12" else []) + [
                                               "--micro-batch-size", "4", "--save", "null",
                                               "--log-dir", str(_run_dir(ctx, f"waves-{name}-{budget}")),
                                               "--teacher-logits-gib", budget, "--seed", str(ctx.seed % 100000)])
            trainer = Trainer(cfg)
            try:
                batches, _, _ = trainer.prepare(0)
                waves.append(trainer.teacher_wave_size(batches))
                scored.append(sorted({k for mb in batches for k in mb.extra if k.startswith("teacher")}))
                initial = [p.detach().clone() for c in trainer.student for p in c.parameters()]
                if name == "dp2_overlap":
                    entry_buckets = [len(buf.buckets) for c in trainer.student for buf in c.buffers]
                metrics.append(trainer.step(0))
                params.append([p.detach().clone() for c in trainer.student for p in c.parameters()])
                leftover = sorted({k for mb in batches for k in mb.extra if k.startswith("teacher")})
                last_stage = parallel_state.is_pipeline_last_stage()
            finally:
                trainer.close()
        entry = {
            "last_stage": last_stage, "micro_batches": len(batches), "waves": waves, "scored_in_prepare": scored,
            "leftover": leftover, "max_param_diff": max(float((a - b).abs().max()) for a, b in zip(*params)),
            "max_param_change": max(float((a - b).abs().max()) for a, b in zip(initial, params[0])),
            "loss": [m.get("loss") for m in metrics], "grad_norm": [m.get("grad_norm") for m in metrics]}
        if name == "dp2_overlap":
            entry["buckets"] = entry_buckets
        # run_workers hands the test rank 0's result only: every rank's entry reaches it
        out[name] = [None] * dist.get_world_size()
        dist.all_gather_object(out[name], entry)

    # top-k: stored values against the logits, on the last stage (TP=2)
    cfg = load_config(SHORT + ["--tensor-model-parallel-size", "2", "--scope-kl-estimator", "topk",
                               "--scope-topk-k", "5", "--save", "null", "--log-dir", str(_run_dir(ctx, "topk")),
                               "--seed", str(ctx.seed % 100000)])
    trainer = Trainer(cfg)
    try:
        batches, _, _ = trainer.prepare(0)
        keys = sorted(k for k in batches[0].extra if k.startswith("teacher"))
        shape = list(batches[0].extra["teacher_top_ids"].shape)
        full = dataclasses.replace(cfg.scope, kl_estimator="full", topk_k=64)
        logit_batches = [type(mb)(mb.tokens, mb.position_ids, dict(mb.extra)) for mb in batches]
        for mb in logit_batches:
            for key in keys:
                mb.extra.pop(key)
        score_with_teacher(trainer.teacher, logit_batches, scope=full, vocab_size=cfg.student.vocab_size)
        diffs = []
        with torch.no_grad():
            for mb, lmb in zip(batches, logit_batches):
                logits = models.forward_logits(trainer.student[0].module, mb.tokens)
                student = logits
                base = dict(response_ids=mb.extra["response_ids"], group_ids=mb.extra["group_ids"],
                            correct=mb.extra["correct"], old_logprobs=mb.extra["old_logprobs"],
                            response_mask=mb.extra["response_mask"])
                stored, _ = compute_loss(cfg.scope, RolloutBatch(
                    **base, teacher_logprobs=mb.extra["teacher_logprobs"],
                    teacher_top_ids=mb.extra["teacher_top_ids"],
                    teacher_top_logprobs=mb.extra["teacher_top_logprobs"]), student,
                    vocab_size=cfg.student.vocab_size)
                from_logits, _ = compute_loss(cfg.scope, RolloutBatch(**base), student,
                                              teacher_logits=lmb.extra["teacher_logits"],
                                              vocab_size=cfg.student.vocab_size)
                diffs.append([float(stored), float(from_logits)])
        out["topk"] = {"keys": keys, "shape": shape, "losses": diffs}
    finally:
        trainer.close()
    return out


def split_groups(ctx):
    """One training step with micro-batches of whole prompt groups against the same step with
    --split-groups and micro-batches of 2 rollouts (rollout.n is 4: every group is cut), at TP=2,
    PP=2 and DP=2 (there also with a dynamic batch size and with the colocated teacher's logits
    in waves): the update, the loss and the step's group metrics must be the same on every rank."""
    from megatron.core import parallel_state

    out = {}
    # tau 0.02: weights far from uniform (the toy student's perplexities are close to 1)
    tau = ["--scope-tau", "0.02"]
    for name, flags, split_flags in (
            ("tp2", ["--tensor-model-parallel-size", "2"] + tau, []),
            ("pp2", ["--pipeline-model-parallel-size", "2"] + tau, []),
            ("dp2", tau, []),
            ("dp2_max_tokens", tau, ["--max-tokens-per-micro-batch", "40"]),
            ("tp2_waves", ["--tensor-model-parallel-size", "2", "--teacher-logits-gib", "1e-12"] + tau, []),
            # OPD's uniform weights need no forward pass
            ("pp2_opd", ["--pipeline-model-parallel-size", "2", "--algorithm", "opd"], [])):
        params, metrics, cut = [], [], []
        for split in (False, True):
            extra = ["--split-groups", "true", "--micro-batch-size", "2"] + split_flags if split else []
            cfg = load_config(SHORT + flags + extra + ["--save", "null", "--seed", str(ctx.seed % 100000),
                                                       "--log-dir", str(_run_dir(ctx, f"split-{name}-{split}"))])
            trainer = Trainer(cfg)
            try:
                batches, _, _ = trainer.prepare(0)
                groups = [set(mb.extra["step_group_ids"].tolist()) for mb in batches] if split else []
                # groups with rows in more than one micro-batch
                cut.append(sum(1 for g in set().union(*groups) if sum(g in gs for gs in groups) > 1) if split else 0)
                initial = [p.detach().clone() for c in trainer.student for p in c.parameters()]
                metrics.append(trainer.step(0))
                params.append([p.detach().clone() for c in trainer.student for p in c.parameters()])
                last_stage = parallel_state.is_pipeline_last_stage()
            finally:
                trainer.close()
        # the metrics both ways compute exactly (weight_entropy is a mean over groups with path
        # members, which micro-batches of whole groups only approximate)
        keys = ("loss", "grad_norm", "kl/mean", "mle/mean", "reward/mean", "groups/total", "groups/all_correct",
                "groups/all_wrong", "rollouts/teacher_path", "student_path/weight_max", "teacher_path/weight_max",
                "student_path/ppl_student", "teacher_path/ppl_student", "teacher_path/ppl_teacher")
        entry = {"last_stage": last_stage, "cut_groups": cut,
                 "max_param_diff": max(float((a - b).abs().max()) for a, b in zip(*params)),
                 "max_param_change": max(float((a - b).abs().max()) for a, b in zip(initial, params[0])),
                 "metrics": {k: [m.get(k) for m in metrics] for k in keys}}
        out[name] = [None] * dist.get_world_size()
        dist.all_gather_object(out[name], entry)
    return out


def recompute(ctx):
    """One training step with and without activation recomputation (--recompute-granularity), at
    TP=2 and PP=2: the student's layers run again in backward (counted by forward hooks), and
    the update is the same."""
    from scope_megatron.training.step import train_step

    out = {}
    for name, flags in (("tp2", ["--tensor-model-parallel-size", "2"]),
                        ("pp2", ["--pipeline-model-parallel-size", "2"])):
        runs = {}
        for mode, extra in (("off", []),
                            ("full", ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                      "--recompute-num-layers", "1"]),
                            ("block", ["--recompute-granularity", "full", "--recompute-method", "block",
                                       "--recompute-num-layers", "1"]),
                            ("selective", ["--recompute-granularity", "selective"])):
            cfg = load_config(SHORT + flags + extra + ["--save", "null", "--seed", str(ctx.seed % 100000),
                                                       "--log-dir", str(_run_dir(ctx, f"rc-{name}-{mode}"))])
            trainer = Trainer(cfg)
            try:
                batches, _, _ = trainer.prepare(0)
                layers = [m for c in trainer.student for m in c.modules() if type(m).__name__ == "TransformerLayer"]
                calls = [0]
                hooks = [m.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) for m in layers]
                train_step(trainer.student, trainer.optimizer, trainer.scheduler, batches, scope=cfg.scope,
                           vocab_size=cfg.student.vocab_size)
                for h in hooks:
                    h.remove()
                runs[mode] = {"calls": calls[0], "layers": len(layers), "micro_batches": len(batches),
                              "params": [p.detach().clone() for c in trainer.student for p in c.parameters()]}
            finally:
                trainer.close()
        base = runs["off"]["params"]
        out[name] = {mode: {"calls": r["calls"], "layers": r["layers"], "micro_batches": r["micro_batches"],
                            "max_param_diff": max(float((a - b).abs().max()) for a, b in zip(base, r["params"]))}
                     for mode, r in runs.items()}
    return out


def trimmed(ctx):
    """The SCOPE loss (full KL against the toy teacher) over micro-batches each cut to its own
    longest row, and packed by a token budget, against the same rollouts in micro-batches as wide
    as the step's longest row, at TP=2, without and with sequence parallelism (widths rounded up
    to 2)."""
    import dataclasses

    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    from scope_megatron.rollout import SamplingParams
    from scope_megatron.scope import ScopeConfig
    from scope_megatron.training import checkpoint, models, platform
    from scope_megatron.training.config import toy_teacher
    from scope_megatron.training.step import build_inputs, evaluate_loss, micro_batches, score_with_teacher

    out = {}
    try:
        world, student, engine = _toy_student_tp2(ctx, 16)
        teacher = models.freeze(models.build_model_chunks(toy_teacher())[0])
        checkpoint.load_checkpoint(REPO / "checkpoints/toy/teacher", [teacher])
        prompts = [world.prompt_ids(p) for p in world.held_out[:6]]
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=40, stop_token_ids=(world.tokenizer.eos_id,),
                                seed=ctx.seed % 100000)
        rollouts = engine.generate(prompts, params, key=3)
        # the toy's responses all have one length: cut them (as if stopped early) to 6..34 tokens
        keep = torch.tensor([34, 30, 6, 9, 20, 26, 12, 7, 33, 34, 15, 18])[:rollouts.num_rollouts]
        mask = rollouts.response_mask & (torch.arange(rollouts.response_ids.shape[1]) < keep.unsqueeze(1))
        rollouts = dataclasses.replace(rollouts, response_mask=mask,
                                       response_ids=torch.where(mask, rollouts.response_ids, world.tokenizer.pad_id),
                                       logprobs=torch.where(mask, rollouts.logprobs, 0.0))
        correct = torch.arange(rollouts.num_rollouts) % 3 == 0
        kw = dict(scope=ScopeConfig(), vocab_size=world.tokenizer.vocab_size)
        out["response_lengths"] = rollouts.response_lengths.tolist()
        for sp in (False, True):
            set_model_to_sequence_parallel(student, sp)
            set_model_to_sequence_parallel(teacher, sp)
            multiple = 2 if sp else 1
            inputs = build_inputs(rollouts, correct, world.tokenizer.pad_id, seq_multiple=multiple)
            losses, widths = [], []
            for kw_batches in (dict(), dict(trim=True), dict(trim=True, max_tokens=100)):
                batches = micro_batches(inputs, 4, seq_multiple=multiple, **kw_batches)
                score_with_teacher([teacher], batches, scope=kw["scope"], vocab_size=kw["vocab_size"])
                losses.append(evaluate_loss([student], batches, **kw))
                widths.append([list(mb.tokens.shape) + [mb.extra["response_ids"].shape[1]] for mb in batches])
            out["sp" if sp else "plain"] = {"losses": losses, "widths": widths, "step_width": int(inputs.tokens.shape[1])}
    finally:
        platform.destroy_parallel()
    return out


def resume_with_new_optimizer_values(ctx):
    """One step at lr 3e-4 (constant), then a resume with --lr 1e-5 and other Adam betas / eps:
    the optimizer must run with the new values, not the checkpoint's param groups."""
    run_dir = _run_dir(ctx, "new_lr")
    flags = ["--lr-decay-style", "constant", "--eval-interval", "0", "--save-interval", "1",
             "--lr", "3e-4", "--lr-warmup-iters", "2"]
    first = _train(ctx, run_dir, flags, iters=2)
    cfg = load_config(SHORT + flags + ["--train-iters", "3", "--lr", "1e-5", "--min-lr", "1e-6",
                                       "--adam-beta1", "0.5", "--adam-eps", "1e-6",
                                       "--log-dir", str(run_dir / "logs"), "--save", str(run_dir / "ckpt"),
                                       "--seed", str(ctx.seed % 100000)])
    trainer = Trainer(cfg)
    try:
        start = trainer._load()
        groups = [{k: g[k] for k in ("lr", "max_lr", "min_lr", "betas", "eps") if k in g}
                  for g in trainer.optimizer.param_groups]
    finally:
        trainer.close()
    return {"start": start, "groups": groups, "logged_lr": first["lr"]}
