r"""Math-equivalence rewards with the `math-verify` library, under a hard time limit per answer.

Contract:
  math_equal(predicted, reference) -> bool
      predicted: the content of the response's last `\boxed{}`; reference: the ground truth,
      plain ("0.5", "50\%", "x^2+2x+1") or LaTeX. True when `exact_match` holds (no sympy), else
      when math-verify finds them equivalent: both sides are wrapped as `$...$` and parsed with
      LatexExtractionConfig + ExprExtractionConfig, then `verify(gold=reference, target=predicted)`
      (math-verify's comparison is asymmetric: the reference is the gold side). When either side
      cannot be parsed, the result is exact_match's, i.e. False. Percentages: math-verify 0.9
      accepts "50\%" as equal to both 50 and 0.5.
      Raises VerificationTimeout when the comparison takes longer than the limit (5 s for
      math_equal), and WorkerCrashed (a VerificationTimeout) when the process comparing died.
  math_verify_match = BoxedMatchVerifier(compare=math_equal)
      the reward function, "scope_megatron.rewards.math_verify:math_verify_match": 1 for an
      equivalent final `\boxed{}` answer; 0 for a wrong, missing, truncated, timed-out answer.
  MathVerifyComparator(timeout_s=5.0, workers=1)
      a comparator with its own limit and pool; `compare_many(pairs)` runs pairs over `workers`
      processes at once. BoxedMatchVerifier(compare=MathVerifyComparator(timeout_s=2.0)).

Process model: sympy runs in persistent worker processes, never in the caller. The caller sends
one pair to an idle worker and waits at most `timeout_s` (counted from the send; starting a
worker, which imports math-verify, is not counted); on expiry it kills that worker (SIGKILL: a
C-level sympy loop cannot be interrupted otherwise) and raises VerificationTimeout; a fresh
worker is started by the next comparison that needs it. math-verify's own signal.alarm timeouts
are disabled in the workers (they work only in a main thread). Workers are fresh interpreters
(fork+exec, like multiprocessing's "spawn": nothing of the trainer's threads, CUDA or gloo state
is inherited) that import only this module and math-verify: not torch, nor the launching script,
which multiprocessing's spawn would re-import as `__mp_main__`. They are killed by close(), by
garbage collection of their comparator and at interpreter exit (atexit), and exit by themselves
within a second when the process that started them dies (a watchdog thread polls the parent pid;
a C-level loop holding the GIL delays it until the loop ends), so a trainer killed by SIGKILL or
SIGTERM leaks none. A worker that dies during a comparison (a
segfault, the kernel's OOM killer) scores the answer 0 through WorkerCrashed, logs one warning
per comparator, and is replaced; a worker that cannot start raises RuntimeError (a broken
environment is not a wrong answer). Thread-safe; calls on one comparator are serialized.

Importing this module raises ImportError (fix: pip install math-verify) when the math-verify
package is missing: the reward function fails when it is loaded, never falls back to
exact_match silently.
"""
from __future__ import annotations

import atexit
import importlib.util
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Optional, Sequence

from .verifier import BoxedMatchVerifier, VerificationTimeout, exact_match

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded node can take tens of seconds


def _require_math_verify() -> None:
    """Whether the packages are there, without importing them (sympy is for the workers)."""
    try:
        found = all(importlib.util.find_spec(name) is not None
                    for name in ("math_verify", "latex2sympy2_extended", "sympy"))
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None
        found = False
    if not found:
        raise ImportError("scope_megatron.rewards.math_verify needs the math-verify package: "
                          "pip install math-verify  (it brings latex2sympy2_extended and sympy)")


_require_math_verify()


class WorkerCrashed(VerificationTimeout):
    """The worker process died during a comparison; the answer is scored as wrong (0)."""


# ------------------------------------------------------------------------------------------------
# Worker side: runs in the child interpreter.

_E_NOTATION = re.compile(r"\s*([+-]?)(\d+\.?\d*|\.\d+)[eE]([+-]?\d+)\s*")


def _as_latex(answer: str) -> str:
    """A number in e-notation ("4.5e-11", as datasets such as Minerva write references) as LaTeX
    (4.5\\times 10^{-11}): inside $...$ math-verify would read the e as Euler's number."""
    match = _E_NOTATION.fullmatch(answer)
    if match is None:
        return answer
    sign, mantissa, exponent = match.groups()
    return f"{sign}{mantissa}\\times 10^{{{int(exponent)}}}"


def _parse(answer: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    return parse(f"${_as_latex(answer)}$", extraction_config=(LatexExtractionConfig(), ExprExtractionConfig()),
                 parsing_timeout=None)  # the parent enforces the limit


def _compare_in_process(predicted: str, reference: str) -> bool:
    """math-verify's verdict, computed in this process with no time limit (the workers' job)."""
    from math_verify import verify
    gold, target = _parse(reference), _parse(predicted)
    if not gold or not target:
        return False  # unparseable: exact_match (already checked by the caller) decides
    return bool(verify(gold, target, timeout_seconds=None))


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _serve(fd: int, parent_pid: int) -> None:
    """The worker's loop: (task_id, predicted, reference) -> (task_id, "ok", bool) or
    (task_id, "error", message); None or EOF ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings
    conn = Connection(fd)
    _compare_in_process("1", "1")  # warm up sympy and the LaTeX parser before reporting ready
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        task_id, predicted, reference = message
        try:
            reply = (task_id, "ok", _compare_in_process(predicted, reference))
        except Exception as e:  # math-verify swallows most errors; anything else is "not equal"
            reply = (task_id, "error", f"{type(e).__name__}: {e}")
        conn.send(reply)


# The child imports this module without scope_megatron/rewards/__init__.py (which imports torch):
# a bare stand-in package whose __path__ is the rewards directory.
_BOOTSTRAP = """\
import sys, types
root, rewards_dir, fd, parent_pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, root)
import scope_megatron
package = types.ModuleType("scope_megatron.rewards")
package.__path__ = [rewards_dir]
sys.modules["scope_megatron.rewards"] = package
from scope_megatron.rewards.math_verify import _serve
_serve(fd, parent_pid)
"""


# ------------------------------------------------------------------------------------------------
# Parent side.

class _Worker:
    """One child interpreter and the connection to it. Launching does not wait for it."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        rewards_dir = os.path.dirname(os.path.abspath(__file__))
        root = os.path.dirname(os.path.dirname(rewards_dir))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, root, rewards_dir, str(theirs.fileno()),
                 str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.pid: Optional[int] = None  # set once ready

    def wait_ready(self, timeout_s: float) -> None:
        if self.pid is not None:
            return
        try:
            message = self.conn.recv() if self.conn.poll(timeout_s) else None
        except (EOFError, OSError):
            message = None
        if not (isinstance(message, tuple) and message[0] == "ready"):
            try:
                code = self.process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                code = None
            self.kill()
            state = (f"exited with status {code} (its error is on stderr above)" if code is not None
                     else f"was not ready after {timeout_s:.0f} s")
            raise RuntimeError(f"math-verify worker process {state}; check that `{sys.executable} "
                               "-c 'import math_verify'` works")
        self.pid = message[1]

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()


_live: "weakref.WeakSet[MathVerifyComparator]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for comparator in list(_live):
        comparator._kill_workers()  # without the lock: a daemon thread may hold it at exit


class MathVerifyComparator:
    """compare(predicted, reference) -> bool with math-verify, at most `timeout_s` per answer
    (see the module docstring). `workers`: processes used by compare_many (one call uses one).
    Workers start on the first comparison that needs one (exact matches never do); start()
    starts them all now. `failures` counts the comparisons scored as not equal because they
    timed out ("timeout"), crashed a worker ("crash") or raised inside math-verify ("error");
    each kind is logged once per comparator as a warning (a timeout depends on the machine's
    load, so the same answer may score differently on another node)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, workers: int = 1,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        if not timeout_s > 0:
            raise ValueError(f"MathVerifyComparator: timeout_s must be > 0, got {timeout_s}")
        if not (isinstance(workers, int) and workers >= 1):
            raise ValueError(f"MathVerifyComparator: workers must be an int >= 1, got {workers!r}")
        self.timeout_s = float(timeout_s)
        self.workers = workers
        self.startup_timeout_s = float(startup_timeout_s)
        self._slots: list[Optional[_Worker]] = [None] * workers
        self._lock = threading.Lock()
        self._task_ids = itertools.count()
        self.failures = {"timeout": 0, "crash": 0, "error": 0}
        _live.add(self)

    def __call__(self, predicted: str, reference: str) -> bool:
        result = self.compare_many([(predicted, reference)], raise_on_failure=True)[0]
        assert result is not None
        return result

    def compare_many(self, pairs: Sequence[tuple[str, str]], timeout_s: Optional[float] = None, *,
                     raise_on_failure: bool = False) -> list[Optional[bool]]:
        """Compare (predicted, reference) pairs over the workers at once; each pair has its own
        `timeout_s` (default: the comparator's), counted from when a worker takes it. Returns one
        entry per pair: True / False, or None when the pair timed out or its worker crashed
        (raise_on_failure=True raises VerificationTimeout / WorkerCrashed instead)."""
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        results: list[Optional[bool]] = [None] * len(pairs)
        pending = []
        for i, (predicted, reference) in enumerate(pairs):
            if not (isinstance(predicted, str) and isinstance(reference, str)):
                raise TypeError(f"MathVerifyComparator: pair {i} must be two str, got "
                                f"({type(predicted).__name__}, {type(reference).__name__})")
            if exact_match(predicted, reference):
                results[i] = True
            else:
                pending.append(i)
        if not pending:
            return results
        with self._lock:
            self._run(pairs, pending, results, limit, raise_on_failure)
        return results

    def start(self) -> "MathVerifyComparator":
        """Start every worker now and wait until each is ready (else lazily, when needed)."""
        with self._lock:
            self._ready_workers(range(self.workers))
        return self

    def worker_pids(self) -> list[Optional[int]]:
        """The pid of each worker slot (None: not started, or replaced after a failure)."""
        return [w.pid if w is not None else None for w in self._slots]

    def close(self) -> None:
        """Kill the workers; a later comparison starts new ones."""
        with self._lock:
            self._kill_workers()

    def __del__(self):
        self._kill_workers()

    def _kill_workers(self) -> None:
        slots = getattr(self, "_slots", [])
        for i, worker in enumerate(slots):
            if worker is not None:
                slots[i] = None
                worker.kill()

    # -- internals (called with self._lock held) ---------------------------------------------

    def _ready_workers(self, slots: Sequence[int]) -> list[int]:
        """`slots`, each with a live, ready worker: the missing ones are launched together,
        then waited for."""
        for i in slots:
            worker = self._slots[i]
            if worker is not None and not worker.alive():  # died while idle
                self._discard(i)
            if self._slots[i] is None:
                self._slots[i] = _Worker()
        for i in slots:
            try:
                self._slots[i].wait_ready(self.startup_timeout_s)
            except RuntimeError:
                self._slots[i] = None
                raise
        return list(slots)

    def _run(self, pairs, pending: list[int], results: list, limit: float,
             raise_on_failure: bool) -> None:
        idle = self._ready_workers(range(min(self.workers, len(pending))))
        queue = list(reversed(pending))
        busy: dict[int, tuple[int, int, float]] = {}  # slot -> (pair index, task id, deadline)
        try:
            self._loop(pairs, queue, idle, busy, results, limit, raise_on_failure)
        except BaseException:
            for slot in busy:  # their late replies would answer the next comparisons
                self._discard(slot)
            raise

    def _loop(self, pairs, queue: list[int], idle: list[int], busy: dict, results: list,
              limit: float, raise_on_failure: bool) -> None:
        while queue or busy:
            while queue and idle:
                slot, index = idle.pop(), queue.pop()
                task_id = next(self._task_ids)
                try:
                    self._slots[slot].conn.send((task_id, *pairs[index]))
                except OSError:  # it died after the liveness check: seen as a crash below
                    pass
                busy[slot] = (index, task_id, time.monotonic() + limit)
            by_conn = {self._slots[slot].conn: slot for slot in busy}
            wait_s = max(0.0, min(deadline for _, _, deadline in busy.values()) - time.monotonic())
            failed = []  # (slot, pair index, exception to raise)
            for conn in wait(list(by_conn), timeout=wait_s):
                slot = by_conn[conn]
                index, task_id, _ = busy.pop(slot)
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    reply = None
                if reply is None or reply[0] != task_id:
                    failed.append((slot, index, self._crash_error(slot, pairs[index])))
                    continue
                _, status, value = reply
                if status == "error":
                    self._failed("error", f"math-verify raised {value} comparing {_short(pairs[index][0])} "
                                          f"with reference {_short(pairs[index][1])}; scored as not equal")
                results[index] = status == "ok" and bool(value)
                idle.append(slot)
            now = time.monotonic()
            for slot, (index, _, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[slot]
                    message = (f"math-verify took longer than {limit:g} s comparing "
                               f"{_short(pairs[index][0])} with reference {_short(pairs[index][1])}; "
                               "scored 0 (raise timeout_s if answers this long are expected)")
                    self._failed("timeout", message)
                    failed.append((slot, index, VerificationTimeout(message)))
            for slot, _, _ in failed:
                self._discard(slot)  # results[index] stays None
            if failed and raise_on_failure:
                raise failed[0][2]
            if failed and queue:  # more pairs wait: replace the lost workers now
                idle.extend(self._ready_workers([slot for slot, _, _ in failed]))

    def _discard(self, slot: int) -> None:
        self._slots[slot].kill()
        self._slots[slot] = None

    def _crash_error(self, slot: int, pair: tuple[str, str]) -> WorkerCrashed:
        try:
            code = self._slots[slot].process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # its connection broke, yet it runs: killed next
            code = None
        message = (f"math-verify worker died (exit status {code}) comparing {_short(pair[0])} "
                   f"with reference {_short(pair[1])}; the answer is scored 0, the worker replaced")
        self._failed("crash", message)
        return WorkerCrashed(message)

    def _failed(self, kind: str, message: str) -> None:
        """Counts a comparison scored as not equal for `kind`; logs the first of each kind."""
        self.failures[kind] += 1
        if self.failures[kind] == 1:
            logger.warning("%s (the first %s; logged once per comparator, counted in .failures)",
                           message, kind)


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


_default: Optional[MathVerifyComparator] = None
_default_lock = threading.Lock()


def math_equal(predicted: str, reference: str) -> bool:
    """Whether `predicted` equals the ground truth `reference` (exact match, else math-verify),
    under a 5 s limit (VerificationTimeout). Shares one lazily started worker process."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = MathVerifyComparator(DEFAULT_TIMEOUT_S)
    return _default(predicted, reference)


math_verify_match = BoxedMatchVerifier(compare=math_equal)
"""The reward function: the last `\\boxed{}` answer equivalent to the reference under
math-verify (5 s per answer), as "scope_megatron.rewards.math_verify:math_verify_match"."""
