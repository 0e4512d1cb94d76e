"""Session fixtures of the conversion tests: the tiny HF models (built once, in this process) and
the two multi-process launches (each runs many checks; the tests report them one by one)."""
import os

import pytest

from tests.conftest import SESSION_SEED
from tests.convert.hf_models import TINY, build_hf_model
from tests.distributed import run_workers


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """$SCOPE_CONVERT_WORKSPACE (seen by the launched workers), with hf/<name> for every TINY model."""
    ws = tmp_path_factory.mktemp("convert")
    os.environ["SCOPE_CONVERT_WORKSPACE"] = str(ws)
    for i, (name, (arch, fields, shard, dtype)) in enumerate(TINY.items()):
        build_hf_model(ws / "hf" / name, arch, fields, SESSION_SEED + i, max_shard_size=shard, dtype=dtype)
    return ws


def _launch(entry: str, world: int, timeout: float = 400):
    try:
        return run_workers(entry, world, seed=SESSION_SEED, timeout=timeout)[0]
    except RuntimeError as exc:
        return exc


@pytest.fixture(scope="session")
def single(workspace):
    """The one-process launch (conversions, round trips, memory, the end-to-end run)."""
    return _launch("tests.convert.workers:single", 1)


@pytest.fixture(scope="session")
def parallel(single):
    """The two-process launch; it loads the checkpoints the single launch converted."""
    return _launch("tests.convert.workers:parallel", 2)


def check(results, name: str):
    """Fails with the launch's error or the named check's traceback."""
    if isinstance(results, Exception):
        pytest.fail(str(results))
    print(f"{name}: {results['seconds'].get(name)} s")
    if results["checks"][name] is not None:
        pytest.fail(f"check {name} failed:\n{results['checks'][name]}")
