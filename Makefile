# Every target sets itself up: a virtual environment in .venv with the pinned torch first, then this package with its
# test and benchmark extras. Which build of torch 2.13.0 comes depends on where pip looks: a CPU wheel where pip's
# configuration finds one (this project's development and CI machines), otherwise PyPI's, which on Linux is the CUDA
# build (several GB; it runs on a CPU too). `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` asks
# PyTorch's CPU index for torch instead.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple,)

.PHONY: demo demo-external test bench lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet $(TORCH_FROM) $(TORCH)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

# Two training processes of one thread each, one per core (gloo DDP; 1.17x the speed of one process on two threads):
# the figures in the README are this run's (training is deterministic for a given split into processes and threads;
# another split sums floats in another order and the same recipe takes another path, README 'Training').
demo: $(STAMP)
	$(PY) -m modeling_rxt.demo --threads 2 --processes 2

# The demo model (`make demo` first) taught to read an external memory as well (README, External memory).
demo-external: $(STAMP)
	$(PY) -m modeling_rxt.demo --recipe demo-external --output runs/demo-external

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

bench: $(STAMP)
	$(PY) -m modeling_rxt.bench

# mlinter lives in its own environment: it is a development tool, not a dependency of the model.
lint:
	$(PYTHON) -m venv .venv-lint
	.venv-lint/bin/pip install --quiet transformers-mlinter
	.venv-lint/bin/mlinter --no-progress modeling_rxt/configuration_rxt.py modeling_rxt/modeling_rxt.py modeling_rxt/modeling_rxt_blocks.py \
		modeling_rxt/modeling_rxt_memory_write.py modeling_rxt/modeling_rxt_wrappers.py modeling_rxt/modeling_rxt_checks.py modeling_rxt/memory_state.py \
		modeling_rxt/atomic_files.py modeling_rxt/external_memory.py

clean:
	rm -rf $(VENV) .venv-lint runs
