"""SCOPE training on Megatron-core: `torchrun --nproc-per-node N examples/pretrain_scope.py [flags]`.

Without arguments it runs the embedded default (the toy arithmetic world: a 0.1M-parameter
student distilled from a 0.8M-parameter teacher, data-parallel over the launched processes) and
writes runs/toy_scope/{metrics.jsonl, tensorboard/, curves.png, config.yaml, checkpoints/}.
`--config file.yaml` and Megatron-style flags override the defaults; `--help` lists every field
(documented in docs/training-config.md).
"""
from __future__ import annotations

import sys

from scope_megatron.training.config import load_config
from scope_megatron.training.trainer import Trainer


def main(argv=None) -> int:
    cfg = load_config(argv)
    trainer = Trainer(cfg)
    try:
        metrics = trainer.run()
        if trainer.is_rank0:
            shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("eval/", "reward"))}
            print(f"[scope-megatron] done: {shown}; logs in {cfg.logging.log_dir}", flush=True)
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
