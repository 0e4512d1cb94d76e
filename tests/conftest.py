"""Shared fixtures. Random inputs are fresh on every run; the seed is printed so that a failure
can be replayed with SCOPE_TEST_SEED=<seed>."""
import os
import random

import pytest
import torch


def _session_seed() -> int:
    env = os.environ.get("SCOPE_TEST_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**31)


SESSION_SEED = _session_seed()


def pytest_report_header(config):
    return f"scope-megatron test seed: SCOPE_TEST_SEED={SESSION_SEED}"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the session seed and the test's name (fresh each run)."""
    seed = (SESSION_SEED * 1000003 + sum(map(ord, request.node.nodeid))) % (2**63)
    print(f"[seed] SCOPE_TEST_SEED={SESSION_SEED} ({request.node.nodeid}: {seed})")
    return torch.Generator().manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
