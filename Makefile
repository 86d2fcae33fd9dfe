# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# Both create .venv, install what they need (CPU torch from local disk, never a CUDA wheel) and
# build the extension; re-running only rebuilds when csrc/ or the build files change.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH_CPU := torch==2.13.0
EXT_SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: install test bench plot gpu-check clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Torch only when none is present (keeps a CUDA torch someone installed on purpose).
$(VENV)/.deps-stamp: | $(VPY)
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_CPU)
	$(PIP) install "setuptools>=64" ninja triton pytest pytest-benchmark matplotlib
	touch $@

# Editable install; rebuilt whenever the extension's sources or build files change.
$(VENV)/.install-stamp: $(VENV)/.deps-stamp $(EXT_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.install-stamp

test: install
	$(VPY) -m pytest -q

# DocRED-shaped benchmark of every fused backend available here against the unfused eager
# reference and torch.compile of it; appends to bench/results/<device>.csv and plots it.
bench: install
	$(VPY) bench/run.py
	$(VPY) bench/plot.py

plot: install
	$(VPY) bench/plot.py

# On a CUDA machine, no internet needed: install this checkout into the Python that is there (with
# its CUDA torch and triton), run all tests including the GPU ones, the GPU benchmarks and the
# plots, print a summary; under 8 minutes. Results go to bench/results/ (and $OUT when set).
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

clean:
	rm -rf build $(VENV) *.egg-info ncrl_kernels/_C*.so
