#!/usr/bin/env python
"""Avg@k / Pass@k of a checkpoint on math benchmark files, per benchmark and macro-averaged.

    # a Hugging Face model (converted to a temporary checkpoint first), 8 data-parallel replicas
    torchrun --nproc-per-node 8 tools/evaluate.py --hf-dir Qwen3-1.7B \\
        --benchmarks data/aime24.jsonl data/math500.jsonl data/olympiadbench.parquet --out eval/qwen3

    # a checkpoint written by the trainer or the converter (its model configuration is recorded)
    torchrun --nproc-per-node 4 tools/evaluate.py --megatron-dir runs/scope/checkpoints \\
        --tokenizer Qwen3-1.7B --benchmarks data/ --tensor-model-parallel-size 2 --out eval/step500

    # running SGLang servers sample (one process; the tokenizer builds the prompts)
    python tools/evaluate.py --sglang-urls http://node1:30000 http://node2:30000 --tokenizer Qwen3-1.7B \
        --benchmarks data/ --out eval/qwen3-sglang

    # the embedded toy world's held-out split (no tokenizer or files needed)
    python tools/evaluate.py --megatron-dir checkpoints/toy/teacher --toy --k 8 --out eval/toy

Each benchmark file (JSONL, JSON or Parquet in the public AIME24, AIME25, AMC23, MATH500, Minerva
Math or OlympiadBench layouts; a directory means every such file in it) gets k samples per
problem from the local Megatron engine (sampling defaults: the SCOPE paper's evaluation, k = 32,
temperature 0.6, top_p 0.95), graded by the verifier (--reward-fn). Writes OUT.md, OUT.csv and
OUT.json (every benchmark and, for several, the macro average), OUT.per_problem.jsonl (correct
samples per problem) and OUT.settings.json (model, sampling and grading). Problems are split over data-parallel replicas (WORLD_SIZE / (TP * PP)). Exit status 2
on bad input, with the reason on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    from scope_megatron.training.evaluate import EvalSettings

    d = EvalSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--megatron-dir", help="checkpoint root or iter_XXXXXXX directory (scope-megatron format)")
    src.add_argument("--hf-dir", help="Hugging Face model directory (config.json + safetensors + tokenizer)")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer directory or name (default: --hf-dir)")
    p.add_argument("--toy", action="store_true",
                   help="evaluate on the toy world's held-out split with its tokenizer")
    p.add_argument("--toy-problems", type=int, default=256, help="toy: held-out problems to use")
    p.add_argument("--benchmarks", nargs="+", default=[], help="benchmark files or directories")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--k", type=int, default=d.k, help="samples per problem")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k, help="0: off")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"response budget (prompt + this must fit the model's positions; default "
                        f"{d.max_new_tokens}, with --toy the toy world's response length)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--pass-ks", type=int, nargs="+", default=None,
                   help="k values of Pass@k (default: 1 and --k); Avg@k is always reported")
    p.add_argument("--bootstrap", action="store_true",
                   help="also report the bootstrap best@k of the SCOPE reference code")
    p.add_argument("--prompt-template", default=d.prompt_template,
                   help="user message; {problem} is replaced by the problem text")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the plain text instead of the tokenizer's chat template")
    p.add_argument("--reward-fn", default=None, help=(
        "module:function grading a response (default: math-verify equivalence of the last \\boxed{} "
        "with a time limit; --toy: exact match)"))
    p.add_argument("--decode-micro-batch-size", type=int, default=d.decode_micro_batch_size,
                   help="rows per forward pass when sampling")
    p.add_argument("--sglang-urls", nargs="+", default=None, help=(
        "sample from these running SGLang servers (serving the model) instead of loading it here; "
        "one process; the tokenizer comes from --tokenizer or --hf-dir"))
    p.add_argument("--sglang-max-in-flight", type=int, default=256, help="concurrent requests to the servers")
    p.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--out", required=True, help="output stem: writes OUT.md, OUT.csv, OUT.json, "
                   "OUT.per_problem.jsonl, OUT.settings.json")
    args = p.parse_args(argv)
    if not (args.megatron_dir or args.hf_dir or args.sglang_urls):
        p.error("give the model: --megatron-dir, --hf-dir, or --sglang-urls (with --tokenizer)")
    if not args.toy and not args.benchmarks:
        p.error("give --benchmarks FILE... (or --toy for the embedded toy world)")
    if args.toy and args.benchmarks:
        p.error("--toy evaluates the toy world's held-out split; drop --benchmarks or --toy")
    if args.toy and args.hf_dir:
        p.error("--toy needs a checkpoint of the toy model (--megatron-dir)")
    if args.sglang_urls and args.toy:
        p.error("--sglang-urls serves HF models; the toy world runs with the local engine")
    if not args.toy and not (args.tokenizer or args.hf_dir):
        p.error("give --tokenizer (or --hf-dir): the prompts are built with the model's Hugging Face tokenizer")
    if args.k < 1:
        p.error(f"--k must be at least 1, got {args.k}")
    if args.toy_problems < 1:  # (--limit is load_benchmark's to check: a ValueError, exit status 2)
        p.error(f"--toy-problems must be at least 1, got {args.toy_problems}")
    return args


MATH_REWARD = "scope_megatron.rewards.math_verify:math_verify_match"


def settings_from(args):
    from scope_megatron.training.evaluate import EvalSettings

    d = EvalSettings()
    pass_ks = tuple(args.pass_ks) if args.pass_ks else None  # None: EvalSettings' (1, k)
    bad = [k for k in pass_ks or () if not 1 <= k <= args.k]
    if bad:
        raise ValueError(f"--pass-ks {bad} must lie in [1, --k={args.k}]")
    reward_fn = args.reward_fn or (d.reward_fn if args.toy else MATH_REWARD)
    from scope_megatron.rewards import load_reward_fn

    try:  # before any model is loaded: a misspelt --reward-fn is bad input (exit status 2)
        load_reward_fn(reward_fn)
    except (ImportError, AttributeError, TypeError) as exc:
        raise ValueError(f"--reward-fn: {exc}") from exc
    return EvalSettings(k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=d.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
                        seed=args.seed, pass_ks=pass_ks,
                        bootstrap=args.bootstrap, prompt_template=args.prompt_template,
                        chat_template=not args.no_chat_template,
                        reward_fn=reward_fn,
                        decode_micro_batch_size=args.decode_micro_batch_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    from scope_megatron.training import platform

    from scope_megatron.convert import ConversionError
    from scope_megatron.rollout.sglang import SGLangError
    from scope_megatron.training.checkpoint import CheckpointError

    platform.init_distributed()
    if not platform.cuda_available():
        platform.apply_cpu_shims()
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0

    def say(msg: str) -> None:
        if rank0:
            print(f"[evaluate] {msg}", flush=True)

    try:
        settings = settings_from(args)
        platform.initialize_parallel(args.tp, args.pp)
        platform.seed_everything(settings.seed)
        status = run(args, settings, say)
    except (ValueError, OSError, KeyError, CheckpointError, ConversionError, SGLangError) as exc:
        if rank0:
            print(f"evaluate: error: {exc}", file=sys.stderr)
        status = 2
    platform.destroy()
    return status


def run(args, settings, say) -> int:
    import torch
    import torch.distributed as dist

    from scope_megatron.eval import macro_average
    from scope_megatron.eval.benchmarks import load_benchmarks
    from scope_megatron.training import evaluate as ev
    from scope_megatron.training import platform

    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if platform.cuda_available() else torch.float32)
    if args.toy:
        bench, world = ev.toy_benchmark(args.toy_problems)
        benchmarks = [bench]
        encoder = ev.PromptEncoder(world.tokenizer, settings, toy_world=world)
        if args.max_new_tokens is None:  # not given: fit the toy
            settings = dataclasses.replace(settings, max_new_tokens=world.max_response_len)
    else:
        from transformers import AutoTokenizer

        benchmarks = load_benchmarks(args.benchmarks, limit=args.limit)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.hf_dir)
        # stop ids from that directory, named explicitly: a hub name is refused like in training
        # (its generation_config.json stop ids, e.g. Qwen's <|im_end|>, would be silently missing)
        encoder = ev.PromptEncoder(tokenizer, settings, model_dir=args.tokenizer or args.hf_dir)
        say(f"stop ids {list(encoder.stop_ids)}")  # read now: a bad generation_config.json fails before the model loads
    if args.sglang_urls:
        engine = sglang_engine(args, encoder, dist)
    else:
        ckpt = args.megatron_dir or ev.convert_for_eval(args.hf_dir, args.tp, args.pp)
        chunks, cfg = ev.load_model_for_eval(ckpt, dtype)
        ev.check_lengths(benchmarks, encoder, settings, cfg)
        engine = ev.local_engine(chunks, cfg, settings)
    say(f"{len(benchmarks)} benchmark(s), {sum(len(b) for b in benchmarks)} problems, k={settings.k}, "
        f"T={settings.temperature}, top_p={settings.top_p}, top_k={settings.top_k}, "
        f"max_new_tokens={settings.max_new_tokens}, {dist.get_world_size()} rank(s)")
    start = time.time()
    results = ev.evaluate_benchmarks(engine, encoder, benchmarks, settings, progress=say)
    if results is not None:
        out = Path(args.out)
        ev.write_results(results, out, settings, str(args.megatron_dir or args.hf_dir or args.sglang_urls))
        with open(out.with_name(out.name + ".per_problem.jsonl"), "w") as f:
            for bench in benchmarks:
                for problem, correct in zip(bench.problems, results[bench.name]["per_problem_correct"]):
                    f.write(json.dumps({"benchmark": bench.name, "id": problem.id, "answer": problem.answer,
                                        "correct": correct, "k": settings.k}) + "\n")
        if len(results) > 1:
            say("macro average: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                             macro_average(ev.report_table(results)).items()))
        say(f"done in {time.time() - start:.0f}s: {out}.md, {out}.csv, {out}.json")
    return 0


def sglang_engine(args, encoder, dist):
    """An SGLangEngine over running servers (the prompt-length check is the servers' own)."""
    from scope_megatron.rollout.sglang import SGLangClient, SGLangEngine

    if dist.get_world_size() != 1 or args.tp != 1 or args.pp != 1:
        raise ValueError("--sglang-urls runs in one process (the servers parallelize); drop torchrun, --tp, --pp")
    tok = encoder.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else encoder.stop_ids[0]
    client = SGLangClient(args.sglang_urls, max_in_flight=args.sglang_max_in_flight, progress=True)
    return SGLangEngine(client, pad_id=pad)


if __name__ == "__main__":
    sys.exit(main())
