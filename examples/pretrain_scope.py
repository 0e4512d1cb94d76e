"""SCOPE training on Megatron-core: `torchrun --nproc-per-node N examples/pretrain_scope.py [flags]`.

Without arguments it runs the embedded default (the toy arithmetic world: a 0.1M-parameter
student distilled from a 0.8M-parameter teacher, data-parallel over the launched processes) and
writes runs/toy_scope/{metrics.jsonl, tensorboard/, curves.png, config.yaml, checkpoints/}.
`--config file.yaml` and Megatron-style flags override the defaults; `--help` lists every field
(documented in docs/training-config.md).
"""
from __future__ import annotations

import os
import sys

from scope_megatron.training.config import load_config
from scope_megatron.training.trainer import Trainer
from scope_megatron.utils.config_io import ConfigError


def _config_error(exc: ConfigError) -> int:
    """A configuration that cannot run: the reason, not a traceback (from every failing rank)."""
    rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"pretrain_scope.py: error{rank}: {exc}", file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    try:
        cfg = load_config(argv)
        trainer = Trainer(cfg)
    except ConfigError as exc:
        return _config_error(exc)
    try:
        metrics = trainer.run()
        if trainer.is_rank0:
            shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("eval/", "reward"))}
            print(f"[scope-megatron] done: {shown}; logs in {cfg.logging.log_dir}", flush=True)
    except ConfigError as exc:  # e.g. a log directory that holds another run's metrics
        return _config_error(exc)
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
