"""HF -> Megatron -> HF in one process: bit-exact round trips, sharded output, overwriting,
atomicity, and the peak memory of the streaming converters (tests/convert/workers.py:single)."""
import pytest

from tests.convert.conftest import check

CHECKS = ["convert_all", "overwrite_replaces_only_with_permission", "tensors_disagreeing_with_config",
          "bit_exact_from_checkpoint", "sharded_output_with_index", "bit_exact_from_memory_tp1",
          "failure_midway_leaves_nothing"]


@pytest.mark.parametrize("name", CHECKS)
def test_roundtrip(single, name):
    check(single, name)


@pytest.mark.parametrize("direction", ["hf_to_megatron", "megatron_to_hf"])
def test_peak_memory_is_a_few_tensors_not_the_model(single, direction):
    """Random Llamas of 8 and 24 layers (51 and 147 MiB): the peak resident memory above the start
    of a conversion stays within a few of the largest tensors (one layer's fc1, 3 MiB) and does
    not grow with the number of layers."""
    check(single, "memory")
    memory = {int(k): v for k, v in single["memory"].items()}
    print({layers: {k: f"{v / 2**20:.1f} MiB" for k, v in m.items()} for layers, m in memory.items()})
    small, big = memory[8], memory[24]
    largest = big["largest_megatron_tensor"]
    assert big[direction] < 5 * largest + (4 << 20), big
    assert big[direction] < 0.15 * big["model_bytes"], big
    assert big[direction] - small[direction] < largest, (small, big)
