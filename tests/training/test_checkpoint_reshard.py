"""Checkpoint loads across virtual-pipeline and data-parallel changes, in gloo groups
(mc_reshard_workers.py): a PP=2 x VPP=2 checkpoint loads at PP=2 without VPP and at TP=2 (model
and regular optimizer), a distributed optimizer's dp_reshardable state saved at VPP=2 is refused
at another VPP or in other gradient buckets with a CheckpointError (not a dist_checkpointing
shape error mid-load), and ones saved at DP=2 (one bucket, several) load at DP=1 with the same
gathered optimizer state."""
import pytest
import torch

import tests.training.mc_megatron_src  # noqa: F401  (first: may redirect `import megatron`)
from tests.conftest import SESSION_SEED
from tests.distributed import run_workers
from tests.training import mc_launches

LAUNCHES = {"save": 2, "load2": 2, "load1": 1}  # run in this order (later ones read earlier files)
_results: dict = {}


def _launch(name: str):
    if torch.cuda.is_available():
        pytest.skip("the training launches test the CPU path (gloo, CPU shims)")
    if name not in _results:
        mc_launches._shared_dir()
        for earlier in list(LAUNCHES)[:list(LAUNCHES).index(name)]:
            _launch(earlier)
        try:
            _results[name] = run_workers(f"tests.training.mc_reshard_workers:{name}_launch",
                                         LAUNCHES[name], seed=SESSION_SEED, timeout=mc_launches.TIMEOUT)
        except RuntimeError as exc:
            _results[name] = exc
    return _results[name]


@pytest.mark.parametrize("launch,check", [
    ("save", "save_pp2_vpp2_regular"),
    ("save", "save_pp2_vpp2_distributed"),
    ("save", "save_dp2_distributed"),
    ("save", "save_dp2_distributed_buckets"),
    ("load2", "reshard_pp2_vpp2_to_pp2"),
    ("load2", "reshard_pp2_vpp2_to_tp2"),
    ("load2", "distributed_optimizer_across_vpp_refused"),
    ("load2", "distributed_optimizer_more_buckets_refused"),
    ("load2", "distributed_optimizer_fewer_buckets_refused"),
    ("load2", "distributed_optimizer_other_buckets_refused_unrecorded"),
    ("load1", "reshard_distributed_optimizer_dp2_to_dp1"),
    ("load1", "reshard_distributed_optimizer_buckets_dp2_to_dp1"),
    ("load1", "reshard_distributed_optimizer_unrecorded_buckets_dp2_to_dp1"),
])
def test_reshard(launch, check):
    mc_launches.assert_check(launch, check, _launch(launch))
