#!/usr/bin/env python
"""A scope-megatron checkpoint (any TP/PP) -> a Hugging Face directory for transformers / SGLang.

    python tools/convert_megatron_to_hf.py --megatron-dir runs/x/checkpoints --hf-template Qwen3-1.7B \
        --out hf/qwen3-1.7b-scope
    # the embedded toy model (no HF original): a Llama config + the toy tokenizer as template
    python tools/convert_megatron_to_hf.py --megatron-dir checkpoints/toy/student --hf-template toy \
        --out hf/toy-student

Writes safetensors (sharded with model.safetensors.index.json above --max-shard-size),
config.json (the template's, dtype set to the weights') and the template's tokenizer and other
non-weight files. Streams one tensor at a time; the directory appears atomically. Exit status 2
on bad input. Details: docs/conversion.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scope_megatron.convert import ConversionError, export_hf, write_toy_template  # noqa: E402
from scope_megatron.convert.runtime import pin_malloc_mmap_threshold  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--megatron-dir", required=True,
                   help="checkpoint root (with `latest`) or one iter_XXXXXXX directory")
    p.add_argument("--hf-template", required=True,
                   help="the HF directory the model came from (config.json, tokenizer files); "
                        "'toy' for the embedded toy model")
    p.add_argument("--out", required=True, help="HF directory to create")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="bytes per safetensors shard")
    p.add_argument("--overwrite", action="store_true", help="replace an HF model at --out")
    return p.parse_args(argv)


def toy_template(megatron_dir) -> Path:
    """A temporary template (removed at exit) from the checkpoint's recorded model config."""
    import atexit
    import shutil
    import tempfile

    from scope_megatron.training.checkpoint import CheckpointError, checkpoint_info

    try:
        model_config = checkpoint_info(megatron_dir).get("model_config")
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise ConversionError(str(exc)) from exc
    if not model_config:
        raise ConversionError(f"{megatron_dir} records no model configuration (not written by scope-megatron)")
    tmp = Path(tempfile.mkdtemp(prefix="scope-toy-template-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return write_toy_template(model_config, tmp / "template")


def main(argv=None) -> int:
    args = parse_args(argv)
    pin_malloc_mmap_threshold()  # freed tensors go back to the system at once
    try:
        template = args.hf_template
        if template == "toy" and not Path(template).exists():
            template = toy_template(args.megatron_dir)
        result = export_hf(args.megatron_dir, template, args.out, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except ConversionError as exc:
        print(f"convert_megatron_to_hf: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.megatron_dir} -> {result.path}: {result.num_tensors} tensors, "
          f"{result.num_bytes / 2**20:.1f} MiB {result.dtype}; files: {', '.join(result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
