# Targets named in the README. `make test` creates .venv, installs the CPU build of torch
# (pinned: an open range would pull a multi-GB CUDA build), installs ehrplan with its `train` and
# `dev` extras, prepares the planner's wheelhouse, lints and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# The planner's dependencies (no torch) and the build backend, as local wheels:
# tests/test_install.py installs `pip install .` from them into a fresh venv, offline.
WHEELHOUSE ?= .wheelhouse

.PHONY: install test lint format bench clean device-wheels

install: $(VENV)/.installed $(WHEELHOUSE)/.done

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $@

# `pip download .` resolves the base dependencies only (the planner); hatchling is the
# build-system requirement of pyproject.toml, needed to build ehrplan itself without an index.
$(WHEELHOUSE)/.done: pyproject.toml $(VENV)/.installed
	rm -rf $(WHEELHOUSE)
	$(PY) -m pip download -q -d $(WHEELHOUSE) . "hatchling>=1.21"
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest

# The GPU machine lent to some sessions has torch but not these (and no network): their wheels
# are carried there for benchmarks/gpu_check.sh (its header says how to run it).
DEVICE_WHEELS := pydantic pydantic_core annotated_types typing_inspection lifelines autograd autograd_gamma
device-wheels: install
	rm -rf .device-wheels .device-wheels.tmp
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		-d .device-wheels.tmp "pydantic>=2.6,<3" "lifelines>=0.27,<1"
	mkdir -p .device-wheels
	for w in $(DEVICE_WHEELS); do cp .device-wheels.tmp/$$w-*.whl .device-wheels/; done
	rm -rf .device-wheels.tmp
	ls .device-wheels

clean:
	rm -rf $(VENV) $(WHEELHOUSE) .pytest_cache .ruff_cache .device-wheels
