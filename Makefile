# Quick start (README): `make train` runs the main job, `make test` the whole test suite; both
# set up .venv and build the extension first (tools/setup_env.sh).
VENV ?= .venv
export SCOPE_VENV := $(abspath $(VENV))

.PHONY: setup train test bench clean

setup:
	tools/setup_env.sh

# `python -m torch.distributed.run` is torchrun; a torch kept from the system's site-packages (GPU
# machines, containers) has its torchrun script outside $(VENV)/bin.
train: setup
	$(VENV)/bin/python -m torch.distributed.run --nproc-per-node 2 examples/pretrain_scope.py

test:
	tools/run_tests.sh

bench: setup
	$(VENV)/bin/python tools/bench_ops.py

clean:
	rm -rf build *.egg-info scope_megatron/_C*.so $(VENV)/scope-build.stamp
