"""The vocab-parallel ops at TP = 2 and 4 in real gloo process groups (one launch per world size,
each check reported as its own test). See tp_checks.py for what each check does."""
import pytest

from tests.conftest import SESSION_SEED
from tests.distributed import run_workers
from tests.ops.tp_checks import checks_for

WORLD_SIZES = (2, 4)
_results = {}


def _results_for(world_size):
    if world_size not in _results:
        try:
            _results[world_size] = run_workers("tests.ops.tp_checks:run", world_size, seed=SESSION_SEED,
                                               timeout=300)
        except RuntimeError as exc:
            _results[world_size] = exc
    return _results[world_size]


@pytest.mark.parametrize("world_size,check", [(w, c) for w in WORLD_SIZES for c in checks_for(w)])
def test_tp(world_size, check):
    results = _results_for(world_size)
    if isinstance(results, Exception):
        pytest.fail(str(results))
    errors = [f"rank {rank}:\n{res[check]}" for rank, res in enumerate(results) if res[check]]
    assert not errors, f"SCOPE_TEST_SEED={SESSION_SEED}\n" + "\n".join(errors)
