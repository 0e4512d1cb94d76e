"""Hugging Face safetensors -> a Megatron checkpoint in scope-megatron's format, streaming.

The checkpoint is written in the global (TP=1) layout that Megatron's dist_checkpointing
reshards on load, so it loads under any TP/PP that divides the model; `tp`/`pp` only validate
that split and choose Megatron's vocabulary padding. The padded vocabulary is fixed in the
recorded ModelConfig (`padded_vocab`), so a trainer built from the YAML written next to the
checkpoint has exactly its rows at every TP dividing it.

Memory: the model is described by a GPTModel on the meta device; each chunk Megatron's
checkpoint format asks for (one layer's slice of one tensor) is built from the HF tensors it
needs, read one file mapping at a time, and written before the next one is made.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import yaml

from scope_megatron.training import checkpoint
from scope_megatron.training.models import ModelConfig, padded_vocab_size

from .errors import ConversionError
from .families import DecoderFamily, Rules, TensorRule, VocabRows, family_for, shapes_of
from .hf_io import HFCheckpoint
from .megatron_io import TensorProducer, narrow, streaming_save_strategy
from .output import StagedOutput
from .runtime import build_meta_model, single_process_megatron

logger = logging.getLogger(__name__)

DEFAULT_DIVISIBLE_BY = 128   # Megatron's default make_vocab_size_divisible_by
MODEL_YAML = "scope_model.yaml"
ROLES = {"student": "--load", "teacher": "--teacher-load"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """What `convert_hf_to_megatron` wrote: the checkpoint root (holds `latest`; load it with
    checkpoint.load_checkpoint or --load), its ModelConfig and the YAML model section."""

    path: Path
    model_config: ModelConfig
    yaml_path: Path
    architecture: str
    hf_vocab_rows: int


def to_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """None, a torch floating dtype, or its name ("float32", "bfloat16", "float16")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def hf_model_config(hf_config: dict, *, tp: int = 1, pp: int = 1, vocab_size: Optional[int] = None,
                    padded_vocab: Optional[int] = None,
                    make_vocab_size_divisible_by: Optional[int] = None,
                    max_position_embeddings: Optional[int] = None) -> Tuple[DecoderFamily, ModelConfig]:
    """The family and ModelConfig of an HF config.json, padded and checked for TP/PP.

    vocab_size: the true vocabulary (None = config.json's vocab_size). The padded vocabulary is
    `padded_vocab`, or else Megatron's rule: the smallest multiple of
    make_vocab_size_divisible_by (default 128) * tp holding vocab_size. Raises ConversionError
    when the model does not split into `tp` x `pp` (naming the numbers) or the padding is invalid.
    """
    if padded_vocab is not None and make_vocab_size_divisible_by is not None:
        raise ConversionError("give the padded vocabulary either as padded_vocab or through "
                              "make_vocab_size_divisible_by, not both")
    for name, value in (("tp", tp), ("pp", pp), ("make_vocab_size_divisible_by", make_vocab_size_divisible_by)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConversionError(f"{name} must be an integer >= 1, got {value!r}")
    family = family_for(hf_config)
    divisible_by = DEFAULT_DIVISIBLE_BY if make_vocab_size_divisible_by is None else make_vocab_size_divisible_by
    true_vocab = vocab_size if vocab_size is not None else hf_config.get("vocab_size")
    if padded_vocab is None and isinstance(true_vocab, int) and true_vocab > 0:
        padded_vocab = padded_vocab_size(true_vocab, divisible_by, tp)
    cfg = family.model_config(hf_config, vocab_size=vocab_size, padded_vocab=padded_vocab,
                              make_vocab_size_divisible_by=divisible_by,
                              max_position_embeddings=max_position_embeddings)
    try:
        cfg.validate_parallel(tp, pp)
    except ValueError as exc:
        raise ConversionError(f"--tp {tp} --pp {pp}: {exc}") from exc
    return family, cfg


def _megatron_shapes(model) -> Dict[str, Tuple[Tuple[int, ...], int]]:
    """{key: (global shape, prepended axes)} of the tensors in the model's checkpoint."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    return {sh.key: (tuple(sh.global_shape), sh.prepend_axis_num)
            for sh in nested_values(sharded) if isinstance(sh, ShardedTensor)}


def _listing(names, limit: int = 6) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensors(hf: HFCheckpoint, family: DecoderFamily, cfg: ModelConfig, rules: Rules,
                  megatron: Dict[str, Tuple[Tuple[int, ...], int]]) -> None:
    """Every Megatron tensor has a rule and every HF tensor a place, with the shapes config.json
    implies; else ConversionError naming the tensors."""
    from megatron.core import package_info

    by_key = rules.by_key()
    unmapped = set(megatron) - set(by_key)
    if unmapped:
        raise ConversionError(f"megatron-core {package_info.__version__} checkpoints hold tensors "
                              f"the converter does not map: {_listing(unmapped)}")
    absent = set(by_key) - set(megatron)
    if absent:
        raise ConversionError(f"internal: mapped tensors missing from megatron-core "
                              f"{package_info.__version__}'s model: {_listing(absent)}")
    expected: Dict[str, Tuple[int, ...]] = {}
    for rule, layer in rules.items(cfg.num_layers):
        shape, prepend = megatron[rule.megatron_key]
        if prepend != int(rule.layered):
            raise ConversionError(f"internal: {rule.megatron_key} has {prepend} stacked axes")
        for name, hf_shape in zip(rule.hf_for(layer), shapes_of(rule.to_hf, [shape[prepend:]])):
            expected[name] = hf_shape
    missing = [n for n in expected if n not in hf.tensors]
    if missing:
        raise ConversionError(f"{hf.dir} lacks tensors a {family.architecture} with this "
                              f"config.json has: {_listing(missing)}")
    wrong = [f"{n} {list(hf.tensors[n].shape)} (config.json implies {list(s)})"
             for n, s in expected.items() if hf.tensors[n].shape != s]
    if wrong:
        raise ConversionError(f"{hf.dir}: tensor shapes disagree with config.json: {_listing(wrong, 4)}")
    extra = [n for n in hf.tensors if n not in expected and not family.ignored(n, cfg)]
    if extra:
        raise ConversionError(f"{hf.dir} holds tensors a {family.architecture} of this config has "
                              f"no place for (parts the converter does not support?): {_listing(extra)}")
    # A tied model that saved its own lm_head: dropping it is right only if it is the embedding
    # (transformers loads a different one untied, and the model it evaluates would not be ours).
    if not cfg.untie_embeddings_and_output_weights and "lm_head.weight" in hf.tensors:
        embedding = "model.embed_tokens.weight"
        if not torch.equal(hf.read("lm_head.weight"), hf.read(embedding)):
            raise ConversionError(f"{hf.dir}: config.json ties the output layer to the embedding "
                                  f"(tie_word_embeddings), but lm_head.weight differs from {embedding}. "
                                  "If the model's output layer is its own, set tie_word_embeddings: false "
                                  "in config.json; else remove lm_head.weight from the checkpoint")


class _HFProducer(TensorProducer):
    """Builds each Megatron chunk from the HF tensors of its rule. The last rule's full Megatron
    tensor is kept until the next one (SwiGLU's fc1 is written as two chunks of one tensor)."""

    def __init__(self, hf: HFCheckpoint, rules: Dict[str, TensorRule], dtype: Optional[torch.dtype]):
        self.hf, self.rules, self._dtype = hf, rules, dtype
        self._key, self._tensor = None, None

    def dtype(self, sh_ten) -> torch.dtype:
        rule = self.rules[sh_ten.key]
        return self._dtype or self.hf.tensors[rule.hf_for(0)[0]].dtype

    def data(self, sh_ten) -> torch.Tensor:
        rule = self.rules[sh_ten.key]
        layer = sh_ten.global_offset[0] if rule.layered else None
        if self._key != (sh_ten.key, layer):
            self._key, self._tensor = None, None
            tensor = rule.to_megatron(*[self.hf.read(n) for n in rule.hf_for(layer)])
            self._key, self._tensor = (sh_ten.key, layer), tensor.to(self.dtype(sh_ten))
        return narrow(self._tensor, sh_ten.global_offset[sh_ten.prepend_axis_num:], sh_ten.local_shape)


def holds_checkpoint(path: Path) -> bool:
    """Whether a directory holds a (converted or trained) checkpoint of this project."""
    return (checkpoint.has_checkpoint(path) or (path / checkpoint.LATEST).exists()
            or (path / MODEL_YAML).exists())


def model_yaml(cfg: ModelConfig, role: str, root: Path, source: str) -> str:
    """The `student:` or `teacher:` section of a training config for this checkpoint."""
    header = (f"# {role} model of the Megatron checkpoint {root}\n"
              f"# converted from {source}\n"
              f"# train: examples/pretrain_scope.py --config {root / MODEL_YAML} {ROLES[role]} {root}\n"
              "# (a student and a teacher file concatenated make one config)\n")
    return header + yaml.safe_dump({role: dataclasses.asdict(cfg)}, sort_keys=False)


def convert_hf_to_megatron(hf_dir, out, *, tp: int = 1, pp: int = 1,
                           padded_vocab: Optional[int] = None,
                           make_vocab_size_divisible_by: Optional[int] = None,
                           vocab_size: Optional[int] = None, dtype=None, role: str = "student",
                           max_position_embeddings: Optional[int] = None,
                           overwrite: bool = False) -> ConvertedCheckpoint:
    """Converts an HF model directory into a checkpoint root `out` (step 0) plus `out`/
    scope_model.yaml, the `role` ("student" or "teacher") section of a training config.

    tp, pp: the layout to validate (heads, query groups, FFN width by TP; layers by PP) and
      to pad the vocabulary for; the checkpoint loads at any layout the model splits into.
    padded_vocab / make_vocab_size_divisible_by: the padding (see hf_model_config).
    vocab_size: the true vocabulary if smaller than config.json's (HF rows beyond it are padding).
    dtype: stored dtype (None keeps each HF tensor's; "float32", "bfloat16", "float16").
    overwrite: replace an existing checkpoint at `out` (never any other content).
    Runs in one process (see runtime.single_process_megatron). Raises ConversionError for bad
    input, leaving nothing at `out`.
    """
    if role not in ROLES:
        raise ConversionError(f"role {role!r}: choose 'student' or 'teacher'")
    dtype = to_dtype(dtype)
    hf = HFCheckpoint(hf_dir)
    family, cfg = hf_model_config(hf.config, tp=tp, pp=pp, vocab_size=vocab_size,
                                  padded_vocab=padded_vocab,
                                  make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                  max_position_embeddings=max_position_embeddings)
    rows = VocabRows(hf=hf.config["vocab_size"], megatron=cfg.padded_vocab)
    if rows.megatron < rows.hf:
        logger.warning("HF vocabulary rows %d..%d lie beyond the padded vocabulary (%d rows) and are "
                       "dropped (they are beyond the true vocabulary %d)", rows.megatron, rows.hf - 1,
                       rows.megatron, cfg.vocab_size)
    rules = family.rules(cfg, rows)
    staged = StagedOutput(out, overwrite=overwrite, kind="Megatron checkpoint", holds=holds_checkpoint)
    with single_process_megatron():
        from megatron.core import dist_checkpointing

        model = build_meta_model(cfg)
        check_tensors(hf, family, cfg, rules, _megatron_shapes(model))
        producer = _HFProducer(hf, rules.by_key(), dtype)
        with staged as tmp:
            ckpt = tmp / checkpoint.iter_name(0)
            ckpt.mkdir()
            dist_checkpointing.save(model.sharded_state_dict(), str(ckpt),
                                    sharded_strategy=streaming_save_strategy(producer))
            meta = checkpoint.describe(0, [model])
            meta["conversion"] = {"from": str(Path(hf_dir).absolute()), "architecture": family.architecture,
                                  "hf_vocab_rows": rows.hf, "checked_layout": {"tp": tp, "pp": pp}}
            (ckpt / checkpoint.METADATA).write_text(json.dumps(meta, indent=1, default=str))
            torch.save({"extra_state": {}, "scheduler": None}, ckpt / checkpoint.EXTRA_STATE)
            (tmp / checkpoint.LATEST).write_text(ckpt.name + "\n")
            (tmp / MODEL_YAML).write_text(model_yaml(cfg, role, staged.out, str(Path(hf_dir).absolute())))
            root = staged.commit()
    return ConvertedCheckpoint(root, cfg, root / MODEL_YAML, family.architecture, rows.hf)
