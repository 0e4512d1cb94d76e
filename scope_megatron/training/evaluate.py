"""Benchmark evaluation of a checkpoint: k samples per problem from the local Megatron engine,
graded by the verifier, summarized as Avg@k and Pass@k per benchmark and macro-averaged.

Used by tools/evaluate.py (`torchrun --nproc-per-node N tools/evaluate.py ...`). The model comes
from a checkpoint in our format (its ModelConfig is read from the checkpoint) or from a Hugging
Face directory (converted to a temporary checkpoint first). Problems are split over data-parallel
replicas; tensor / pipeline parallelism as given. Sampling defaults are the SCOPE paper's
evaluation settings (k = 32, temperature 0.6, top_p 0.95).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from scope_megatron.eval import macro_average, summarize, write_report
from scope_megatron.eval.benchmarks import Benchmark, Problem
from scope_megatron.rewards import load_reward_fn, score_responses
from scope_megatron.rollout import LocalEngine, SamplingParams

from . import checkpoint, models, platform
from .schedule import MegatronDecoder, is_last_stage

DEFAULT_PROMPT = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass(frozen=True)
class EvalSettings:
    """Sampling and grading of an evaluation (defaults: the paper's settings)."""

    k: int = 32
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 16384
    seed: int = 0
    pass_ks: Optional[Sequence[int]] = None  # None: (1, k)
    bootstrap: bool = False
    prompt_template: str = DEFAULT_PROMPT
    chat_template: bool = True
    reward_fn: str = "scope_megatron.rewards.verifier:boxed_match"
    decode_micro_batch_size: int = 64

    def __post_init__(self):
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"EvalSettings.k must be an integer >= 1, got {self.k!r}")
        if self.pass_ks is None:
            object.__setattr__(self, "pass_ks", tuple(sorted({1, self.k})))
        bad = [k for k in self.pass_ks if not 1 <= k <= self.k]
        if bad:  # Pass@k of more samples than drawn would silently go missing from the report
            raise ValueError(f"EvalSettings.pass_ks {bad} must lie in [1, k={self.k}]; e.g. pass_ks=(1, {self.k})")


class PromptEncoder:
    """Problem text -> prompt token ids, and response ids -> text, with a tokenizer.

    A Hugging Face tokenizer (transformers): the user turn `prompt_template.format(problem=...)`
    through the tokenizer's chat template when it has one and chat is on, else the plain text
    with the tokenizer's special tokens (data.prompts.encode_prompts, as training prompts). The
    toy tokenizer: the toy prompt. model_dir: the Hugging Face directory whose
    generation_config.json and config.json add stop ids (default: the directory the tokenizer was
    loaded from, its name_or_path).
    """

    def __init__(self, tokenizer, settings: EvalSettings, toy_world=None, model_dir=None):
        self.tokenizer = tokenizer
        self.settings = settings
        self.toy_world = toy_world
        self.model_dir = model_dir
        self._ids: Dict[int, List[int]] = {}  # id(problem) -> prompt ids: encoded once per problem
        self._stop_ids: Optional[tuple] = None

    def encode(self, problems: Sequence[Problem]) -> List[List[int]]:
        """The prompt ids of `problems` (encoded in one batch the first time, then remembered)."""
        todo = [p for p in problems if id(p) not in self._ids]
        if todo:
            if self.toy_world is not None:
                encoded = [self.toy_world.prompt_ids(p.meta["toy_problem"]) for p in todo]
            else:
                from scope_megatron.data.prompts import encode_prompts

                tok = self.tokenizer
                texts = [self.settings.prompt_template.format(problem=p.problem) for p in todo]
                chat = self.settings.chat_template and bool(getattr(tok, "chat_template", None))
                encoded = encode_prompts(tok, texts, chat_template=chat)
            self._ids.update((id(p), list(ids)) for p, ids in zip(todo, encoded))
        return [self._ids[id(p)] for p in problems]

    def prompt_ids(self, problem: Problem) -> List[int]:
        return self.encode([problem])[0]

    def decode(self, ids: Sequence[int]) -> str:
        if self.toy_world is not None:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def stop_ids(self) -> tuple:
        """The ids that end a response, for sampling and grading alike: the toy tokenizer's EOS,
        or a Hugging Face tokenizer's eos_token_id followed by the eos_token_id of
        generation_config.json and config.json in `model_dir` (data.stop_ids.stop_token_ids)."""
        if self._stop_ids is None:
            if self.toy_world is not None:
                self._stop_ids = (self.tokenizer.eos_id,)
            else:
                from scope_megatron.data.stop_ids import stop_token_ids

                self._stop_ids = stop_token_ids(self.tokenizer, self.model_dir)
        return self._stop_ids


def toy_benchmark(num_problems: int) -> tuple:
    """The toy world's held-out problems as a Benchmark, and the world."""
    from scope_megatron.data.toy_arithmetic import ToyArithmetic, ToyArithmeticConfig

    world = ToyArithmetic(ToyArithmeticConfig())
    problems = [Problem(str(i), world.prompt_text(p), world.answer(p), {"toy_problem": p})
                for i, p in enumerate(world.held_out[:num_problems])]
    return Benchmark("toy_heldout", problems, "<toy_arithmetic held-out split>"), world


def load_model_for_eval(checkpoint_dir, dtype: torch.dtype) -> tuple:
    """This rank's model chunks built from the checkpoint's recorded ModelConfig, loaded, eval mode."""
    info = checkpoint.checkpoint_info(checkpoint_dir)
    if not info.get("model_config"):
        raise ValueError(f"{checkpoint_dir} records no model configuration; it was not written by "
                         "scope-megatron (save_checkpoint or the converters)")
    cfg = models.ModelConfig(**info["model_config"])
    chunks = models.build_model_chunks(cfg, params_dtype=dtype)
    checkpoint.load_checkpoint(checkpoint_dir, chunks)
    for chunk in chunks:
        chunk.eval()
    return chunks, cfg


def _key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little")


def local_engine(chunks, cfg: models.ModelConfig, settings: EvalSettings) -> LocalEngine:
    """Sampling from the loaded Megatron model (this replica's sampling stream)."""
    from megatron.core import parallel_state

    return LocalEngine(MegatronDecoder(chunks, vocab_size=cfg.vocab_size,
                                       micro_batch_size=settings.decode_micro_batch_size, pad_id=0),
                       pad_id=0, device=platform.device(), stream_seed=parallel_state.get_data_parallel_rank())


def evaluate_benchmarks(engine, encoder: PromptEncoder, benchmarks: Sequence[Benchmark], settings: EvalSettings,
                        progress: Optional[Callable[[str], None]] = None) -> Optional[Dict[str, dict]]:
    """{benchmark: summary} on rank 0 (None elsewhere); every rank must call it. engine: a
    RolloutEngine (local_engine(...), or an SGLangEngine in a single process)."""
    from megatron.core import parallel_state

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    reports = (is_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0)
    reward_fn = load_reward_fn(settings.reward_fn)
    params = SamplingParams(n=settings.k, temperature=settings.temperature, top_p=settings.top_p,
                            top_k=settings.top_k, max_new_tokens=settings.max_new_tokens,
                            stop_token_ids=encoder.stop_ids, seed=settings.seed)
    results = {}
    for bench in benchmarks:
        mine = bench.problems[dp_rank::dp]
        grades = torch.zeros(0, settings.k, dtype=torch.bool)
        if mine:
            rollouts = engine.generate(encoder.encode(mine), params, key=_key(bench.name))
            refs = [mine[g].answer for g in rollouts.group_ids.tolist()]
            scores = score_responses(rollouts.responses(), refs, decode=encoder.decode,
                                     eos_id=encoder.stop_ids, reward_fn=reward_fn)
            grades = scores.correct.reshape(len(mine), settings.k)
        out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(grades if reports else None, out, dst=0)
        if out is not None:
            parts = [g for g in out if g is not None]
            # replicas hold problems dp_rank::dp; restore the file's order for per-problem output
            order = [i for r in range(dp) for i in range(r, len(bench.problems), dp)]
            table = torch.cat(parts)
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            table = table[inverse]
            results[bench.name] = summarize(table, ks=list(settings.pass_ks),
                                            bootstrap=settings.bootstrap)
            results[bench.name]["per_problem_correct"] = table.sum(-1).tolist()
            if progress:
                progress(f"{bench.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[bench.name].items()
                                                     if k.startswith(("Avg@", "Pass@", "best@"))))
    return results if dist.get_rank() == 0 else None


def check_lengths(benchmarks: Sequence[Benchmark], encoder: PromptEncoder, settings: EvalSettings,
                  cfg: models.ModelConfig) -> None:
    """Raise ValueError, before any sampling, when the longest prompt plus the response budget
    exceeds the model's position embeddings (RoPE beyond them is extrapolation the model was not
    trained for, and learned absolute positions would index out of range)."""
    longest, where = 0, None
    for bench in benchmarks:
        for problem, ids in zip(bench.problems, encoder.encode(bench.problems)):
            if len(ids) > longest:
                longest, where = len(ids), f"{bench.name} problem {problem.id}"
    if longest + settings.max_new_tokens > cfg.max_position_embeddings:
        room = cfg.max_position_embeddings - longest
        fix = (f"lower --max-new-tokens to at most {room}" if room > 0 else
               "drop or shorten that problem (--limit, or edit the file)")
        raise ValueError(f"the longest prompt ({longest} tokens, {where}) plus --max-new-tokens "
                         f"{settings.max_new_tokens} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}: {fix}")


def report_table(results: Dict[str, dict]) -> Dict[str, dict]:
    """The summaries without the per-problem counts (what the report and macro average show)."""
    return {name: {k: v for k, v in r.items() if k != "per_problem_correct"} for name, r in results.items()}


def write_results(results: Dict[str, dict], out_stem: Path, settings: EvalSettings, source: str) -> None:
    """OUT.md / .csv / .json with every benchmark (and, for several, their unweighted average
    as the row "macro_average"), and OUT.settings.json (what was evaluated, and how)."""
    table = report_table(results)
    if len(table) > 1:
        table["macro_average"] = macro_average(table)
    write_report(table, out_stem)
    record = dict(dataclasses.asdict(settings), model=source, benchmarks=list(results))
    record["pass_ks"] = list(record["pass_ks"])
    out_stem.with_name(out_stem.name + ".settings.json").write_text(json.dumps(record, indent=2) + "\n")


def convert_for_eval(hf_dir, tp: int, pp: int) -> Path:
    """Rank 0 converts an HF directory into a temporary checkpoint (removed at exit); all ranks
    get its path."""
    from scope_megatron.convert import convert_hf_to_megatron

    holder = [None]
    if dist.get_rank() == 0:
        tmp = Path(tempfile.mkdtemp(prefix="scope-eval-"))
        import atexit

        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        convert_hf_to_megatron(hf_dir, tmp / "ckpt", tp=tp, pp=pp)
        holder[0] = str(tmp / "ckpt")
    dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


