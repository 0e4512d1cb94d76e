#!/usr/bin/env python
"""Runs an HF model (transformers) and its converted Megatron checkpoint on the same tokens and
compares their logits over the true vocabulary.

    python tools/compare_hf_megatron.py --hf-dir Qwen3-1.7B --megatron-dir ckpt/qwen3-1.7b --tp 2
    python tools/compare_hf_megatron.py --hf-dir D --megatron-dir O --tokens 151644,872,198

Prints max / mean |logit difference|, top-1 agreement and PASS/FAIL. Exit status 0 = pass,
1 = max |diff| above --atol + --rtol * max |HF logit| or a top-1 disagreement that is not a
near-tie within that tolerance, 2 = bad input. Defaults are fp32 tolerances (both models run in
float32). With --tp N > 1 it starts N processes itself (or run it under torchrun with N
processes). Details: docs/conversion.md.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    from scope_megatron.convert.compare import ATOL, RTOL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory")
    p.add_argument("--megatron-dir", required=True, help="converted checkpoint (root or iter_ dir)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the Megatron model")
    p.add_argument("--tokens", default=None, help="comma-separated token ids (default: random)")
    p.add_argument("--batch-size", type=int, default=2, help="random sequences")
    p.add_argument("--seq-len", type=int, default=32, help="length of the random sequences")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--atol", type=float, default=ATOL, help="absolute logit tolerance")
    p.add_argument("--rtol", type=float, default=RTOL, help="tolerance relative to max |HF logit|")
    return p.parse_args(argv)


def _spawn(tp: int, argv) -> int:
    """Runs this script on tp local processes (torchrun's environment) and returns rank 0's status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(tp):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(tp),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env))
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.monotonic()  # a crashed rank leaves the others waiting in a collective
        if failed_at is not None and time.monotonic() - failed_at > 10:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    codes = [p.returncode for p in procs]
    return codes[0] if codes[0] != 0 or all(c == 0 for c in codes) else 2


def _tokens(args, vocab_size: int):
    import torch

    if args.tokens:
        return torch.tensor([[int(t) for t in args.tokens.split(",")]])
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=gen)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        return _spawn(args.tp, argv)

    from scope_megatron.convert import ConversionError
    from scope_megatron.convert.compare import compare_hf_megatron
    from scope_megatron.training import checkpoint, platform

    try:
        meta = checkpoint.checkpoint_info(args.megatron_dir)
        tokens = _tokens(args, meta["model_config"]["vocab_size"])
    except (checkpoint.CheckpointError, ValueError) as exc:
        print(f"compare_hf_megatron: error: {exc}", file=sys.stderr)
        return 2
    platform.init_distributed()
    try:
        if not platform.cuda_available():
            platform.apply_cpu_shims()
        platform.initialize_parallel(tp=args.tp, pp=1)
        platform.seed_everything(args.seed)
        if platform.layout().dp != 1:
            raise ConversionError(f"launch exactly --tp {args.tp} processes")
        result = compare_hf_megatron(args.hf_dir, args.megatron_dir, tokens, atol=args.atol,
                                     rtol=args.rtol)
    except (ConversionError, checkpoint.CheckpointError, ValueError) as exc:
        print(f"compare_hf_megatron: error: {exc}", file=sys.stderr)
        return 2
    finally:
        platform.destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary(), flush=True)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
