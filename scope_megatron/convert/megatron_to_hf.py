"""A Megatron model -> a Hugging Face directory (safetensors, config.json, tokenizer files).

`export_hf` is the one entry point, for the tool and for the trainer (the SGLang disk weight sync):

* from a checkpoint directory (a root with `latest`, or an iter_XXXXXXX directory, saved at any
  TP/PP): no process group needed; each layer's slice of each tensor is read from the stored
  chunks that hold it, turned into HF tensors and streamed into the safetensors shards;
* from in-memory model chunks (collective over the default group, result written by rank 0):
  at TP=1, PP=1 rank 0 reads its own parameters (its sharded_state_dict) directly; under
  TP/PP every rank writes its shards with dist_checkpointing into a temporary directory next to
  the output (weights only, on the file system the ranks share) and rank 0 converts that one
  layer at a time, as from a checkpoint. No rank ever gathers the whole model.

The template HF directory provides config.json (checked against the model's architecture, its
dtype entry set to the exported weights') and every non-weight file (tokenizer, generation
config, chat template), copied as they are. Vocabulary rows: the template's vocab_size rows are
written; row r is Megatron's row r, zero where Megatron has none; Megatron's padding rows beyond
the template's rows are dropped.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from scope_megatron.training import checkpoint
from scope_megatron.training.models import ModelConfig, unwrap_chunks

from scope_megatron.utils.collectives import result_from_source

from .errors import ConversionError
from .families import VocabRows, family_for, shapes_of
from .hf_io import CONFIG, INDEX, SINGLE_FILE, PlannedTensor, SafetensorsWriter, copy_template_files, \
    dtype_name, parse_size, read_config
from .hf_to_megatron import to_dtype
from .megatron_io import DistCheckpointReader, ShardedModelReader, read_slice
from .output import StagedOutput

DEFAULT_MAX_SHARD_SIZE = "5GB"
# architecture of a ModelConfig as HF config.json determines it (vocabulary sizes aside)
_ARCH = ("num_layers", "hidden_size", "num_attention_heads", "query_groups", "ffn_size", "head_dim",
         "rotary_base", "norm_epsilon", "add_qkv_bias", "qk_layernorm",
         "untie_embeddings_and_output_weights")


@dataclass(frozen=True)
class ExportedModel:
    """What `export_hf` wrote (on every rank): the directory, its files, the weights' dtype."""

    path: Path
    files: List[str]
    dtype: str
    num_tensors: int
    num_bytes: int


def holds_hf_model(path: Path) -> bool:
    """Whether a directory holds an HF model (config.json or safetensors weights)."""
    return any((path / name).exists() for name in (CONFIG, SINGLE_FILE, INDEX))


def _arch(cfg: ModelConfig) -> dict:
    values = {name: getattr(cfg, name, None) for name in _ARCH}
    values["head_dim"] = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    return values


def _check_template(template: dict, cfg: ModelConfig):
    """The template's family, after checking that its config.json describes `cfg`'s model."""
    family = family_for(template)
    described = family.model_config(template, vocab_size=None, padded_vocab=None,
                                    make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    ours, theirs = _arch(cfg), _arch(described)
    diffs = [f"{k}: model {ours[k]!r}, template {theirs[k]!r}" for k in _ARCH if ours[k] != theirs[k]]
    if diffs:
        raise ConversionError(f"the template's config.json describes another model ({'; '.join(diffs)}); "
                              "use the HF directory the checkpoint was converted from")
    if template["vocab_size"] < cfg.vocab_size:
        raise ConversionError(f"the template's vocab_size {template['vocab_size']} cannot hold the "
                              f"model's vocabulary of {cfg.vocab_size} tokens")
    return family


def _write_hf(open_source: Callable[[], Tuple[object, ModelConfig]], template_dir: Path, out_dir, *,
              dtype: Optional[torch.dtype], max_shard_size, overwrite: bool) -> ExportedModel:
    """The export itself (one process). open_source() -> (reader of regions of the Megatron
    tensors, ModelConfig); called after the output path is checked."""
    staged = StagedOutput(out_dir, overwrite=overwrite, kind="Hugging Face model", holds=holds_hf_model)
    reader, cfg = open_source()
    template_dir = Path(template_dir)
    template = read_config(template_dir)
    family = _check_template(template, cfg)
    embedding = "embedding.word_embeddings.weight"
    if embedding not in reader.keys():
        raise ConversionError(f"the Megatron weights hold no {embedding}; not a GPT checkpoint?")
    rows = VocabRows(hf=template["vocab_size"], megatron=reader.shape(embedding)[0])
    rules = family.rules(cfg, rows)
    missing = [r.megatron_key for r in rules.by_key().values() if r.megatron_key not in reader.keys()]
    if missing:
        raise ConversionError(f"the Megatron weights lack {', '.join(sorted(missing))}")
    plan = []
    for rule, layer in rules.items(cfg.num_layers):
        shape = reader.shape(rule.megatron_key)[1 if rule.layered else 0:]
        out_dtype = dtype or reader.dtype(rule.megatron_key)
        plan += [PlannedTensor(name, s, out_dtype)
                 for name, s in zip(rule.hf_for(layer), shapes_of(rule.to_hf, [shape]))]
    dtypes = sorted({dtype_name(t.dtype) for t in plan})
    with staged as tmp:
        writer = SafetensorsWriter(tmp, plan, parse_size(max_shard_size))
        try:
            for rule, layer in rules.items(cfg.num_layers):
                tensors = rule.to_hf(read_slice(reader, rule.megatron_key, layer))
                for name, tensor in zip(rule.hf_for(layer), tensors):
                    writer.write(name, tensor.to(dtype or tensor.dtype))
                del tensors
            files = writer.close()
        finally:
            writer.abort()
        config = dict(template)
        if len(dtypes) == 1:
            for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
                config[key] = dtypes[0]
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files += [CONFIG] + copy_template_files(template_dir, tmp)
        path = staged.commit()
    return ExportedModel(path, sorted(files), ",".join(dtypes), len(plan), sum(t.nbytes for t in plan))


def _open_checkpoint(path) -> Tuple[DistCheckpointReader, ModelConfig]:
    try:
        meta = checkpoint.checkpoint_info(path)
    except checkpoint.CheckpointError as exc:
        raise ConversionError(str(exc)) from exc
    if not meta.get("model_config"):
        raise ConversionError(f"{meta['path']} records no ModelConfig (scope_checkpoint.json "
                              "model_config); it was not saved by scope-megatron")
    return DistCheckpointReader(meta["path"]), ModelConfig(**meta["model_config"])


def _on_rank0(fn):
    """fn() on rank 0 and its result on every rank (an error there is raised on every rank)."""
    return result_from_source(fn, is_source=dist.get_rank() == 0, error_cls=ConversionError, what="export")


def _export_chunks(model_chunks: Sequence[torch.nn.Module], template_dir, out_dir, **kw) -> ExportedModel:
    from megatron.core import dist_checkpointing

    from scope_megatron.training import platform

    chunks = unwrap_chunks(model_chunks)
    cfg = getattr(chunks[0], "scope_model_config", None)
    if cfg is None:
        raise ConversionError("the model chunks carry no scope_model_config; build them with "
                              "scope_megatron.training.models")
    lay = platform.layout()
    if (lay.tp, lay.pp, lay.vpp) == (1, 1, None):
        return _on_rank0(lambda: _write_hf(lambda: (ShardedModelReader(chunks[0]), cfg), template_dir,
                                           out_dir, **kw))
    out_dir = Path(out_dir).absolute()
    shards = out_dir.parent / f".{out_dir.name}.export-shards"

    def fresh():
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)

    _on_rank0(fresh)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    try:
        dist_checkpointing.save({k: c.sharded_state_dict() for k, c in zip(keys, chunks)}, str(shards))
        return _on_rank0(lambda: _write_hf(lambda: (DistCheckpointReader(shards), cfg), template_dir,
                                           out_dir, **kw))
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(shards, ignore_errors=True)


def hf_named_tensors(model_chunks, template_dir, *, dtype=None, group=None, device=None
                     ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every weight of a live model, in the HF layout of `template_dir`
    (its config.json), one tensor at a time: what the in-memory SGLang weight sync sends.

    Collective over `group` (default: Megatron's model-parallel group, i.e. this replica's TP x PP
    ranks): every rank of it must consume the generator to the end; every rank gets the tensors.
    dtype: of the yielded tensors (None: the parameters'); device: where they are assembled.
    """
    from megatron.core import parallel_state

    from .megatron_io import GroupModelReader

    chunks = unwrap_chunks(model_chunks)
    cfg = getattr(chunks[0], "scope_model_config", None)
    if cfg is None:
        raise ConversionError("the model chunks carry no scope_model_config; build them with "
                              "scope_megatron.training.models")
    if group is None:
        group = parallel_state.get_model_parallel_group()
    reader = GroupModelReader(chunks, group=group, device=device)
    template = read_config(Path(template_dir))
    family = _check_template(template, cfg)
    embedding = "embedding.word_embeddings.weight"
    rows = VocabRows(hf=template["vocab_size"], megatron=reader.shape(embedding)[0])
    out_dtype = to_dtype(dtype)
    for rule, layer in family.rules(cfg, rows).items(cfg.num_layers):
        tensors = rule.to_hf(read_slice(reader, rule.megatron_key, layer))
        for name, tensor in zip(rule.hf_for(layer), tensors):
            yield name, tensor.to(out_dtype or tensor.dtype).contiguous()


def export_hf(source: Union[str, Path, torch.nn.Module, Sequence[torch.nn.Module]], template_dir,
              out_dir, *, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
              overwrite: bool = False) -> ExportedModel:
    """Writes `source` as an HF model directory `out_dir`.

    source: a checkpoint path (root or iter_XXXXXXX directory; any saved TP/PP), or this rank's
      model chunks (GPTModel or Megatron DDP, a list or one) — then collective over the default
      process group: call on every rank; rank 0 writes.
    template_dir: the HF directory the model came from (config.json must describe the same
      architecture; its vocab_size rows are written; tokenizer and other files are copied).
    dtype: of the written weights (None: as stored / held; "float32", "bfloat16", "float16");
      config.json's dtype entry follows.
    max_shard_size: bytes or "5GB"-style; above it the weights go into several shards with
      model.safetensors.index.json.
    overwrite: replace an existing HF model at out_dir (never other content).
    Memory: one layer's slice of one tensor (plus its HF pieces) at a time. The directory appears
    atomically. Raises ConversionError (on every rank) for bad input.
    """
    kw = dict(dtype=to_dtype(dtype), max_shard_size=max_shard_size, overwrite=overwrite)
    if isinstance(source, (str, Path)):
        return _write_hf(lambda: _open_checkpoint(source), template_dir, out_dir, **kw)
    return _export_chunks(source, template_dir, out_dir, **kw)
