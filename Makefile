# make install / make test / make demo. Each creates .venv if it is missing.
# torch is pinned so that a CPU machine never downloads a CUDA build. GPU users override it, e.g.
#   make install TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
PYTEST_ARGS ?= -n 2
DEMO_OUT ?= demo-output

.PHONY: install test test-fast demo lint format clean

install: $(VENV)/.rahf-installed

$(VENV)/.rahf-installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bnb]" "$(TORCH_SPEC)"
	touch $@

test: install
	# Two single-threaded workers beat two workers fighting over two cores with two threads each.
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# Day-to-day: the suite without the slow end-to-end runs and the two-process launches (`make test` runs everything).
test-fast: install
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) -m "not slow and not distributed"

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/rahf demo --out $(DEMO_OUT)

LINT_PATHS := rahf improve pipelines configs tests benchmarks

lint: install
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/ruff check $(LINT_PATHS)

format: install
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
