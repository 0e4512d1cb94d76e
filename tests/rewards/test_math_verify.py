r"""math-verify rewards: equivalence, the hard per-answer time limit enforced from this process,
worker replacement after a timeout or a crash, cleanup, and the reward function by path."""
import importlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytest.importorskip("math_verify")

from scope_megatron.rewards import (BoxedMatchVerifier, VerificationTimeout,  # noqa: E402
                                    load_reward_fn)
from scope_megatron.rewards.math_verify import (MathVerifyComparator, WorkerCrashed,  # noqa: E402
                                                 math_equal, math_verify_match)

DONE = {"finished": True}
# sympy expands (x+1)^3000 for minutes (> 60 s measured) before finding it differs
HANGS = (r"(x+1)^{3000}", r"x^{3000}+1")
LIMIT_S = 1.0
OVERHEAD_S = 3.0  # killing the worker and returning; a loaded 2-core machine included


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombie: exited
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def compare():
    comparator = MathVerifyComparator(timeout_s=30.0, workers=2)
    yield comparator
    comparator.close()


@pytest.mark.parametrize("predicted, reference", [
    (r"\frac{1}{2}", "0.5"),
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac{3}{4}", "0.75"),
    ("(x+1)^2", "x^2+2x+1"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"),
    # math-verify 0.9 reads "50\%" as 50 * (1/100) and accepts both readings: 50 and 0.5
    (r"50\%", "50"),
    (r"50\%", "0.5"),
    ("50", r"50\%"),
    ("[1, 2)", "[1,2)"),                   # intervals
    ("(1, 2, 3)", "(1,2,3)"),              # tuples
    (r"\{2, 1\}", r"\{1,2\}"),             # sets: order does not matter
    ("1{,}000", "1000"),
    ("(1,2)", "1<x<2"),                    # an interval for an inequality reference
    (r"4.5 \times 10^{-11}", "4.5e-11"),   # e-notation references (Minerva): not Euler's e
    ("0.000000000045", "4.5e-11"),
    ("100000", "1e5"),
    ("1e5", "100000"),
])
def test_equivalent_forms(compare, predicted, reference):
    assert compare(predicted, reference) is True


@pytest.mark.parametrize("predicted, reference", [
    (r"\frac{1}{3}", "0.5"),
    ("0.33", r"\frac{1}{3}"),
    ("x^2+2x+2", "(x+1)^2"),
    ("50", "0.5"),
    ("(1,2]", "[1,2)"),
    ("(3,2,1)", "(1,2,3)"),                # tuples are ordered
    (r"\text{hello}", r"\text{goodbye}"),
    ("@#!", "@#?"),                        # unparseable: exact match decides
    (r"4.6\times10^{-11}", "4.5e-11"),
    ("1<x<2", "(1,2)"),                    # verify(gold=reference, target=predicted) is
])                                         # asymmetric: this is the order swapped
def test_wrong_answers(compare, predicted, reference):
    assert compare(predicted, reference) is False


def test_exact_match_needs_no_worker():
    comparator = MathVerifyComparator(timeout_s=5.0)
    assert comparator("081", "81") and comparator(" @#! ", "@#!")
    assert comparator.compare_many([("7", "7"), ("x", " x ")]) == [True, True]
    assert comparator.worker_pids() == [None]


def test_reward_function_by_path():
    reward_fn = load_reward_fn("scope_megatron.rewards.math_verify:math_verify_match")
    assert reward_fn is math_verify_match
    assert reward_fn(r"so the answer is \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{\sqrt{2}}{2}",
                     metadata=DONE) == 1.0
    assert reward_fn(r"\boxed{\dfrac{3}{4}}", "0.75", metadata=DONE) == 1.0
    assert reward_fn(r"\boxed{\frac{1}{3}}", "0.5", metadata=DONE) == 0.0
    assert reward_fn(r"the answer is \frac{1}{2}", "0.5", metadata=DONE) == 0.0          # no box
    truncated = {"finished": False}
    assert reward_fn(r"\boxed{\frac{1}{2}}", "0.5", metadata=truncated) == 0.0
    assert reward_fn(r"\boxed{\frac{1}{2", "0.5", metadata=DONE) == 0.0       # unbalanced box
    assert math_equal("0.5", r"\frac{1}{2}") is True
    from scope_megatron import rewards
    assert rewards.math_verify_match is math_verify_match
    assert rewards.MathVerifyComparator is MathVerifyComparator


def test_timeout_kills_the_worker_and_the_next_answer_works(caplog):
    caplog.set_level(logging.WARNING, logger="scope_megatron.rewards.math_verify")
    comparator = MathVerifyComparator(timeout_s=LIMIT_S).start()
    verifier = BoxedMatchVerifier(compare=comparator)
    (first,) = comparator.worker_pids()
    with open(f"/proc/{first}/maps") as f:
        assert "libtorch" not in f.read()  # the worker imports math-verify, not the trainer
    start = time.monotonic()
    assert verifier(rf"\boxed{{{HANGS[0]}}}", HANGS[1], metadata=DONE) == 0.0
    assert time.monotonic() - start < LIMIT_S + OVERHEAD_S
    assert comparator.worker_pids() == [None] and _dead(first)  # it was killed, not waited for

    assert comparator(r"\frac{1}{2}", "0.5") is True  # a fresh worker
    (second,) = comparator.worker_pids()
    assert second not in (None, first)
    start = time.monotonic()
    with pytest.raises(VerificationTimeout, match="longer than 1 s"):
        comparator(*HANGS)
    assert time.monotonic() - start < LIMIT_S + OVERHEAD_S
    assert _dead(second)
    # counted, and the first one logged (a timeout depends on the machine: it must not be silent)
    assert comparator.failures == {"timeout": 2, "crash": 0, "error": 0}
    assert len([r for r in caplog.records if "longer than 1 s" in r.getMessage()]) == 1
    comparator.close()


def test_compare_many_runs_pairs_over_workers(compare):
    pairs = [(r"\frac{1}{2}", "0.5"), HANGS, ("3", "3"), ("2", "3"), ("(x+1)^2", "x^2+2x+1")]
    start = time.monotonic()
    assert compare.compare_many(pairs, timeout_s=LIMIT_S) == [True, None, True, False, True]
    assert time.monotonic() - start < LIMIT_S + OVERHEAD_S + 30  # + restarting the worker
    with pytest.raises(TypeError, match="two str"):
        compare.compare_many([("1", 1)])
    assert compare("0.5", r"\frac{1}{2}") is True


def test_worker_crash_scores_zero_and_warns_once(caplog):
    comparator = MathVerifyComparator(timeout_s=60.0).start()
    assert issubclass(WorkerCrashed, VerificationTimeout)  # BoxedMatchVerifier scores it 0
    caplog.set_level(logging.WARNING, logger="scope_megatron.rewards.math_verify")
    for _ in range(2):
        (pid,) = comparator.worker_pids()
        killer = threading.Timer(0.3, os.kill, (pid, signal.SIGKILL))
        killer.start()
        start = time.monotonic()
        with pytest.raises(WorkerCrashed, match="died"):
            comparator(*HANGS)
        assert time.monotonic() - start < 10.0
        killer.join()
        assert comparator("0.75", r"\frac{3}{4}") is True  # replaced
    assert len([r for r in caplog.records if "died" in r.getMessage()]) == 1
    comparator.close()


def test_worker_that_died_while_idle_is_replaced():
    comparator = MathVerifyComparator(timeout_s=30.0).start()
    (pid,) = comparator.worker_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while comparator._slots[0].alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert comparator("x^2-1", "(x-1)(x+1)") is True
    assert comparator.worker_pids()[0] not in (None, pid)
    comparator.close()
    assert comparator.worker_pids() == [None] and _dead(pid)


def test_workers_exit_when_the_parent_is_killed():
    script = textwrap.dedent("""
        import os, signal
        from scope_megatron.rewards.math_verify import MathVerifyComparator
        comparator = MathVerifyComparator(workers=2).start()
        print(*comparator.worker_pids(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no close()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert run.returncode == -signal.SIGKILL, run.stderr
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while not all(_dead(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_dead(p) for p in pids)


def test_worker_that_cannot_start_is_an_error_not_a_wrong_answer(monkeypatch):
    from scope_megatron.rewards import math_verify as module
    monkeypatch.setattr(module, "_BOOTSTRAP", "import sys; sys.exit(3)")
    comparator = MathVerifyComparator()
    with pytest.raises(RuntimeError, match="exited with status 3"):
        BoxedMatchVerifier(compare=comparator)(r"\boxed{0.5}", r"\frac{1}{2}", metadata=DONE)
    assert comparator.worker_pids() == [None]


def test_bad_settings():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifyComparator(timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        MathVerifyComparator(workers=0)


def test_missing_math_verify_is_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "scope_megatron.rewards.math_verify")
    with pytest.raises(ImportError, match="pip install math-verify"):
        importlib.import_module("scope_megatron.rewards.math_verify")
    monkeypatch.delitem(sys.modules, "scope_megatron.rewards.math_verify", raising=False)
    with pytest.raises(ImportError, match="pip install math-verify"):
        load_reward_fn("scope_megatron.rewards.math_verify:math_verify_match")
