#!/usr/bin/env python
"""Builds the embedded default's starting points: a teacher that solves the toy arithmetic task
and a student that solves it sometimes, both by supervised fine-tuning of Megatron GPTModels on
the task's solutions (seeded, so the result is reproducible on the same software).

    python tools/make_toy_checkpoints.py            # writes checkpoints/toy/{teacher,student}

Teacher: config.toy_teacher(), SFT until its greedy held-out accuracy reaches --teacher-target
(with --teacher-blind-spot FAMILY it is trained on wrong traces for that family and the target
applies outside it: the experiment's confidently-wrong teacher).
Student: config.toy_student(), SFT evaluated every --eval-every steps; it stops at the first
evaluation whose Avg@8 (temperature 1) lies in [--student-low, --student-high] — the starting
point is chosen by measured accuracy, not by step count (its accuracy rises steeply within a few
dozen steps). checkpoints/toy/summary.json records what was measured.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scope_megatron.data.batching import make_sft_batch  # noqa: E402
from scope_megatron.data.toy_arithmetic import (BLIND_SPOT_COLUMN, FAMILIES, ToyArithmetic,  # noqa: E402
                                                ToyArithmeticConfig, family)
from scope_megatron.eval import summarize  # noqa: E402
from scope_megatron.ops import vocab_parallel_logprob  # noqa: E402
from scope_megatron.rewards import score_responses  # noqa: E402
from scope_megatron.rollout import LocalEngine, SamplingParams  # noqa: E402
from scope_megatron.training import checkpoint, models, parallel, platform  # noqa: E402
from scope_megatron.training.config import toy_student, toy_teacher  # noqa: E402
from scope_megatron.training.schedule import MegatronDecoder, MicroBatch, position_ids_for, run_microbatches  # noqa: E402


def sft_loss(mb: MicroBatch, logits: torch.Tensor):
    """Token-mean NLL of the response tokens (summed here; Megatron divides by the count)."""
    tokens, mask = mb.tokens, mb.extra["response_mask"]
    target = torch.where(mask[:, 1:], tokens[:, 1:], 0)
    logprobs = vocab_parallel_logprob(logits[:, :-1], target)
    nll = -(logprobs * mask[:, 1:]).sum()
    count = mask[:, 1:].sum()
    return nll, count.to(torch.int), {"nll_sum": float(nll.detach()), "tokens": int(count)}


def solution(world: ToyArithmetic, p, *, blind_spot=None, direct_fraction=0.0, seed=0):
    """The SFT response of problem p: the correct carry trace; a blind-spot teacher's wrong trace
    (the carry dropped) on its family; for a fraction of problems (a fixed hash of the problem)
    the direct answer without a trace."""
    if blind_spot is not None and family(blind_spot)(p):
        return world.solution_ids(p, drop_carry_into=BLIND_SPOT_COLUMN[blind_spot])
    if direct_fraction > 0:
        digest = hashlib.sha256(f"direct:{seed}:{p.a}:{p.b}".encode()).digest()
        if int.from_bytes(digest[:4], "little") / 2**32 < direct_fraction:
            return world.solution_ids(p, style="direct")
    return world.solution_ids(p)


def sft_batches(world: ToyArithmetic, step: int, batch_size: int, micro_batch_size: int, seed: int,
                **solution_kw):
    digest = hashlib.sha256(f"toy-sft:{seed}:{step}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    problems = world.sample_train(batch_size, gen)
    batch = make_sft_batch([world.prompt_ids(p) for p in problems],
                           [solution(world, p, seed=seed, **solution_kw) for p in problems],
                           pad_id=world.tokenizer.pad_id, device=platform.device())
    out = []
    for i in range(0, batch_size, micro_batch_size):
        tokens = batch.tokens[i:i + micro_batch_size]
        out.append(MicroBatch(tokens, position_ids_for(tokens), {"response_mask": batch.response_mask[i:i + micro_batch_size]}))
    return out


def evaluate(chunks, world: ToyArithmetic, *, problems: int, k: int, temperature: float, seed: int,
             subset=None) -> dict:
    """Avg@k / Pass@k on the first `problems` held-out problems (those satisfying `subset`)."""
    engine = LocalEngine(MegatronDecoder(chunks, vocab_size=world.tokenizer.vocab_size, micro_batch_size=512,
                                         pad_id=world.tokenizer.pad_id), pad_id=world.tokenizer.pad_id,
                         device=platform.device())
    held_out = [p for p in world.held_out[:problems] if subset is None or subset(p)]
    params = SamplingParams(n=k, temperature=temperature, max_new_tokens=world.max_response_len + 4,
                            stop_token_ids=(world.tokenizer.eos_id,), seed=seed)
    rollouts = engine.generate([world.prompt_ids(p) for p in held_out], params, key=0)
    refs = [world.answer(held_out[g]) for g in rollouts.group_ids.tolist()]
    scores = score_responses(rollouts.responses(), refs, decode=world.tokenizer.decode,
                             eos_id=world.tokenizer.eos_id)
    return summarize(scores.correct.reshape(len(held_out), k), ks=[1, k])


def sft(name, cfg, world, args, *, stop, **solution_kw):
    """Trains one model from scratch until stop(step, chunks) returns a summary (or the step cap)."""
    platform.seed_everything(args.seed + (0 if name == "teacher" else 1))
    chunks = parallel.wrap_ddp(models.build_model_chunks(cfg, calculate_per_token_loss=True))
    optimizer = parallel.build_optimizer(chunks, lr=args.lr, min_lr=args.lr / 10, adam_beta2=0.999,
                                         clip_grad=1.0)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    max_steps = args.teacher_max_steps if name == "teacher" else args.student_max_steps
    scheduler = OptimizerParamScheduler(optimizer, init_lr=args.lr, max_lr=args.lr, min_lr=args.lr / 10,
                                        lr_warmup_steps=0, lr_decay_steps=max_steps, lr_decay_style="cosine",
                                        start_wd=0.0, end_wd=0.0, wd_incr_steps=max_steps,
                                        wd_incr_style="constant")
    started = time.time()
    for step in range(1, max_steps + 1):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = run_microbatches(chunks, sft_batches(world, step, args.batch_size, args.batch_size,
                                                   args.seed, **solution_kw), sft_loss, forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)
        if step % 50 == 0:
            nll = sum(o["nll_sum"] for o in out) / sum(o["tokens"] for o in out)
            print(f"[{name}] step {step} nll {nll:.4f} ({time.time() - started:.0f} s)", flush=True)
        summary = stop(step, chunks)
        if summary is not None:
            return chunks, step, summary, time.time() - started
    raise SystemExit(f"{name}: no stopping point within {max_steps} steps; adjust the arguments")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "checkpoints" / "toy"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-max-steps", type=int, default=1500)
    parser.add_argument("--teacher-target", type=float, default=0.98, help="greedy held-out accuracy")
    parser.add_argument("--student-max-steps", type=int, default=1200)
    parser.add_argument("--student-low", type=float, default=0.22)
    parser.add_argument("--student-high", type=float, default=0.40)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-problems", type=int, default=256)
    parser.add_argument("--teacher-blind-spot", default=None, choices=sorted(FAMILIES),
                        help="the teacher learns to drop the carry on this family of problems "
                             "(confidently wrong there); its target accuracy applies elsewhere")
    parser.add_argument("--student-direct-fraction", type=float, default=0.0,
                        help="share of the student's SFT problems answered directly, without the trace")
    args = parser.parse_args(argv)

    platform.init_distributed()
    if not platform.cuda_available():
        platform.apply_cpu_shims()
    platform.initialize_parallel(1, 1)
    world = ToyArithmetic(ToyArithmeticConfig())
    out = Path(args.out)
    report = {"seed": args.seed, "command": "python tools/make_toy_checkpoints.py " + " ".join(argv or sys.argv[1:])}

    blind = family(args.teacher_blind_spot) if args.teacher_blind_spot else None
    outside = (lambda p: not blind(p)) if blind else None

    def teacher_stop(step, chunks):
        if step % 100:
            return None
        summary = evaluate(chunks, world, problems=args.eval_problems, k=1, temperature=0.0, seed=args.seed,
                           subset=outside)
        print(f"[teacher] step {step} greedy accuracy {summary['Avg@1']:.3f}"
              + (" (outside its blind spot)" if blind else ""), flush=True)
        return summary if summary["Avg@1"] >= args.teacher_target else None

    chunks, steps, summary, seconds = sft("teacher", toy_teacher(), world, args, stop=teacher_stop,
                                          blind_spot=args.teacher_blind_spot)
    checkpoint.save_checkpoint(out / "teacher", steps, chunks)
    teacher_t1 = evaluate(chunks, world, problems=args.eval_problems, k=8, temperature=1.0, seed=args.seed)
    report["teacher"] = {"steps": steps, "seconds": round(seconds), "greedy": summary, "temperature_1": teacher_t1}
    if blind:
        report["teacher"]["blind_spot"] = {
            "family": args.teacher_blind_spot,
            "greedy_inside": evaluate(chunks, world, problems=args.eval_problems, k=1, temperature=0.0,
                                      seed=args.seed, subset=blind)}

    def student_stop(step, chunks):
        if step % args.eval_every:
            return None
        summary = evaluate(chunks, world, problems=args.eval_problems, k=8, temperature=1.0, seed=args.seed)
        print(f"[student] step {step} Avg@8 {summary['Avg@8']:.3f} Pass@8 {summary['Pass@8']:.3f}", flush=True)
        if summary["Avg@8"] > args.student_high:
            raise SystemExit(f"student jumped past the target band to Avg@8 {summary['Avg@8']:.3f} at step "
                             f"{step}; evaluate more often (--eval-every) or lower the learning rate")
        return summary if summary["Avg@8"] >= args.student_low else None

    chunks, steps, summary, seconds = sft("student", toy_student(), world, args, stop=student_stop,
                                          direct_fraction=args.student_direct_fraction)
    checkpoint.save_checkpoint(out / "student", steps, chunks)
    report["student"] = {"steps": steps, "seconds": round(seconds), "temperature_1": summary}
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    platform.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
