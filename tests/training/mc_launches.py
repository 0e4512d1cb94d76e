"""The multi-process launches of the training tests (see mc_workers.py), each run at most once
per pytest session, in dependency order, and shared by test_platform.py, test_models.py and
test_checkpoint.py. Each check inside a launch is reported as its own pytest test."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import SESSION_SEED
from tests.distributed import REPO, run_workers
from tests.training.mc_kill_saver import KILL_POINTS
from tests.training.mc_workers import SHARED_ENV

# name: (entry, world size, launches it reads files of); "kill" runs mc_kill_saver processes.
LAUNCHES = {
    "train": ("tests.training.mc_workers:train_launch", 2, ()),
    "kill": (None, 1, ()),
    "resume": ("tests.training.mc_workers:resume_launch", 2, ("train", "kill")),
}
TIMEOUT = 240
_results: dict = {}


def _shared_dir() -> str:
    if SHARED_ENV not in os.environ:
        path = tempfile.mkdtemp(prefix="scope-training-tests-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ[SHARED_ENV] = path  # inherited by the launched ranks
    return os.environ[SHARED_ENV]


def results(name: str):
    """Every rank's return value of a launch (run on first use), or the exception it raised.
    Skips the calling test on a GPU machine: the launches test the CPU path (gloo, CPU shims)."""
    if torch.cuda.is_available():
        pytest.skip("the training launches test the CPU path (gloo, CPU shims)")
    if name not in _results:
        entry, world_size, needs = LAUNCHES[name]
        failed = [dep for dep in needs if isinstance(results(dep), Exception)]
        if failed:
            _results[name] = RuntimeError(f"launch {name} needs the files of {failed}, which failed")
        else:
            _shared_dir()
            try:
                _results[name] = (run_workers(entry, world_size, seed=SESSION_SEED, timeout=TIMEOUT)
                                  if entry else _run_kill_savers())
            except RuntimeError as exc:
                _results[name] = exc
    return _results[name]


def assert_check(launch: str, check: str, res=None) -> None:
    """Fails the calling test with every rank's traceback if `check` failed in `launch` (res: that
    launch's per-rank results, or its exception; default: this module's launch of that name)."""
    res = results(launch) if res is None else res
    if isinstance(res, Exception):
        pytest.fail(f"SCOPE_TEST_SEED={SESSION_SEED}\n{res}")
    missing = [rank for rank, r in enumerate(res) if check not in r["checks"]]
    assert not missing, f"check {check} did not run on ranks {missing}"
    errors = [f"rank {rank}:\n{r['checks'][check]}" for rank, r in enumerate(res) if r["checks"][check]]
    assert not errors, f"SCOPE_TEST_SEED={SESSION_SEED}\n" + "\n".join(errors)


def shim_hits() -> dict:
    """{shim: Counter(caller -> calls)} summed over every rank of every launch."""
    total: dict = {}
    for name in LAUNCHES:
        if LAUNCHES[name][0] is None:
            continue
        res = results(name)
        if isinstance(res, Exception):
            pytest.fail(f"launch {name} failed:\n{res}")
        for rank in res:
            for shim, hits in rank["hits"].items():
                total.setdefault(shim, Counter()).update(hits)
    return total


def _run_kill_savers() -> dict:
    """Runs one mc_kill_saver process per kill point, concurrently; kills the "outside" one from
    here at an arbitrary moment after its first checkpoint. Returns {point: (exit code, log
    tail)} (-9: killed by SIGKILL). Kills the helper processes each saver started (a killed
    saver's dist_checkpointing helpers would otherwise outlive it)."""
    shared = Path(_shared_dir())
    procs, helpers = {}, {}
    for point in KILL_POINTS:
        log = open(shared / f"killed_{point}.log", "w")
        cmd = [sys.executable, "-m", "tests.training.mc_kill_saver", str(shared / f"killed_{point}"),
               point, str(SESSION_SEED)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs[point] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    deadline, kill_at = time.monotonic() + TIMEOUT, None
    while any(p.poll() is None for p, _ in procs.values()) and time.monotonic() < deadline:
        for point, (proc, _) in procs.items():
            try:
                helpers.update({h.pid: h for h in psutil.Process(proc.pid).children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        outside = procs["outside"][0]
        if kill_at is None and (shared / "killed_outside.json").exists():
            kill_at = time.monotonic() + 0.3 + (SESSION_SEED % 1000) / 1000  # within later saves
        if kill_at is not None and time.monotonic() > kill_at and outside.poll() is None:
            outside.send_signal(signal.SIGKILL)
        time.sleep(0.05)
    for proc, log in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    for helper in helpers.values():
        try:
            helper.kill()
        except psutil.NoSuchProcess:
            pass
    return {point: (proc.returncode, (shared / f"killed_{point}.log").read_text()[-4000:])
            for point, (proc, _) in procs.items()}


def assert_killed(point: str) -> None:
    """Fails unless the saver of `point` died by SIGKILL."""
    res = results("kill")
    if isinstance(res, Exception):
        pytest.fail(str(res))
    code, log = res[point]
    assert code == -signal.SIGKILL, f"saver {point} exited with {code}, not SIGKILL:\n{log}"
