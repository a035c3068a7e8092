# nemu: set-up, run, test. `make run` and `make test` create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pins for this machine live here, not in pyproject (Colab keeps its own torch).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
# glibc's allocator page-faults on large CPU batches; this keeps freed memory (RELAX ResNet-18 per image: 12.1 s -> 7.9 s).
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: setup run reference test lint lab clean student

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The notebook series end to end (profile: NEMU_PROFILE, default cpu here) -> outputs/ (nemu_lib/series.py).
# It prints each notebook's expected time, the section running (at most every 10 s), its measured time and
# ok / FAILED; a failing notebook does not stop the series, but makes the target fail at the end. The table
# of times: outputs/run-summary.{md,json}; the results: outputs/results.md. NEMU_RETRAIN=1 trains every model
# here instead of loading the shipped reference models. Options: RUN_ARGS, e.g. RUN_ARGS="--only 02,03".
run: setup
	$(BIN)/python -m nemu_lib.series $(RUN_ARGS)

# Retrain every reference model from scratch (cpu profile, seed 0: the series with NEMU_RETRAIN=1 in a fresh
# outputs folder: 26 min on 2 cores), then rewrite data/reference and its manifest (nemu_lib.reference). A notebook
# that fails stops it before anything is rewritten.
REFERENCE_RUN := outputs/reference-build
reference: setup
	rm -rf $(REFERENCE_RUN)
	NEMU_PROFILE=cpu NEMU_RETRAIN=1 NEMU_OUTPUTS=$(CURDIR)/$(REFERENCE_RUN) $(BIN)/python -m nemu_lib.series
	$(BIN)/python -m nemu_lib.reference collect $(REFERENCE_RUN) --dest data/reference

# Student copies of the notebooks in outputs/student: the worked solutions (cells tagged `solution`) left out, so each
# exercise's check follows its answer cell and prints a hint while the answer is None (nemu_lib/student.py).
student: setup
	$(BIN)/python -m nemu_lib.student

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
	$(BIN)/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf outputs/smoke .pytest_cache

# The course website in outputs/site (docs/build.py, Sphinx + myst-nb): README, the notebooks (the executed copies of
# the last `make run` in outputs/notebooks when present, else as committed), outputs/results.md and the API reference.
# Warnings are errors. View it: python -m http.server -d outputs/site. `make test` builds it from the committed
# notebooks (tests/test_site.py). site-check: headless Chromium loads notebook 02's page (MathJax typeset, images
# loaded) and saves a screenshot in outputs/site-check/; it needs `apt-get install -y chromium`, so CI does not run it.
.PHONY: site site-check
site: setup
	$(BIN)/python docs/build.py $(SITE_ARGS)

site-check: site
	$(BIN)/python docs/site_check.py $(SITE_CHECK_ARGS)

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
