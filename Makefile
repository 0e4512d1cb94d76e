# Quick start (README): `make train` runs the main job, `make test` the whole test suite; both
# set up .venv and build the extension first (tools/setup_env.sh).
VENV ?= .venv
export SCOPE_VENV := $(abspath $(VENV))

.PHONY: setup train test bench clean

setup:
	tools/setup_env.sh

train: setup
	$(VENV)/bin/torchrun --nproc-per-node 2 examples/pretrain_scope.py

test:
	tools/run_tests.sh

bench: setup
	$(VENV)/bin/python tools/bench_ops.py

clean:
	rm -rf build *.egg-info scope_megatron/_C*.so $(VENV)/scope-build.stamp
