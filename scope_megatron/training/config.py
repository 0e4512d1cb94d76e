"""The trainer's configuration: every field, its default (the embedded toy run) and its flag.

Sources, later ones winning: these defaults < a YAML file (`--config`) < command-line flags.
Flags follow Megatron-LM's names where Megatron has the setting (`--tensor-model-parallel-size`,
`--lr`, `--train-iters`, `--save`, ...); the rest are `--<section>-<field>`. The generated table
of all fields is docs/training-config.md (`python -m scope_megatron.training.config --markdown`).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

from scope_megatron.data.toy_arithmetic import TOY_TOKENIZER
from scope_megatron.rollout.types import logprob_temperature_of
from scope_megatron.scope import ScopeConfig
from scope_megatron.utils.config_io import ConfigError, markdown_table, option, parse_config, section

from .models import ModelConfig

TOY_CHECKPOINTS = "checkpoints/toy"
# 18 tokens padded to 32 rows for every TP in {1, 2, 4, 8}: one checkpoint loads at any of them
TOY_PADDED_VOCAB = 32


def toy_student() -> ModelConfig:
    """The embedded default's student: 2 layers, width 64 (about 0.1M parameters)."""
    return ModelConfig.preset("llama", num_layers=2, hidden_size=64, num_attention_heads=4,
                              ffn_hidden_size=256, vocab_size=TOY_TOKENIZER.vocab_size,
                              max_position_embeddings=64, padded_vocab=TOY_PADDED_VOCAB)


def toy_teacher() -> ModelConfig:
    """The embedded default's teacher: 4 layers, width 128 (about 0.8M parameters)."""
    return ModelConfig.preset("llama", num_layers=4, hidden_size=128, num_attention_heads=4,
                              ffn_hidden_size=512, vocab_size=TOY_TOKENIZER.vocab_size,
                              max_position_embeddings=64, padded_vocab=TOY_PADDED_VOCAB)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = option(1, flag="--tensor-model-parallel-size", help=(
        "tensor-parallel size (divides the attention heads, query groups and FFN width)"))
    pipeline_model_parallel_size: int = option(1, flag="--pipeline-model-parallel-size", help=(
        "pipeline stages (divides both models' num_layers); the data-parallel size is "
        "world size / (TP * PP)"))
    sequence_parallel: bool = option(False, flag="--sequence-parallel", help=(
        "Megatron sequence parallelism (GPU, TP > 1)"))
    use_distributed_optimizer: bool = option(False, flag="--use-distributed-optimizer", help=(
        "shard the optimizer state over data-parallel ranks"))
    overlap_grad_reduce: bool = option(False, flag="--overlap-grad-reduce", help=(
        "reduce the gradients over data-parallel ranks bucket by bucket during the step's last "
        "backward pass instead of after it (Megatron DDP)"))
    ddp_bucket_size: Optional[int] = option(None, flag="--ddp-bucket-size", help=(
        "elements per gradient bucket with overlap_grad_reduce (None: Megatron's max(40M, 1M x "
        "DP size)); a distributed optimizer's checkpoint resumes only in the buckets it was saved with"))

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.ddp_bucket_size is not None:
            if not isinstance(self.ddp_bucket_size, int) or self.ddp_bucket_size < 1:
                raise ValueError(f"ddp_bucket_size must be None or an integer >= 1, got {self.ddp_bucket_size!r}")
            if not self.overlap_grad_reduce:
                raise ValueError("ddp_bucket_size needs overlap_grad_reduce: without it Megatron reduces each "
                                 "gradient buffer whole (pass --overlap-grad-reduce true, or drop the bucket size)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("sequence_parallel needs tensor_model_parallel_size > 1")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = option(3e-4, flag="--lr", help=(
        "peak learning rate (Adam); 1e-3 collapses the toy student"))
    min_lr: float = option(0.0, flag="--min-lr", help="learning rate at the end of the decay")
    lr_decay_style: str = option("constant", flag="--lr-decay-style", help=(
        "'constant', 'linear' or 'cosine' decay over the training iterations"))
    lr_warmup_iters: int = option(0, flag="--lr-warmup-iters", help="linear warm-up iterations")
    weight_decay: float = option(0.0, flag="--weight-decay", help="AdamW weight decay")
    adam_beta1: float = option(0.9, flag="--adam-beta1", help="Adam beta1")
    adam_beta2: float = option(0.999, flag="--adam-beta2", help="Adam beta2")
    adam_eps: float = option(1e-8, flag="--adam-eps", help="Adam epsilon")
    clip_grad: float = option(1.0, flag="--clip-grad", help="global gradient-norm clip (0 = off)")

    def __post_init__(self):
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_decay_style must be 'constant', 'linear' or 'cosine', got "
                             f"{self.lr_decay_style!r}")
        if self.lr_warmup_iters < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("lr_warmup_iters, clip_grad and weight_decay must be >= 0")


@dataclass(frozen=True)
class TrainingConfig:
    train_iters: int = option(150, flag="--train-iters", help="optimizer steps")
    prompts_per_step: int = option(16, flag="--prompts-per-step", help=(
        "prompts per optimizer step over all data-parallel ranks (each sampled rollout.n times)"))
    micro_batch_size: int = option(32, flag="--micro-batch-size", help=(
        "rollouts per micro-batch (a multiple of rollout.n: micro-batches hold whole prompt "
        "groups, because SCOPE normalizes weights within a group; with split_groups any divisor "
        "of a data-parallel rank's rollouts per step, prompts_per_step / DP x rollout.n)"))
    split_groups: bool = option(False, flag="--split-groups", help=(
        "let micro-batches cut prompt groups (long responses whose group does not fit one "
        "micro-batch): each rollout is weighted from its whole group beforehand (SCOPE's weighted "
        "student path: a forward pass of the student without gradient over the step for PPL_S; "
        "OPD, GRPO and uniform paths need none), each group counted once; the gradient is the "
        "same (without dropout)"))
    seed: int = option(1234, flag="--seed", help=(
        "seed of initialization, the prompt stream and sampling (same seed = same prompts)"))
    precision: str = option("auto", flag="--precision", help=(
        "'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'"))
    log_interval: int = option(1, flag="--log-interval", help="steps between log lines")
    max_tokens_per_micro_batch: int = option(0, flag="--max-tokens-per-micro-batch", help=(
        "0: micro_batch_size rollouts per micro-batch. N > 0 (no pipeline parallelism): a dynamic "
        "batch size instead: as many whole prompt groups (rollouts, with split_groups) as fit N "
        "tokens (rows x the micro-batch's longest prompt + response, padding included), at least one"))
    recompute_granularity: Optional[str] = option(None, flag="--recompute-granularity", help=(
        "Megatron's activation recomputation of the student in backward: 'full' (whole layers, "
        "with recompute_method) or 'selective' (the attention core); null: off. Long responses "
        "need it: activations grow with micro_batch_size x sequence length"))
    recompute_method: Optional[str] = option(None, flag="--recompute-method", help=(
        "with 'full': 'uniform' (every recompute_num_layers layers form one checkpoint) or "
        "'block' (the first recompute_num_layers layers of each pipeline stage are recomputed)"))
    recompute_num_layers: Optional[int] = option(None, flag="--recompute-num-layers", help=(
        "with 'full': layers per checkpoint (uniform) or recomputed layers per stage (block)"))
    teacher_logits_gib: float = option(8.0, flag="--teacher-logits-gib", help=(
        "most GiB of a colocated teacher's logit shards held at once per rank (kl_estimator "
        "'full': [micro_batch_size, response length, V/tp] per micro-batch); a step whose "
        "micro-batches need more runs in waves that fit, the teacher scoring each wave just "
        "before the student's forward/backward over it (same gradients; with pipeline "
        "parallelism each wave pays the pipeline's fill and drain)"))

    def __post_init__(self):
        for name in ("train_iters", "prompts_per_step", "micro_batch_size", "log_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if not (isinstance(self.teacher_logits_gib, (int, float)) and self.teacher_logits_gib > 0):
            raise ValueError(f"teacher_logits_gib must be > 0, got {self.teacher_logits_gib!r}")
        if isinstance(self.max_tokens_per_micro_batch, bool) or not isinstance(self.max_tokens_per_micro_batch, int) \
                or self.max_tokens_per_micro_batch < 0:
            raise ValueError(f"max_tokens_per_micro_batch must be an integer >= 0, got {self.max_tokens_per_micro_batch!r}")
        self._check_recompute()

    def _check_recompute(self) -> None:
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g not in (None, "full", "selective"):
            raise ValueError(f"recompute_granularity must be 'full', 'selective' or null, got {g!r}")
        if m not in (None, "uniform", "block"):
            raise ValueError(f"recompute_method must be 'uniform', 'block' or null, got {m!r}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"recompute_num_layers must be an integer >= 1, got {n!r}")
        if g == "full" and (m is None or n is None):
            raise ValueError("recompute_granularity 'full' needs --recompute-method (uniform or block) and "
                             "--recompute-num-layers (e.g. uniform, 1: every layer is recomputed)")
        if g != "full" and (m is not None or n is not None):
            raise ValueError(f"--recompute-method / --recompute-num-layers apply to recompute_granularity "
                             f"'full' only, not {g!r}; remove them or use --recompute-granularity full")

    def transformer_overrides(self) -> dict:
        """The student's TransformerConfig fields these settings set (Megatron's names)."""
        if self.recompute_granularity is None:
            return {}
        out = {"recompute_granularity": self.recompute_granularity}
        if self.recompute_granularity == "full":
            out.update(recompute_method=self.recompute_method, recompute_num_layers=self.recompute_num_layers)
        return out


@dataclass(frozen=True)
class SGLangServersConfig:
    """SGLang servers: attach to `urls`, or (none given) launch `num_servers` of them."""

    urls: Tuple[str, ...] = option((), help=(
        "running servers to use (http://host:port); empty = launch them (needs model_path)"))
    model_path: Optional[str] = option(None, help=(
        "HF model directory the launched servers start from"))
    num_servers: int = option(1, help="servers to launch (one per node or GPU group)")
    base_port: int = option(30000, help="port of the first launched server (the next ones count up)")
    tp: int = option(1, help="tensor-parallel size of each launched server")
    gpus: str = option("", help=(
        "GPU ids of each launched server, servers separated by ';' (e.g. '0,1;2,3'); empty: the "
        "launching process's CUDA_VISIBLE_DEVICES"))
    mem_fraction_static: float = option(0.5, help=(
        "GPU memory fraction a launched server may take (leave room for a colocated trainer)"))
    extra_args: str = option("", help="further sglang.launch_server arguments, as one string")
    launch_command: str = option("python -m sglang.launch_server", help=(
        "the server command (its python: e.g. /envs/sglang/bin/python -m sglang.launch_server when "
        "SGLang has its own environment); 'python' means the trainer's interpreter"))
    startup_timeout_s: float = option(900.0, help="wait this long for a launched server's /health")
    deterministic: bool = option(False, help=(
        "launch with --enable-deterministic-inference: per-sample seeds are honoured, so a "
        "resumed run samples what an uninterrupted one would (slower decoding)"))
    max_in_flight: int = option(256, help=(
        "concurrent HTTP requests over all servers, per data-parallel replica (each replica's "
        "first rank sends its own)"))
    request_timeout_s: float = option(600.0, help="per-request timeout")
    retries: int = option(3, help="retries of a failed request (with exponential backoff)")

    def __post_init__(self):
        if self.num_servers < 1 or self.tp < 1 or self.max_in_flight < 1 or self.retries < 0:
            raise ValueError("num_servers, tp and max_in_flight must be >= 1 and retries >= 0")
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}")
        if self.gpus and len(self.gpu_lists) != self.num_servers:
            raise ValueError(f"gpus {self.gpus!r} lists {len(self.gpu_lists)} servers, num_servers is "
                             f"{self.num_servers}")
        bad = [u for u in self.urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"server urls must start with http:// or https://, got {bad}")

    @property
    def launches(self) -> bool:
        return not self.urls

    @property
    def gpu_lists(self):
        if not self.gpus:
            return None
        try:
            return [[int(g) for g in part.split(",")] for part in self.gpus.split(";")]
        except ValueError:
            raise ValueError(f"gpus must look like '0,1;2,3' (servers separated by ';'), got {self.gpus!r}") from None


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = option("local", flag="--rollout-engine", help=(
        "'local': sample from the trainer's own Megatron student; 'sglang': from SGLang servers "
        "fed with the student's weights after every step"))
    n: int = option(8, flag="--n-samples-per-prompt", help="rollouts per prompt (group size G)")
    temperature: float = option(1.0, flag="--rollout-temperature", help=(
        "sampling temperature; the engine's log-probs of its samples are at this temperature "
        "(the trainer's at scope.student_temperature: a PPO ratio on the engine's log-probs needs both equal)"))
    top_p: float = option(1.0, flag="--rollout-top-p", help="nucleus sampling (1 = off)")
    top_k: int = option(0, flag="--rollout-top-k", help="top-k sampling (0 = off)")
    max_new_tokens: int = option(40, flag="--rollout-max-response-len", help=(
        "response length limit; a response without EOS by then scores 0"))
    decode_micro_batch_size: int = option(256, help=(
        "local engine: rows per forward pass while decoding (memory bound, not a semantic setting)"))
    sglang: SGLangServersConfig = section(SGLangServersConfig)
    weight_sync: str = option("disk", help=(
        "sglang: how servers get the student's weights after a step: 'disk' (HF safetensors + "
        "/update_weights_from_disk; works everywhere), 'tensor' (colocated GPUs, CUDA IPC), "
        "'distributed' (an NCCL group between trainer rank 0 and the servers)"))
    weight_sync_bucket_mb: int = option(512, help=(
        "sglang + tensor / distributed: most MiB of weights per update request"))
    weight_sync_master_address: Optional[str] = option(None, help=(
        "sglang + distributed: address of trainer rank 0 the servers join (default: its host's)"))
    weight_sync_master_port: int = option(29650, help="sglang + distributed: port of that rendezvous")
    weight_sync_dir: Optional[str] = option(None, help=(
        "sglang + disk: directory shared with the servers for the exported weights "
        "(default: <log_dir>/weights)"))
    hf_template: Optional[str] = option(None, help=(
        "sglang: HF directory of the student's architecture and tokenizer (config.json), used "
        "to export its weights (default: rollout.sglang.model_path, else task.tokenizer)"))
    logprob_gap_warn: float = option(0.05, help=(
        "sglang: warn when the mean |engine - trainer| log-prob gap of the first step exceeds this"))

    def __post_init__(self):
        if self.engine not in ("local", "sglang"):
            raise ValueError(f"rollout.engine must be 'local' or 'sglang', got {self.engine!r}")
        if self.weight_sync not in ("disk", "tensor", "distributed"):
            raise ValueError(f"rollout.weight_sync must be 'disk', 'tensor' or 'distributed', got "
                             f"{self.weight_sync!r}")
        if self.n < 2:
            raise ValueError("rollout.n must be >= 2: SCOPE and GRPO compare rollouts within a group")
        if self.decode_micro_batch_size < 1:
            raise ValueError("rollout.decode_micro_batch_size must be >= 1")
        if self.engine == "sglang" and self.sglang.launches and not self.sglang.model_path:
            raise ValueError("rollout.engine 'sglang' needs rollout.sglang.urls (running servers) or "
                             "rollout.sglang.model_path (an HF directory to launch servers from)")


@dataclass(frozen=True)
class TeacherServingConfig:
    engine: str = option("megatron", flag="--teacher-engine", help=(
        "'megatron': the teacher is a frozen Megatron model in the trainer (checkpoint."
        "teacher_load); 'sglang': log-probs come from SGLang servers holding the teacher "
        "(kl_estimator 'sampled', 'k3', or 'topk' from its top scope.topk_k log-probs)"))
    sglang: SGLangServersConfig = section(SGLangServersConfig)
    check_tokenizer: bool = option(True, help=(
        "with engine 'sglang': before training, probe every teacher server with student token ids "
        "and refuse a teacher whose tokenizer decodes them differently (its log-probs would be "
        "of other tokens); false skips the check"))

    def __post_init__(self):
        if self.engine not in ("megatron", "sglang"):
            raise ValueError(f"teacher_serving.engine must be 'megatron' or 'sglang', got {self.engine!r}")
        if self.engine == "sglang" and self.sglang.launches and not self.sglang.model_path:
            raise ValueError("teacher engine 'sglang' needs teacher_serving.sglang.urls (running servers) "
                             "or teacher_serving.sglang.model_path (the teacher's HF directory)")


@dataclass(frozen=True)
class EvalConfig:
    eval_interval: int = option(25, flag="--eval-interval", help=(
        "steps between held-out evaluations (also at step 0 and at the end; 0 = never)"))
    num_prompts: int = option(256, help="held-out problems per evaluation (the first ones, rounded down "
                              "to a multiple of the data-parallel size)")
    k: int = option(8, help="samples per problem (Avg@k, Pass@k)")
    temperature: float = option(1.0, help="sampling temperature of the evaluation")
    top_p: float = option(1.0, help="nucleus sampling of the evaluation")
    pass_ks: Tuple[int, ...] = option((1, 8), help="k values reported as Pass@k (each <= k)")

    def __post_init__(self):
        if self.eval_interval < 0 or self.num_prompts < 1 or self.k < 1:
            raise ValueError("eval_interval >= 0, num_prompts >= 1 and k >= 1 are required")
        if any(not 1 <= k <= self.k for k in self.pass_ks):
            raise ValueError(f"eval.pass_ks {self.pass_ks} must lie in [1, eval.k={self.k}]")


@dataclass(frozen=True)
class CheckpointConfig:
    load: Optional[str] = option(f"{TOY_CHECKPOINTS}/student", flag="--load", help=(
        "student starting point (a dist_checkpointing directory); null = random init"))
    teacher_load: Optional[str] = option(f"{TOY_CHECKPOINTS}/teacher", flag="--teacher-load", help=(
        "teacher checkpoint (required when the loss has a distillation term; unused otherwise)"))
    save: Optional[str] = option("runs/toy_scope/checkpoints", flag="--save", help=(
        "directory of this run's checkpoints; null = none"))
    save_interval: int = option(50, flag="--save-interval", help="steps between checkpoints (and the last step)")
    keep_last: int = option(2, help="checkpoints kept (older ones are deleted)")
    resume: bool = option(True, flag="--resume", help=(
        "continue from the latest checkpoint in `save` when there is one"))

    def __post_init__(self):
        if self.save_interval < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.save_interval and keep_last must be >= 1")


@dataclass(frozen=True)
class LoggingConfig:
    log_dir: str = option("runs/toy_scope", flag="--log-dir", help=(
        "metrics.jsonl, TensorBoard events, curves.png and the resolved config go here"))
    tensorboard: bool = option(True, help="write TensorBoard events")
    overwrite: bool = option(False, help="reuse a log_dir that holds another run's logs")


@dataclass(frozen=True)
class TaskConfig:
    name: str = option("toy_arithmetic", help=(
        "'toy_arithmetic' (the embedded world) or 'prompts' (train_data through an HF tokenizer)"))
    digits: int = option(3, help="toy_arithmetic: operand digits")
    reward_fn: str = option("", help=(
        "reward function, 'module:function' (response_text, reference, *, metadata) -> [0, 1]; "
        "empty: exact match of the last \\boxed{} (toy_arithmetic), math-verify equivalence with a "
        "time limit (prompts: scope_megatron.rewards.math_verify:math_verify_match)"))
    eval_families: Tuple[str, ...] = option((), help=(
        "toy_arithmetic: problem families (scope_megatron.data.FAMILIES) whose held-out Avg@k / "
        "Pass@k are also reported, with their complements"))
    train_data: Optional[str] = option(None, help="prompts: training prompts (JSONL, JSON or Parquet)")
    eval_data: Optional[str] = option(None, help=(
        "prompts: held-out prompts evaluated every eval.eval_interval steps (none: no evaluation)"))
    tokenizer: Optional[str] = option(None, help="prompts: the student's HF tokenizer directory")
    prompt_key: str = option("", help="prompts: field of the problem text (empty: question/problem/prompt)")
    answer_key: str = option("", help="prompts: field of the reference answer (empty: answer/solution/...)")
    prompt_suffix: str = option(" Put your final answer within \\boxed{}.", help=(
        "prompts: appended to each problem (the paper's instruction)"))
    chat_template: bool = option(True, help="prompts: wrap the prompt in the tokenizer's chat template")
    max_prompt_len: int = option(1024, help="prompts: longer prompts are dropped at load (counted)")

    @property
    def resolved_reward_fn(self) -> str:
        if self.reward_fn:
            return self.reward_fn
        return ("scope_megatron.rewards.verifier:boxed_match" if self.name == "toy_arithmetic"
                else "scope_megatron.rewards.math_verify:math_verify_match")

    def __post_init__(self):
        if self.name not in ("toy_arithmetic", "prompts"):
            raise ValueError(f"task.name must be 'toy_arithmetic' or 'prompts', got {self.name!r}")
        if self.name == "prompts" and not (self.train_data and self.tokenizer):
            raise ValueError("task.name 'prompts' needs task.train_data (--task-train-data) and "
                             "task.tokenizer (--task-tokenizer)")
        if self.eval_families and self.name != "toy_arithmetic":
            raise ValueError("task.eval_families are toy_arithmetic problem families")
        from scope_megatron.data import FAMILIES

        unknown = [f for f in self.eval_families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"task.eval_families: unknown {unknown}; choose from {sorted(FAMILIES)}")


@dataclass(frozen=True)
class TrainConfig:
    """The whole run. `python -m scope_megatron.training.config --markdown` prints every field."""

    student: ModelConfig = section(ModelConfig, default_factory=toy_student)
    teacher: ModelConfig = section(ModelConfig, default_factory=toy_teacher)
    parallel: ParallelConfig = section(ParallelConfig)
    optimizer: OptimizerConfig = section(OptimizerConfig)
    training: TrainingConfig = section(TrainingConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    teacher_serving: TeacherServingConfig = section(TeacherServingConfig)
    scope: ScopeConfig = section(ScopeConfig)
    eval: EvalConfig = section(EvalConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    logging: LoggingConfig = section(LoggingConfig)
    task: TaskConfig = section(TaskConfig)

    def __post_init__(self):
        # (with a token budget micro_batch_size is not used: no constraint on it)
        if (self.training.micro_batch_size % self.rollout.n and not self.training.split_groups
                and not self.training.max_tokens_per_micro_batch):
            raise ValueError(f"training.micro_batch_size {self.training.micro_batch_size} must be a "
                             f"multiple of rollout.n {self.rollout.n} (micro-batches hold whole "
                             "prompt groups; --split-groups true lets them cut groups)")
        s = self.scope
        engine_temperature = logprob_temperature_of(self.rollout.temperature)
        if ("old_logprobs" in s.effective_fields() and s.old_logprobs == "rollout"
                and engine_temperature != s.student_temperature):
            raise ValueError(
                f"the PPO ratio of {s.algorithm!r}"
                + (f" (kl_estimator {s.kl_estimator!r})" if s.algorithm != "grpo" else "")
                + f" divides the trainer's log-probs at scope.student_temperature {s.student_temperature} "
                f"by the rollout engine's, which are at the sampling temperature {engine_temperature} "
                "(rollout.temperature; 1 when greedy): set --scope-student-temperature equal to "
                "--rollout-temperature, or scope.old_logprobs 'recomputed'")
        t, pp = self.training, self.parallel.pipeline_model_parallel_size
        if t.max_tokens_per_micro_batch and pp > 1:
            raise ValueError("training.max_tokens_per_micro_batch needs pipeline_model_parallel_size 1 (the "
                             "pipeline's transfers need micro-batches of one shape); use micro_batch_size")
        if t.recompute_granularity == "full" and t.recompute_num_layers > self.student.num_layers // pp:
            raise ValueError(f"training.recompute_num_layers {t.recompute_num_layers} exceeds the student's "
                             f"{self.student.num_layers // pp} layers per pipeline stage")
        remote_teacher = self.teacher_serving.engine == "sglang"
        if self.scope.uses_teacher and remote_teacher and s.resolved_teacher_temperature != 1.0:
            raise ValueError(
                f"teacher_serving.engine 'sglang' gives the teacher's log-probs at temperature 1 (SGLang "
                f"computes prompt log-probs from the raw logits), but the loss wants them at "
                f"{s.resolved_teacher_temperature:g} (scope.teacher_temperature, which defaults to "
                "scope.student_temperature): pass --scope-teacher-temperature 1, or use the Megatron teacher")
        rs, ts = self.rollout.sglang, self.teacher_serving.sglang
        if (self.rollout.engine == "sglang" and rs.launches and remote_teacher and ts.launches
                and self.scope.uses_teacher and rs.base_port < ts.base_port + ts.num_servers
                and ts.base_port < rs.base_port + rs.num_servers):
            raise ValueError(
                f"the launched rollout servers (ports {rs.base_port}..{rs.base_port + rs.num_servers - 1}) and "
                f"teacher servers ({ts.base_port}..{ts.base_port + ts.num_servers - 1}) would share ports: "
                f"pass e.g. --teacher-serving-sglang-base-port {rs.base_port + 1000}")
        if self.scope.uses_teacher and remote_teacher and self.scope.kl_estimator == "full":
            raise ValueError("scope.kl_estimator 'full' needs the teacher's logits over the whole vocabulary; "
                             "an SGLang teacher gives log-probs of the sampled tokens and its top-k: use "
                             "'sampled', 'k3' or 'topk', or teacher_serving.engine 'megatron'")
        if self.scope.uses_teacher and not remote_teacher and self.checkpoint.teacher_load is None:
            raise ValueError(f"algorithm {self.scope.algorithm!r} distills from a teacher: set "
                             "checkpoint.teacher_load (--teacher-load)")

    def check_world(self, world_size: int) -> int:
        """Validates the layout against the number of processes; returns the data-parallel size."""
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not divisible by TP={tp} x PP={pp}; launch "
                              f"a multiple of {tp * pp} processes or change the parallel sizes")
        dp = world_size // (tp * pp)
        models = [("student", self.student)]
        if self.scope.uses_teacher and self.teacher_serving.engine == "megatron":
            models.append(("teacher", self.teacher))  # a remote or unused teacher is not built here
        for name, model in models:
            try:
                model.validate_parallel(tp, pp)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
        per_rank = self.training.prompts_per_step
        if per_rank % dp:
            raise ConfigError(f"training.prompts_per_step {per_rank} is not divisible by the "
                              f"data-parallel size {dp}")
        rollouts = per_rank // dp * self.rollout.n
        if rollouts % self.training.micro_batch_size and not self.training.max_tokens_per_micro_batch:
            raise ConfigError(f"each data-parallel rank samples {rollouts} rollouts per step, not a "
                              f"multiple of training.micro_batch_size "
                              f"{self.training.micro_batch_size}")
        return dp


def load_config(argv=None) -> TrainConfig:
    """The run's configuration from the command line (see the module docstring)."""
    return parse_config(TrainConfig, argv, description="SCOPE training (scope-megatron)")


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown_table(TrainConfig), end="")
    else:
        print(dataclasses.asdict(load_config(sys.argv[1:])))
