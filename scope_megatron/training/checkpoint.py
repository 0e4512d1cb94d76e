"""Atomic, reshardable training checkpoints with megatron's dist_checkpointing.

Layout of a checkpoint root:

    <root>/latest                    "iter_0000200\\n": the last complete checkpoint (atomically replaced)
    <root>/iter_0000200/             one complete checkpoint
        metadata.json, common.pt, __*.distcp   dist_checkpointing (torch_dist): model, optimizer
        scope_checkpoint.json        step, architecture, parallel layout, versions, optimizer format
                                     (with a distributed optimizer's gradient-bucket sizes)
        extra_state.pt               the caller's extra_state and the LR scheduler's state
        rng/rank_00000.pt ...        every rank's RNG states (python, numpy, torch, CUDA, Megatron's tracker)
    <root>/.tmp-iter_0000300/        a save in progress (never loaded; removed by the next save)

A save writes everything into the temporary directory, fsyncs it, renames it to iter_XXXXXXX and
only then replaces `latest`. A process killed at any point leaves `latest` naming a complete
checkpoint. Model weights (and a non-distributed optimizer's state) reshard across TP/PP/DP
changes; a distributed optimizer's state reshards across DP changes ("dp_reshardable" format),
in the same gradient buckets (a load checks them against the saved ones before reading anything).

All functions here are collective: every rank of the default process group calls them with its
own model chunks, in the same order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from scope_megatron.utils.files import fsync_path as _fsync_path
from scope_megatron.utils.files import fsync_tree as _fsync_tree

from . import models, platform

logger = logging.getLogger(__name__)

FORMAT = "scope-megatron-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"
METADATA = "scope_checkpoint.json"
EXTRA_STATE = "extra_state.pt"
RNG_DIR = "rng"
_TMP_PREFIX = ".tmp-"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")

# Architecture fields of megatron's TransformerConfig that must match between save and load
# (layout, dropout and initialization may change).
_ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "normalization", "layernorm_epsilon",
                "gated_linear_unit", "add_bias_linear", "add_qkv_bias", "qk_layernorm")
# ModelConfig fields that may differ between save and load (they do not change the weights' meaning).
_FREE_MODEL_FIELDS = ("init_method_std", "hidden_dropout", "attention_dropout",
                      "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab")


class CheckpointError(RuntimeError):
    """A checkpoint path that holds no usable checkpoint, or one that does not fit the model."""


def iter_name(step: int) -> str:
    """Directory name of the checkpoint of `step`: iter_0000042."""
    return f"iter_{step:07d}"


def _step_of(name: str) -> Optional[int]:
    match = _ITER_RE.match(name)
    return int(match.group(1)) if match else None


# ---- files ----------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Replaces `path` by a file holding `text`: written and fsynced beside it, renamed over it,
    the directory fsynced. Readers see the old or the new content, never a mix."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# ---- collective helpers ----------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank()


def _on_rank0(what: str, fn: Callable[[], Any]) -> Any:
    """Runs fn on rank 0 and shares its result; if it raised, every rank raises (instead of the
    others waiting forever in the next collective)."""
    outcome = [None]
    if _rank() == 0:
        try:
            outcome[0] = ("ok", fn())
        except Exception as exc:  # shared with the other ranks, re-raised below
            outcome[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise CheckpointError(f"{what} failed on rank 0: {value}")
    return value


# ---- what a checkpoint records about the model ---------------------------------------------


def _architecture(chunk: torch.nn.Module) -> Dict[str, Any]:
    config = chunk.config
    arch = {name: getattr(config, name, None) for name in _ARCH_FIELDS}
    arch["padded_vocab_size"] = getattr(chunk, "vocab_size", None)
    arch["tied_embeddings"] = getattr(chunk, "share_embeddings_and_output_weights", None)
    arch["position_embedding_type"] = getattr(chunk, "position_embedding_type", None)
    arch["rotary_base"] = getattr(chunk, "rotary_base", None)
    return arch


def _model_config(chunk: torch.nn.Module) -> Optional[Dict[str, Any]]:
    cfg = getattr(chunk, "scope_model_config", None)
    return dataclasses.asdict(cfg) if cfg is not None else None


def _chunk_keys(n: int) -> List[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict:
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_chunk_keys(len(chunks)), chunks)}


def _optimizer_format(optimizer, distrib_optim_sharding_type: str) -> Dict[str, Any]:
    """How the optimizer's state is laid out in the checkpoint (passed to sharded_state_dict)."""
    distributed = any(getattr(opt.config, "use_distributed_optimizer", False)
                      for opt in _sub_optimizers(optimizer))
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed:
        metadata["distrib_optim_sharding_type"] = distrib_optim_sharding_type
    return {"distributed": distributed, "sharding_metadata": metadata}


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _bucket_layout(optimizer) -> List[Optional[dict]]:
    """This rank's dp_reshardable bucket layout, per sub-optimizer: its DP group's index (the
    rank in the TP x PP group, which keys its state in the checkpoint) and, per gradient buffer,
    Megatron's per_bucket_numel_unpadded (the bucket sizes without the padding to a DP multiple,
    which is what reshards across DP). None for a sub-optimizer that is not distributed. The
    bucket boundaries follow the DDP bucket_size (set by overlap_grad_reduce, and by default
    with it from the DP size), so they can differ between a save and a load in the same layout."""
    out: List[Optional[dict]] = []
    for opt in _sub_optimizers(optimizer):
        numels = getattr(opt, "per_bucket_numel_unpadded", None)
        if numels is None:
            out.append(None)
            continue
        out.append({"dp_group": int(opt.data_parallel_group_idx), "buffers": _buffers_json(numels)})
    return out


def _buffers_json(per_bucket_numel_unpadded) -> List[Dict[str, List[int]]]:
    """Megatron's per_bucket_numel_unpadded ([{(param dtype, grad dtype): [sizes]}] per gradient
    buffer) as JSON: the dtype pair as a string key."""
    return [{str(dtypes): [int(n) for n in sizes] for dtypes, sizes in buf.items()}
            for buf in per_bucket_numel_unpadded]


def _ddp_settings(model_chunks) -> Optional[Dict[str, Any]]:
    """The DDP settings that decide the gradient buckets (Megatron replaces bucket_size by its
    default, or by None without overlap_grad_reduce, so this is the effective value)."""
    first = model_chunks[0] if isinstance(model_chunks, (list, tuple)) else model_chunks
    ddp = getattr(first, "ddp_config", None)
    if ddp is None:
        return None
    return {"overlap_grad_reduce": bool(ddp.overlap_grad_reduce), "bucket_size": ddp.bucket_size}


def _megatron_bucket_layout(optimizer, ckpt: Path) -> List[Optional[dict]]:
    """For a checkpoint saved before scope_checkpoint.json recorded the buckets: the bucket sizes
    Megatron's dp_reshardable state keeps for this rank's TP x PP group
    (optimizer.distributed.dp_group_idx_<i>.per_bucket_numel_unpadded), in _gathered_bucket_layout's
    form (this rank's group only). A small dist_checkpointing load; collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject

    mine = _bucket_layout(optimizer)
    request = {}
    for i, entry in enumerate(mine):
        if entry is not None:
            prefix = f"chained_{i}." if len(mine) > 1 else ""  # Megatron's prefix for chained dp_reshardable
            key = f"{prefix}optimizer.distributed.dp_group_idx_{entry['dp_group']}.per_bucket_numel_unpadded"
            request[str(i)] = ShardedObject(key, None, (1,), (0,), replica_id=(0, 0, _rank()))
    with _quiet_torch_dcp():
        loaded = dist_checkpointing.load(request, str(ckpt)) if request else {}
    return [None if entry is None else {str(entry["dp_group"]): _buffers_json(loaded[str(i)])}
            for i, entry in enumerate(mine)]


def _gathered_bucket_layout(optimizer) -> List[Optional[dict]]:
    """Every rank's _bucket_layout merged: per sub-optimizer {str(dp_group): buffers} (None if
    not distributed). Collective over the world (the DP replicas of a group agree)."""
    layouts: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, _bucket_layout(optimizer))
    merged: List[Optional[dict]] = []
    for sub in zip(*layouts):
        merged.append(None if sub[0] is None else {str(entry["dp_group"]): entry["buffers"] for entry in sub})
    return merged


# ---- save ---------------------------------------------------------------------------------


def save_checkpoint(root, step: int, model_chunks: Sequence[torch.nn.Module], optimizer=None,
                    scheduler=None, *, extra_state: Optional[dict] = None,
                    keep_last: Optional[int] = None,
                    distrib_optim_sharding_type: str = "dp_reshardable") -> Path:
    """Saves a checkpoint of `step` atomically into <root>/iter_XXXXXXX and points `latest` at it.

    model_chunks: this rank's chunks (GPTModel or Megatron DDP around it; DDP is unwrapped), a
      list or a single model.
    optimizer: Megatron optimizer (get_megatron_optimizer), or None for weights only.
    scheduler: anything with state_dict()/load_state_dict() (OptimizerParamScheduler), or None.
    extra_state: the caller's global state (data position, counters, ...), taken from rank 0;
      picklable. Its "step", if present, must equal `step` (load returns {"step": step, ...}).
    keep_last: keep this many checkpoints with steps <= `step` (None: keep all). The new one and
      `latest` are never deleted, nor are checkpoints of later steps (left by an abandoned run).
    distrib_optim_sharding_type: dist_checkpointing format of a distributed optimizer's state.
      "dp_reshardable" (tested): fully parallel, reshards across DP only. Megatron's
      "fully_reshardable" (also TP/PP, gathered on DP rank 0) fails to load with torch's Adam,
      i.e. without TE/Apex (megatron-core 0.16.1: KeyError 'step'); untested with TE.
    Every rank's RNG states are saved too. Returns the checkpoint directory. Collective.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    extra_state = dict(extra_state or {})
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    if extra_state.get("step", step) != step:
        raise ValueError(f"save_checkpoint: extra_state['step'] = {extra_state['step']} differs "
                         f"from step = {step}; drop it from extra_state (load returns the step)")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"save_checkpoint: keep_last must be None or a positive int, got {keep_last!r}")
    chunks = models.unwrap_chunks(model_chunks)
    final, tmp = root / iter_name(step), root / f"{_TMP_PREFIX}{iter_name(step)}"

    _on_rank0("preparing the checkpoint directory", lambda: _prepare(root, final, tmp))
    sharded = _model_sharded_state_dict(chunks)
    opt_format = None
    if optimizer is not None:
        opt_format = _optimizer_format(optimizer, distrib_optim_sharding_type)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, metadata=opt_format["sharding_metadata"])
        if opt_format["sharding_metadata"].get("distrib_optim_sharding_type") == "dp_reshardable":
            opt_format["bucket_layout"] = _gathered_bucket_layout(optimizer)
            opt_format["ddp"] = _ddp_settings(model_chunks)
    with _quiet_torch_dcp():
        dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_save_strategy())

    _torch_save(platform.rng_state(), tmp / RNG_DIR / f"rank_{_rank():05d}.pt")
    meta = None
    if _rank() == 0:
        _torch_save({"extra_state": extra_state,
                     "scheduler": scheduler.state_dict() if scheduler is not None else None},
                    tmp / EXTRA_STATE)
        meta = _metadata(step, chunks, opt_format, scheduler is not None)
    dist.barrier()
    _on_rank0("publishing the checkpoint", lambda: _publish(root, tmp, final, meta, keep_last))
    return final


@contextlib.contextmanager
def _quiet_torch_dcp():
    """Hides torch.distributed.checkpoint's deprecation warnings about the APIs megatron-core
    calls (ShardedTensor, load_state_dict): they concern megatron's internals, not the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")
        yield


def _save_strategy():
    """torch_dist, with the writing of replicated shards spread over the data-parallel ranks
    (otherwise the first DP replica writes everything)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp_group)


def _prepare(root: Path, final: Path, tmp: Path) -> None:
    """Rank 0, before a save: removes leftovers of interrupted saves, refuses to overwrite the
    latest checkpoint, creates the temporary directory."""
    root.mkdir(parents=True, exist_ok=True)
    latest = _read_latest(root)
    if latest is not None and latest == final.name:
        raise CheckpointError(f"{final} is the latest checkpoint; saving step {_step_of(final.name)} "
                              "again would replace it in place. Save a later step (or delete it first)")
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink()
    tmp.mkdir()


def _metadata(step: int, chunks, opt_format, has_scheduler: bool) -> dict:
    from megatron.core import package_info

    lay = platform.layout()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
        "architecture": _architecture(chunks[0]), "model_config": _model_config(chunks[0]),
        "layout": {"world_size": lay.world_size, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "vpp": lay.vpp},
        "optimizer": opt_format, "scheduler": has_scheduler,
        "versions": {"megatron_core": package_info.__version__, "torch": torch.__version__},
    }


def describe(step: int, model_chunks: Sequence[torch.nn.Module]) -> dict:
    """The scope_checkpoint.json record of a weights-only checkpoint of these chunks, for writers
    that produce this format without save_checkpoint (the Hugging Face converter)."""
    return _metadata(step, model_chunks, None, False)


def _publish(root: Path, tmp: Path, final: Path, meta: dict, keep_last: Optional[int]) -> None:
    """Rank 0, after every rank wrote its part: metadata, fsync, rename, `latest`, pruning."""
    (tmp / METADATA).write_text(json.dumps(meta, indent=1, default=str))
    _fsync_tree(tmp)
    if final.exists():  # a complete save of this step that never became `latest` (killed before)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(root)
    _write_atomic(root / LATEST, final.name + "\n")
    if keep_last is not None:
        _prune(root, final, keep_last)


def _prune(root: Path, newest: Path, keep_last: int) -> None:
    """Deletes checkpoints older than the newest `keep_last` with steps <= newest's."""
    limit = _step_of(newest.name)
    older = sorted((s, p) for p in root.iterdir() if p.is_dir()
                   for s in [_step_of(p.name)] if s is not None and s < limit)
    for _, path in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path)


# ---- load ---------------------------------------------------------------------------------


def _read_latest(root: Path) -> Optional[str]:
    path = root / LATEST
    return path.read_text().strip() if path.is_file() else None


def resolve_checkpoint(path) -> Path:
    """The checkpoint directory `path` designates: a root (its `latest`) or a checkpoint
    directory itself. Raises CheckpointError naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a checkpoint root "
                              "(the directory holding `latest`) or one of its iter_XXXXXXX directories")
    if (path / LATEST).is_file():
        name = _read_latest(path)
        ckpt = path / name
        if not (ckpt / METADATA).is_file():
            raise CheckpointError(f"{path / LATEST} names {name}, which holds no complete checkpoint "
                                  f"({ckpt / METADATA} is missing); load an iter_XXXXXXX directory "
                                  "explicitly")
        return ckpt
    if (path / METADATA).is_file():
        return path
    if path.is_dir() and path.name.startswith(_TMP_PREFIX):
        raise CheckpointError(f"{path} is an interrupted save, not a checkpoint; load its root instead")
    raise CheckpointError(f"{path} holds no checkpoint: neither a `{LATEST}` file (a checkpoint root) "
                          f"nor {METADATA} (a checkpoint directory)")


def is_checkpoint_root(path) -> bool:
    """Whether `path` has a `latest` file: a checkpoint root that a save has published to,
    whether or not has_checkpoint() can resume from it (iter_XXXXXXX directories without it are
    an interrupted first save, which the next save replaces)."""
    return (Path(path) / LATEST).exists()


def has_checkpoint(path) -> bool:
    """Whether `path` designates a complete checkpoint (see resolve_checkpoint); never raises
    for a missing or empty path."""
    try:
        resolve_checkpoint(path)
    except CheckpointError:
        return False
    return True


def checkpoint_info(path) -> dict:
    """The metadata of the checkpoint `path` designates (see resolve_checkpoint), with its
    directory under "path". Reads only small files; needs no process group."""
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / METADATA).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / METADATA} is not a {FORMAT} file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint format version {meta.get('format_version')}; "
                              f"this code reads version {FORMAT_VERSION}")
    return {**meta, "path": str(ckpt)}


def _check_model(meta: dict, chunks, ckpt: Path) -> None:
    """Raises CheckpointError when the checkpoint's model differs from these chunks."""
    saved, now = meta["architecture"], _architecture(chunks[0])
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, model {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if k != "padded_vocab_size" and saved.get(k) != now.get(k)]
    saved_cfg, now_cfg = meta.get("model_config"), _model_config(chunks[0])
    if saved_cfg and now_cfg:
        diffs += [f"{k}: checkpoint {saved_cfg.get(k)!r}, model {now_cfg.get(k)!r}"
                  for k in sorted(set(saved_cfg) | set(now_cfg))
                  if k not in _FREE_MODEL_FIELDS and saved_cfg.get(k) != now_cfg.get(k)
                  and not any(k in d for d in diffs)]
    if diffs:
        raise CheckpointError(f"{ckpt} was saved from a different model ({'; '.join(diffs)}); build "
                              "the model with the checkpoint's configuration")
    if saved["padded_vocab_size"] != now["padded_vocab_size"]:
        # Rows at or beyond the true vocabulary are padding: megatron's embedding and output
        # layer load with allow_shape_mismatch (extra rows zero, missing rows dropped), which is
        # exact as long as both tables hold every real token.
        vocab = (saved_cfg or {}).get("vocab_size")
        if vocab is None or min(saved["padded_vocab_size"], now["padded_vocab_size"]) < vocab:
            raise CheckpointError(
                f"{ckpt} has a padded vocabulary of {saved['padded_vocab_size']} rows "
                f"(TP={meta['layout']['tp']}) but the model has {now['padded_vocab_size']} "
                f"(TP={platform.layout().tp}), and the true vocabulary size is "
                f"{'unknown' if vocab is None else vocab}; build the model with padded_vocab="
                f"{saved['padded_vocab_size']} (if this TP divides it) or load at the checkpoint's TP")


def _check_optimizer(meta: dict, optimizer, ckpt: Path) -> None:
    if meta["optimizer"] is None:
        raise CheckpointError(f"{ckpt} holds no optimizer state; pass optimizer=None to load the "
                              "model weights only")
    distributed = _optimizer_format(optimizer, "dp_reshardable")["distributed"]
    if distributed != meta["optimizer"]["distributed"]:
        kind = {True: "distributed", False: "regular"}
        raise CheckpointError(f"{ckpt} holds the state of a {kind[meta['optimizer']['distributed']]} "
                              f"optimizer but a {kind[distributed]} one was passed; use the same "
                              "use_distributed_optimizer setting, or optimizer=None")
    lay, saved = platform.layout(), meta["layout"]
    sharding = meta["optimizer"]["sharding_metadata"].get("distrib_optim_sharding_type")
    # The dp_reshardable state is laid out per model chunk (one gradient buffer each) and
    # bucket: a different TP, PP or VPP changes every buffer's contents.
    if sharding == "dp_reshardable" and (lay.tp, lay.pp, lay.vpp) != (saved["tp"], saved["pp"], saved.get("vpp")):
        raise CheckpointError(f"{ckpt}: this distributed optimizer state (dp_reshardable) reshards "
                              f"across DP only (saved at TP={saved['tp']} PP={saved['pp']} "
                              f"VPP={saved.get('vpp')}, now TP={lay.tp} PP={lay.pp} VPP={lay.vpp}); "
                              "load with optimizer=None (fresh optimizer state) or at the saved TP/PP/VPP")
    if sharding == "dp_reshardable":
        saved_layout = meta["optimizer"].get("bucket_layout")
        if saved_layout is None:  # saved before the layout was recorded here: Megatron's own record
            saved_layout = _megatron_bucket_layout(optimizer, ckpt)
        _check_bucket_layout(saved_layout, optimizer, ckpt, meta["optimizer"].get("ddp"))


def _describe_buckets(now: list, saved: Optional[list]) -> str:
    """The first difference between two buffers' bucket lists, briefly (a large model has
    hundreds of buckets)."""
    def sizes(values):
        shown = ", ".join(map(str, values[:3]))
        return f"{len(values)} bucket(s) of [{shown}{', ...' if len(values) > 3 else ''}] elements"

    if saved is None or len(saved) != len(now):
        return f"{len(now)} gradient buffer(s), checkpoint {'none' if saved is None else len(saved)}"
    for b, (mine, theirs) in enumerate(zip(now, saved)):
        if mine != theirs:
            if mine.keys() != theirs.keys():
                return f"gradient buffer {b} holds {sorted(mine)}, checkpoint {sorted(theirs)}"
            key = next(k for k in mine if mine[k] != theirs[k])
            return f"gradient buffer {b} {key}: {sizes(mine[key])}, checkpoint {sizes(theirs[key])}"
    return "no difference"


def _check_bucket_layout(saved: list, optimizer, ckpt: Path, saved_ddp: Optional[dict] = None) -> None:
    """Raises CheckpointError on every rank when any rank's gradient buckets differ from those
    its DP group saved (dist_checkpointing would fail mid-load with a shape error on some ranks
    and leave the others waiting). saved_ddp: the save's DDP settings (_ddp_settings), for the
    fix the error names. Collective over the world."""
    problem = None
    mine = _bucket_layout(optimizer)
    if len(mine) != len(saved):
        problem = f"{len(saved)} optimizer(s) saved, {len(mine)} passed"
    for i, (now, then) in enumerate(zip(mine, saved)):
        if problem is None and now is not None and then is not None:
            want = then.get(str(now["dp_group"]))
            if want != now["buffers"]:
                problem = (f"rank {_rank()} (TP x PP group rank {now['dp_group']}, optimizer {i}): "
                           f"{_describe_buckets(now['buffers'], want)}")
    problems: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = [p for p in problems if p is not None]
    if found:
        if saved_ddp is None:
            fix = "resume with the settings it was saved with (not recorded in this checkpoint)"
        elif not saved_ddp["overlap_grad_reduce"]:
            fix = ("it was saved without overlap_grad_reduce (one bucket per buffer): resume without it "
                   "(the trainer's --overlap-grad-reduce false)")
        else:
            fix = (f"it was saved with overlap_grad_reduce and bucket_size={saved_ddp['bucket_size']}: resume "
                   f"with them (the trainer's --overlap-grad-reduce true --ddp-bucket-size {saved_ddp['bucket_size']})")
        raise CheckpointError(
            f"{ckpt}: this distributed optimizer state (dp_reshardable) is laid out in the gradient "
            f"buckets it was saved with, and this run's buckets differ ({found[0]}"
            f"{f'; {len(found) - 1} more rank(s)' if len(found) > 1 else ''}). The buckets follow the DDP "
            f"bucket_size and overlap_grad_reduce (whose default bucket_size grows with the DP size): {fix}, "
            "or load with optimizer=None (fresh optimizer state)")


def _prepare_optimizer_for_load(optimizer) -> None:
    """A distributed optimizer allocates its state lazily (at its first step); the loaded state
    is copied into that storage, so a fresh one gets placeholder state first."""
    for opt in _sub_optimizers(optimizer):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Gives every parameter's torch-Adam state its own, correct `step` tensor.

    Without TE/Apex, megatron's DistributedOptimizer keeps the Adam step count in its param
    groups' "step" when saving (DistributedOptimizer.state_dict); on load
    (DistributedOptimizer.load_state_dict) the per-parameter states keep the count of the
    placeholder step, or get one tensor shared by all parameters, which torch's Adam would then
    increment once per parameter per update. Either breaks the bias correction after a resume.
    """
    for opt in _sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for param in group["params"]:
                state = inner.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    step = group.get("step", state["step"])
                    state["step"] = torch.tensor(float(step), dtype=state["step"].dtype,
                                                 device=state["step"].device)


def load_checkpoint(path, model_chunks: Sequence[torch.nn.Module], optimizer=None,
                    scheduler=None, *, restore_rng: Optional[bool] = None) -> dict:
    """Loads a checkpoint into this rank's model chunks (and optimizer, scheduler) in the
    current parallel layout, which may differ from the saved one.

    path: a checkpoint root (its `latest` is used) or an iter_XXXXXXX directory.
    restore_rng: restore every rank's RNG states (python, numpy, torch, CUDA, Megatron's
      tracker) as saved; None does it when an optimizer is loaded too (a resume), not for a
      weights-only load (a teacher, an initialization). Restoring needs the saved layout (TP,
      PP, DP); in another layout the states are left as they are and a warning says so. With
      it, training continues bit-identically.
    Returns {"step": step, **extra_state}. Raises CheckpointError (before touching the model) for a
    missing path, a directory without a checkpoint, a different model, or an optimizer state
    that cannot be loaded into `optimizer`. Collective.
    """
    from megatron.core import dist_checkpointing

    meta = checkpoint_info(path)
    ckpt = Path(meta["path"])
    chunks = models.unwrap_chunks(model_chunks)
    _check_model(meta, chunks, ckpt)
    if optimizer is not None:
        _check_optimizer(meta, optimizer, ckpt)
    if scheduler is not None and not meta["scheduler"]:
        raise CheckpointError(f"{ckpt} holds no scheduler state; pass scheduler=None")

    sharded = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        _prepare_optimizer_for_load(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=meta["optimizer"]["sharding_metadata"])
    with _quiet_torch_dcp():
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        chunk.load_state_dict(loaded[key])
    if optimizer is not None:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)

    extra = torch.load(ckpt / EXTRA_STATE, weights_only=False)
    if scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])
    if restore_rng is None:
        restore_rng = optimizer is not None
    if restore_rng:
        _restore_rng(meta, ckpt)
    return {"step": meta["step"], **extra["extra_state"]}


def load_weights(path, model_chunks: Sequence[torch.nn.Module], optimizer=None) -> dict:
    """A weights-only load (a starting point: --load) into model chunks that `optimizer` trains.

    A bf16 / fp16 model's optimizer keeps fp32 main copies of the weights, taken when it was
    built; they are refreshed from the loaded weights (Megatron's reload_model_params), or the
    first step would write the initialization back into the model. Returns load_checkpoint's
    dict. Collective.
    """
    state = load_checkpoint(path, model_chunks)
    if optimizer is not None:
        optimizer.reload_model_params()
    return state


def _restore_rng(meta: dict, ckpt: Path) -> None:
    lay, saved = platform.layout(), meta["layout"]
    if (lay.world_size, lay.tp, lay.pp, lay.dp) != tuple(saved[k] for k in ("world_size", "tp", "pp", "dp")):
        if _rank() == 0:
            logger.warning("%s was saved at TP=%d PP=%d DP=%d and is loaded at TP=%d PP=%d DP=%d: RNG "
                           "states are not restored (the continuation is not bit-identical)", ckpt,
                           saved["tp"], saved["pp"], saved["dp"], lay.tp, lay.pp, lay.dp)
        return
    platform.set_rng_state(torch.load(ckpt / RNG_DIR / f"rank_{_rank():05d}.pt", weights_only=False))
