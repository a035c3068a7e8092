# nemu: set-up, run, test. `make run` and `make test` create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pins for this machine live here, not in pyproject (Colab keeps its own torch).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
# glibc's allocator page-faults on large CPU batches; this keeps freed memory (see DESIGN.md).
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: setup run test lint lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The notebook series end to end (profile: NEMU_PROFILE, default cpu here) -> outputs/.
# A notebook whose assertions fail does not stop the series (each runs alone); the failures are listed
# at the end and make the target fail.
run: setup
	mkdir -p outputs/notebooks
	failed=""; for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  NEMU_BATCH=1 $(BIN)/papermill --kernel python3 --cwd notebooks $$nb outputs/notebooks/$$(basename $$nb) \
	    || failed="$$failed $$(basename $$nb)"; \
	done; \
	$(BIN)/python -m nemu_lib.results outputs; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed (executed copies with the error in outputs/notebooks/)"; exit 1; fi

# Unit tests, then every notebook in the smoke profile under nbval.
test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest tests -q --durations=15
	NEMU_BATCH=1 NEMU_PROFILE=smoke NEMU_OUTPUTS=$(CURDIR)/outputs/smoke $(BIN)/pytest --nbval-lax --nbval-current-env \
	  -p no:cacheprovider -q --durations=10 $(NOTEBOOKS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/nbstripout --verify $(NOTEBOOKS)

lab: setup
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf outputs/smoke .pytest_cache

# On a GPU: pytest with CUDA, every notebook (smoke), a torchrun kill-and-resume and the benches on cuda, one
# summary line per step (scripts/gpu_check.py; outputs/gpu-check/summary.json). No `setup` here: it runs the
# interpreter that has torch (.venv's, else python3 as on Colab or a cluster image), installs what pyproject
# lists with that torch pinned, and never installs this machine's torch pins. Options: GPU_CHECK_ARGS, e.g.
# GPU_CHECK_ARGS="--only pytest,notebooks"; offline: NEMU_WHEELHOUSE=.whl (see `wheels`).
CHECK_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
.PHONY: gpu-check wheels
gpu-check:
	$(CHECK_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# The dev dependencies as wheels in .whl/ for an offline GPU machine: CPython $(WHEEL_PYTHON), manylinux x86_64,
# torch and the CUDA libraries left out. WHEEL_TORCH=2.11.0 resolves against the GPU machine's torch;
# WHEEL_EXCLUDE="numpy scipy" leaves out what it has. There: NEMU_WHEELHOUSE=.whl make gpu-check.
WHEEL_PYTHON ?= 3.12
wheels:
	$(CHECK_PY) scripts/gpu_check.py --download-wheels .whl --wheel-python $(WHEEL_PYTHON) \
	  $(if $(WHEEL_TORCH),--wheel-torch $(WHEEL_TORCH)) $(if $(WHEEL_EXCLUDE),--wheel-exclude "$(WHEEL_EXCLUDE)")
