# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# Both create .venv, install what they need (CPU torch from local disk, never a CUDA wheel) and
# build the extension; re-running only rebuilds when csrc/, the build files or torch change.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH_CPU := torch==2.13.0
EXT_SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: install test bench plot clean check-cuda-build gpu-check FORCE

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Torch only when none is present (keeps a CUDA torch someone installed on purpose).
# transformers, tokenizers, tqdm: the [atlop] extra, so its tests run (transformers needs no torch
# of its own). Re-run when this Makefile changes, so existing venvs pick up new dependencies.
$(VENV)/.deps-stamp: Makefile | $(VPY)
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_CPU)
	$(PIP) install "setuptools>=70.1" ninja triton pytest pytest-benchmark matplotlib \
		"transformers>=4.57" tokenizers tqdm
	touch $@

# The venv's torch version, rewritten only when it changes: the extension runs only with the torch
# it was compiled against, so another torch (pip install -U torch) rebuilds it.
$(VENV)/.torch-version: FORCE $(VENV)/.deps-stamp
	@$(VPY) -c "import torch; print(torch.__version__)" > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

# Editable install; rebuilt whenever the extension's sources, build files or torch change. The build
# log goes to .venv/build.log (shown on failure); its line saying which kernels were built is printed.
$(VENV)/.install-stamp: $(VENV)/.deps-stamp $(VENV)/.torch-version $(EXT_SOURCES)
	$(PIP) install -v --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 || { tail -n 60 $(VENV)/build.log; exit 1; }
	grep -h "ncrl_kernels: building" $(VENV)/build.log | sort -u || true
	touch $@

install: $(VENV)/.install-stamp

test: install
	$(VPY) -m pytest -q

# DocRED-shaped benchmark of every fused backend available here against the unfused eager
# reference and torch.compile of it; appends to bench/results/<device>.csv and plots it. Then the
# host time of a fused step by call path (bench/results/<device>-host-path.csv), what a Triton
# launch costs the host, and the fused-triton step's peak memory on an sm_90 GPU as modelled
# here (bench/memory_model.py).
bench: install
	$(VPY) bench/run.py
	$(VPY) bench/plot.py
	$(VPY) bench/host_path.py
	$(VPY) bench/launch_overhead.py
	$(VPY) bench/memory_model.py

plot: install
	$(VPY) bench/plot.py

# Compile-and-link check of the CUDA kernels, for a machine without a GPU (nothing runs): its own
# venv with the CUDA torch (from local disk), nvcc from CUDA_HOME (default /usr/local/cuda). See
# tools/check_cuda_build.py; re-running reuses the venv and recompiles only what changed.
CUDA_VENV := .venv-cuda
CUDA_VPY := $(CUDA_VENV)/bin/python
TORCH_CUDA := torch==2.14.1

$(CUDA_VPY):
	$(PYTHON) -m venv $(CUDA_VENV)

# The CUDA torch takes about 5.5 GiB installed; a full disk would otherwise fail deep in pip with
# "No space left on device", so check first and say what to do.
CUDA_VENV_GIB := 7

$(CUDA_VENV)/.deps-stamp: | $(CUDA_VPY)
	@free=$$(df -Pk $(CUDA_VENV) | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if ! $(CUDA_VPY) -c "import torch" 2>/dev/null && [ "$${free:-0}" -lt $(CUDA_VENV_GIB) ]; then \
		echo "check-cuda-build: installing $(TORCH_CUDA) into $(CUDA_VENV) needs about $(CUDA_VENV_GIB) GiB free disk, $$free GiB is free; free some (e.g. 'make clean' in old clones) and re-run" >&2; \
		exit 1; \
	fi
	$(CUDA_VPY) -m pip install $(TORCH_CUDA) "setuptools>=70.1" ninja
	touch $@

check-cuda-build: $(CUDA_VENV)/.deps-stamp
	$(CUDA_VPY) tools/check_cuda_build.py

# On a CUDA machine, no internet needed: install this checkout into the Python that is there (with
# its CUDA torch and triton), run the GPU benchmarks, the GPU tests and then the others, the plots,
# print a summary; under 9 minutes. Results go to bench/results/ (and $OUT when set).
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

clean:
	rm -rf build $(VENV) $(CUDA_VENV) *.egg-info ncrl_kernels/_C*.so ncrl_kernels/_build_info.py
