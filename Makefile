# Two commands: `make demo` (set up, fetch MNIST, run the headline job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUDGET ?= 2e6

.PHONY: setup data demo test lint

$(VENV)/.installed: requirements.txt requirements-tfds.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-tfds.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) -m cgmq_jax.data fetch

demo: data
	$(PY) experiments/mnist.py --budget_bops $(BUDGET)

lint: setup
	$(VENV)/bin/ruff check cgmq_jax experiments tests

test: setup lint
	$(PY) -m pytest
