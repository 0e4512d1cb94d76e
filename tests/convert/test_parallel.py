"""Converted checkpoints under TP=2, PP=2 and TP=1 (2 gloo processes): logits equal HF's to fp32
tolerance with 100% top-1 agreement, exports from model chunks in memory (files, and the
in-memory weight sync's named tensors) are bit-exact, a
checkpoint converted with --tp 2 loads into a TP=1 run (tests/convert/workers.py:parallel)."""
import pytest

from tests.convert.conftest import check

CHECKS = ["tp1_logits", "tp2_logits", "converted_at_tp2_loads_at_tp1", "tp2_export_bit_exact",
          "pp2_export_bit_exact", "compare_api_tp2", "tp2_named_tensors", "pp2_named_tensors"]


@pytest.mark.parametrize("name", CHECKS)
def test_parallel(parallel, name):
    check(parallel, name)
    if name.endswith("logits"):
        print(parallel["logits"])
