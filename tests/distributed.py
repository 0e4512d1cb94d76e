"""Multi-process test runner: real gloo process groups, one OS process per rank.

run_workers("tests.ops.tp_checks:run", world_size=4) starts 4 Python processes, each joins a
gloo group (FileStore rendezvous), calls the entry function with a WorkerContext and writes the
JSON-able value it returns; the parent collects them. Collective failures hang under gloo rather
than raise, so every process gets a hard deadline (faulthandler dumps stacks and exits) and the
parent kills stragglers. Start-up costs seconds per process: group many checks into one launch.
"""
from __future__ import annotations

import datetime
import faulthandler
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    seed: int


def run_workers(entry: str, world_size: int, *, seed: int, timeout: float = 300.0) -> list:
    """Runs `module:function` on world_size gloo ranks; returns each rank's return value."""
    with tempfile.TemporaryDirectory(prefix="scope-dist-") as tmp:
        tmp = Path(tmp)
        procs = []
        for rank in range(world_size):
            cmd = [sys.executable, "-m", "tests.distributed", entry, str(rank), str(world_size),
                   str(tmp), str(seed), str(timeout)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            log = open(tmp / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout + 30
        for proc, _ in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        results, failures = [], []
        for rank, (proc, _) in enumerate(procs):
            out = tmp / f"rank{rank}.json"
            if proc.returncode != 0 or not out.exists():
                failures.append(f"--- rank {rank} exited with {proc.returncode}:\n"
                                + (tmp / f"rank{rank}.log").read_text()[-6000:])
            else:
                results.append(json.loads(out.read_text()))
        if failures:
            raise RuntimeError(f"distributed run of {entry} (world {world_size}, seed {seed}) failed:\n"
                               + "\n".join(failures))
        return results


def run_checks(checks: dict, ctx) -> dict:
    """Runs each named check(ctx) in order; returns {name: None or the traceback}, for the pytest
    side to report each check as its own test (a failing check does not hide the others)."""
    import traceback

    results = {}
    for name, fn in checks.items():
        try:
            fn(ctx)
            results[name] = None
        except Exception:  # reported per check by the pytest side
            results[name] = traceback.format_exc()
    return results


def _worker_main(entry: str, rank: int, world_size: int, tmp: str, seed: int, timeout: float) -> None:
    faulthandler.dump_traceback_later(timeout, exit=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
    module, func = entry.split(":")
    value = getattr(importlib.import_module(module), func)(WorkerContext(rank, world_size, seed))
    dist.barrier()
    dist.destroy_process_group()
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(value))


if __name__ == "__main__":
    entry, rank, world, tmp, seed, timeout = sys.argv[1:7]
    _worker_main(entry, int(rank), int(world), tmp, int(seed), float(timeout))
