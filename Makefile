# Two commands: `make demo` (set up, fetch MNIST, run the headline job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUDGET ?= 2e6

.PHONY: setup setup-tfds data demo test lint

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The optional TFDS source (TensorFlow-CPU, about 1.3 GB): the tests cover it.
$(VENV)/.installed-tfds: $(VENV)/.installed requirements-tfds.txt
	$(PY) -m pip install --quiet -r requirements-tfds.txt
	touch $@

setup: $(VENV)/.installed

setup-tfds: $(VENV)/.installed-tfds

data: setup
	$(PY) -m cgmq_jax.data fetch

demo: data
	$(PY) experiments/mnist.py --budget_bops $(BUDGET)

lint: setup
	$(VENV)/bin/ruff check cgmq_jax experiments tests

test: setup-tfds lint
	$(PY) -m pytest
