"""Runs the training tests against another megatron-core source tree without installing it:

    SCOPE_TEST_MEGATRON_SRC=/path/to/unpacked/megatron_core_wheel python -m pytest tests/training

puts that directory (the one holding `megatron/core`) first on sys.path of the pytest process and
of every launched rank. The way to check the CPU shims against a new megatron-core release on a
machine whose Python the release does not declare support for (e.g. 0.19 wheels on Python 3.11).
Imported before megatron by mc_workers, mc_kill_saver and mc_launches.
"""
import os
import sys

SOURCE = os.environ.get("SCOPE_TEST_MEGATRON_SRC")
if SOURCE and SOURCE not in sys.path:
    sys.path.insert(0, SOURCE)
