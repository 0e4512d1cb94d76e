"""SGLang serving for the trainer: the rollout engine and the remote teacher built from the config,
run by one leader rank per data-parallel replica and shared with the replica's other
tensor/pipeline-parallel ranks.

Roles. Every rank calls the same functions (they are collective over the model-parallel group):
the replica's leader (first rank of its model-parallel group) sends the HTTP requests for the
replica's prompts, then broadcasts the result tensors to its peers, which need identical rollouts
for the parallel forward passes. Weight sync after an optimizer step is collective over all ranks
(the export gathers the sharded student) and global rank 0 alone talks to the servers.

The served teacher's tokenizer is checked once when its scorer is built: global rank 0 (a replica
leader) probes every teacher server with the student tokenizer's ids and broadcasts the verdict,
so a teacher with another tokenizer stops every rank with an error before training starts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from scope_megatron.rollout import RolloutEngine, Rollouts, SamplingParams
from scope_megatron.utils.collectives import result_from_source

log = logging.getLogger(__name__)

_ROLLOUT_FIELDS = ("prompt_ids", "prompt_lengths", "response_ids", "response_mask", "logprobs", "group_ids",
                   "finished")


def model_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_model_parallel_group()


def is_replica_leader() -> bool:
    group = model_parallel_group()
    return dist.get_rank() == dist.get_process_group_ranks(group)[0]


def broadcast_tensors(tensors: Optional[Dict[str, torch.Tensor]], device) -> Dict[str, torch.Tensor]:
    """The leader's named tensors on `device` on every rank of its model-parallel group (shapes and
    dtypes go first as a small object, then each tensor with one broadcast on `device`)."""
    group = model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) == 1:  # no peers, but the engine's CPU tensors still go to the training device
        return {k: v.to(device) for k, v in tensors.items()}
    leader = ranks[0]
    meta = [None]
    if dist.get_rank() == leader:
        meta[0] = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    dist.broadcast_object_list(meta, src=leader, group=group)
    out = {}
    for name, (shape, dtype) in meta[0].items():
        if dist.get_rank() == leader:
            t = tensors[name].to(device).contiguous()
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        wire = t.to(torch.uint8) if dtype == torch.bool else t  # some backends lack bool
        dist.broadcast(wire, src=leader, group=group)
        out[name] = wire.to(torch.bool) if dtype == torch.bool else wire
    return out


class ReplicaEngine(RolloutEngine):
    """Wraps an engine that only the replica leader holds (None elsewhere): generate on the leader,
    broadcast the Rollouts to the replica's model-parallel peers."""

    def __init__(self, engine: Optional[RolloutEngine], device, weight_update=None):
        self.engine = engine
        self.device = device
        self.weight_update = weight_update

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, key: int = 0) -> Rollouts:
        rollouts = self.engine.generate(prompts, params, key=key) if self.engine is not None else None
        fields = {f: getattr(rollouts, f) for f in _ROLLOUT_FIELDS} if rollouts is not None else None
        return Rollouts(**broadcast_tensors(fields, self.device))

    def update_weights(self, step: Optional[int] = None) -> None:
        if self.weight_update is not None:
            self.weight_update(step)


def start_servers(scfg, log_dir: Path, role: str):
    """(servers launched here or None, their URLs on every rank). Global rank 0 launches
    scfg.num_servers servers on its own node from scfg.model_path when no URLs are given (the
    others wait), or checks that the given servers answer /health. Servers on other nodes: start
    them there and pass their URLs."""
    import shlex

    from scope_megatron.rollout.sglang import SGLangServers

    holder = {}

    def setup():
        if scfg.urls:
            servers = SGLangServers.attach(scfg.urls, wait=True, startup_timeout=scfg.startup_timeout_s)
            return list(servers.urls)
        servers = SGLangServers.launch(scfg.model_path, num_servers=scfg.num_servers, base_port=scfg.base_port,
                                       tp_size=scfg.tp, mem_fraction_static=scfg.mem_fraction_static,
                                       deterministic=scfg.deterministic, extra_args=shlex.split(scfg.extra_args),
                                       gpus=scfg.gpu_lists,
                                       command=launch_command(scfg.launch_command),
                                       log_dir=Path(log_dir) / f"sglang-{role}",
                                       startup_timeout=scfg.startup_timeout_s)
        holder["servers"] = servers
        return list(servers.urls)

    urls = result_from_source(setup, is_source=dist.get_rank() == 0, what="SGLang server setup")
    return holder.get("servers"), urls


def launch_command(text: str) -> tuple:
    import shlex
    import sys

    parts = shlex.split(text)
    if not parts:
        raise ValueError("rollout/teacher sglang.launch_command is empty")
    return tuple([sys.executable if parts[0] == "python" else parts[0]] + parts[1:])


def client_for(scfg, urls, progress: bool):
    from scope_megatron.rollout.sglang import SGLangClient

    return SGLangClient(urls, max_in_flight=scfg.max_in_flight, timeout=scfg.request_timeout_s,
                        retries=scfg.retries, progress=progress)


def build_weight_sync(cfg, student_chunks, device):
    """The rollout.weight_sync strategy over the student's live chunks (update() is collective
    over all ranks; global rank 0 talks to the servers)."""
    from scope_megatron.convert import export_hf, hf_named_tensors
    from scope_megatron.rollout.sglang import DiskWeightSync, DistributedWeightSync, TensorWeightSync

    r = cfg.rollout
    template = hf_template_of(cfg)
    bf16 = next(student_chunks[0].parameters()).dtype == torch.bfloat16
    rank0 = dist.get_rank() == 0
    if r.weight_sync == "disk":
        dtype = "bfloat16" if bf16 else None
        return DiskWeightSync(lambda path: export_hf(student_chunks, template, path, dtype=dtype, overwrite=True),
                              default_weights_dir(cfg), is_rank0=rank0)

    def named_tensors():
        # assembled inside data-parallel replica 0's TP x PP group (global rank 0 sends them);
        # the other replicas hold the same weights and have nothing to do
        from megatron.core import parallel_state

        if parallel_state.get_data_parallel_rank() != 0:
            return iter(())
        return hf_named_tensors(student_chunks, template, device=device)

    bucket = int(r.weight_sync_bucket_mb) << 20
    if r.weight_sync == "tensor":
        return TensorWeightSync(named_tensors, bucket_bytes=bucket, tp_size=r.sglang.tp, is_rank0=rank0)
    address = r.weight_sync_master_address or _own_address()
    return DistributedWeightSync(named_tensors, master_address=address, master_port=r.weight_sync_master_port,
                                 server_tp_sizes=r.sglang.tp, bucket_bytes=bucket, is_rank0=rank0)


def _own_address() -> str:
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class _Served:
    """Servers of one role (launched here or attached) and, on each replica leader, a client."""

    def __init__(self, cfg, scfg, role: str, progress: bool):
        self.servers, self.urls = start_servers(scfg, Path(cfg.logging.log_dir), role)
        self.client = client_for(scfg, self.urls, progress=progress) if is_replica_leader() else None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.servers is not None:
            self.servers.shutdown()


class SGLangRollouts(_Served):
    """Everything the trainer holds for rollout.engine 'sglang': servers (when launched here), the
    leader's client and engine, the weight sync, wrapped as one RolloutEngine for every rank."""

    def __init__(self, cfg, student_chunks, pad_id: int, dp_rank: int, device):
        from scope_megatron.rollout.sglang import SGLangEngine

        # a bar over the prompts of each generate call, on global rank 0 only
        super().__init__(cfg, cfg.rollout.sglang, "rollout", progress=dist.get_rank() == 0)
        self.sync = build_weight_sync(cfg, student_chunks, device)
        inner = SGLangEngine(self.client, pad_id=pad_id, stream_seed=dp_rank, device="cpu") if self.client else None
        self.engine = ReplicaEngine(inner, device, weight_update=self.update_weights)

    def update_weights(self, step: Optional[int]) -> None:
        """Collective over all ranks: export, global rank 0 pushes and verifies; the leaders'
        engines then refuse samples of any other weight_version."""
        from scope_megatron.rollout.sglang import weight_version

        self.sync.update(self.client, int(step or 0))
        if self.engine.engine is not None:  # the replica leaders' SGLangEngine
            self.engine.engine.weight_version = weight_version(int(step or 0))


class SGLangTeacherScorer(_Served):
    """teacher_serving.engine 'sglang': the remote teacher of every replica leader.

    temperature: the loss's teacher temperature; TrainConfig refuses any but 1 at parse time (SGLang's
    prompt log-probs are at temperature 1). tokenizer: the student's (what its token ids mean, the
    task's), checked against every teacher server once, here (check_teacher_tokenizer)."""

    def __init__(self, cfg, pad_id: int, temperature: float, tokenizer):
        from scope_megatron.rollout.sglang import SGLangTeacher

        super().__init__(cfg, cfg.teacher_serving.sglang, "teacher", progress=False)
        top_k = cfg.scope.topk_k if cfg.scope.kl_estimator == "topk" else 0
        self.teacher = (SGLangTeacher(self.client, temperature=temperature, pad_id=pad_id, top_logprobs_num=top_k)
                        if self.client else None)
        self.tokenizer_verdict = None
        if cfg.teacher_serving.check_tokenizer:
            try:
                self.tokenizer_verdict = self.check_teacher_tokenizer(cfg, tokenizer)
            except BaseException:
                self.close()
                raise

    def check_teacher_tokenizer(self, cfg, tokenizer) -> Dict[str, str]:
        """Collective over all ranks: global rank 0 (a replica leader, whose client reaches every
        teacher server) runs SGLangTeacher.check_tokenizer and broadcasts the verdict ({url: "ok"
        | "unverified"}); a mismatch (or a failed probe) raises TokenizerMismatch / SGLangError
        there and an SGLangError quoting it on every other rank, before any training step."""
        from scope_megatron.rollout.sglang import SGLangError

        def check():
            verdict = self.teacher.check_tokenizer(tokenizer)
            log.info("teacher tokenizer check: %s", verdict)
            return verdict

        return result_from_source(check, is_source=dist.get_rank() == 0, error_cls=SGLangError,
                                  what="the teacher tokenizer check")

    def score(self, rollouts: Rollouts, device) -> Dict[str, torch.Tensor]:
        """{"teacher_logprobs": [B, L]} (+ "teacher_top_ids", "teacher_top_logprobs" [B, L, k] for
        the topk estimator) on every rank of the replica."""
        out = None
        if self.teacher is not None:
            scores = self.teacher.score(rollouts)
            out = {"teacher_logprobs": scores.logprobs.to(torch.float32)}
            if scores.top_ids is not None:
                out["teacher_top_ids"] = scores.top_ids
                out["teacher_top_logprobs"] = scores.top_logprobs.to(torch.float32)
        return broadcast_tensors(out, device)


def default_weights_dir(cfg) -> Path:
    return Path(cfg.rollout.weight_sync_dir or Path(cfg.logging.log_dir) / "weights")


def hf_template_of(cfg) -> str:
    template = cfg.rollout.hf_template or cfg.rollout.sglang.model_path or cfg.task.tokenizer
    if not template:
        raise ValueError("rollout.engine 'sglang' exports the student as a Hugging Face model: set "
                         "rollout.hf_template (the student's original HF directory)")
    return template

