#!/usr/bin/env python
"""Hugging Face safetensors -> a scope-megatron (Megatron dist_checkpointing) checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-1.7B --out ckpt/qwen3-1.7b --tp 2
    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-8B --out ckpt/qwen3-8b --tp 2 --role teacher \
        --padded-vocab 152064

Writes OUT/latest, OUT/iter_0000000/ (loads under any TP/PP the model splits into) and
OUT/scope_model.yaml (the `student:` or `teacher:` section for examples/pretrain_scope.py
--config). One process; memory stays near the largest tensors. Exit status 2 on bad input, with
the reason on stderr and nothing written. Details: docs/conversion.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scope_megatron.convert import ConversionError, convert_hf_to_megatron  # noqa: E402
from scope_megatron.convert.runtime import pin_malloc_mmap_threshold  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint root to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate and pad for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate")
    pad = p.add_mutually_exclusive_group()
    pad.add_argument("--padded-vocab", type=int, default=None,
                     help="embedding rows (fixed; give student and teacher the same)")
    pad.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                     help="pad to a multiple of this x TP (default 128)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="true vocabulary if smaller than config.json's vocab_size")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="stored dtype (default: each HF tensor's own)")
    p.add_argument("--role", choices=("student", "teacher"), default="student",
                   help="section of the YAML written next to the checkpoint")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="longest sequence the trainer serves (default and maximum: config.json's)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint at --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    pin_malloc_mmap_threshold()  # freed tensors go back to the system at once
    try:
        result = convert_hf_to_megatron(
            args.hf_dir, args.out, tp=args.tp, pp=args.pp, padded_vocab=args.padded_vocab,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            vocab_size=args.vocab_size, dtype=args.dtype, role=args.role,
            max_position_embeddings=args.max_position_embeddings, overwrite=args.overwrite)
    except ConversionError as exc:
        print(f"convert_hf_to_megatron: error: {exc}", file=sys.stderr)
        return 2
    cfg = result.model_config
    print(f"{result.architecture} -> {result.path}: {cfg.num_layers} layers, vocabulary "
          f"{cfg.vocab_size} padded to {cfg.padded_vocab} rows (HF {result.hf_vocab_rows})\n"
          f"model section ({args.role}): {result.yaml_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
