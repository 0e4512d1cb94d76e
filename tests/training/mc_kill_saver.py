"""A one-process training run whose checkpoint save gets killed with SIGKILL (the kill tests).

    python -m tests.training.mc_kill_saver ROOT POINT SEED

Trains one step, saves step 1 into ROOT (complete), trains one more step, records the loss of
a fixed batch at both steps in ROOT.json, then saves step 2 and dies by SIGKILL at POINT:
  after_shards       dist_checkpointing wrote the weights and optimizer into the temporary
                     directory, the rank files are not written yet
  before_rename      everything written and about to be fsynced and renamed to iter_0000002
  before_latest      renamed to iter_0000002, `latest` still names iter_0000001
  outside            no hook: saves step 2, 3, ... in a loop until the caller kills it from
                     outside, at an arbitrary moment
mc_launches starts these processes; the resume launch loads what each left behind.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

import tests.training.mc_megatron_src  # noqa: F401  (first: may redirect `import megatron`)

# Which function of the checkpoint module kills the process when it is called.
KILL_POINTS = {"after_shards": "_torch_save", "before_rename": "_fsync_tree",
               "before_latest": "_write_atomic", "outside": None}


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def main(root: Path, point: str, seed: int) -> None:
    from scope_megatron.training import checkpoint, platform
    from tests.training import mc_workers as w

    platform.init_distributed()
    w._setup(1, 1, seed)
    ddp, optimizer, scheduler = w.build_student()
    w.train(ddp, optimizer, scheduler, range(1), seed)
    checkpoint.save_checkpoint(root, 1, ddp, optimizer, scheduler, extra_state={"tag": "good"})
    losses = {"1": w._eval_loss(ddp, seed)}
    w.train(ddp, optimizer, scheduler, range(1, 2), seed)
    losses["later"] = w._eval_loss(ddp, seed)  # the weights of every later save
    Path(f"{root}.json").write_text(json.dumps({"eval_loss": losses}))
    if KILL_POINTS[point] is None:
        for step in range(2, 10_000):
            checkpoint.save_checkpoint(root, step, ddp, optimizer, scheduler, keep_last=2)
    setattr(checkpoint, KILL_POINTS[point], _die)
    checkpoint.save_checkpoint(root, 2, ddp, optimizer, scheduler)
    sys.exit("the save was not killed")


if __name__ == "__main__":  # dist_checkpointing's spawned helper re-imports this module
    faulthandler.dump_traceback_later(200, exit=True)  # a hung save dumps its stacks
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
