"""compute_loss at TP = 2 in real gloo process groups: one launch for all checks, each reported as
its own test. See tp_checks.py for what each check does."""
import pytest

from tests.conftest import SESSION_SEED
from tests.distributed import run_workers
from tests.scope.tp_checks import checks

WORLD_SIZE = 2
_results = {}


def _results_once():
    if "value" not in _results:
        try:
            _results["value"] = run_workers("tests.scope.tp_checks:run", WORLD_SIZE, seed=SESSION_SEED,
                                            timeout=300)
        except RuntimeError as exc:
            _results["value"] = exc
    return _results["value"]


@pytest.mark.parametrize("check", list(checks()))
def test_tp2(check):
    results = _results_once()
    if isinstance(results, Exception):
        pytest.fail(str(results))
    errors = [f"rank {rank}:\n{res[check]}" for rank, res in enumerate(results) if res[check]]
    assert not errors, f"SCOPE_TEST_SEED={SESSION_SEED}\n" + "\n".join(errors)
