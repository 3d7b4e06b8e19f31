# Two commands: `make demo` (set up, fetch MNIST, run the headline job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUDGET ?= 2e6

.PHONY: setup setup-tfds setup-onnx setup-peers data demo bench test test-unit lint docs

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

# The optional ONNX export and ONNX Runtime (CPU): the tests cover them.
$(VENV)/.installed-onnx: $(VENV)/.installed requirements-onnx.txt
	$(PY) -m pip install --quiet -r requirements-onnx.txt
	touch $@

setup-onnx: $(VENV)/.installed-onnx

# The PyTorch peer of the benchmark, in its own venv (never a dependency of cgmq-jax).
PEERS ?= .venv-peers
$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet torch==2.13.0 numpy
	touch $@

setup-peers: $(PEERS)/.installed

data: setup
	$(PY) -m cgmq_jax.data fetch

demo: data
	$(PY) experiments/mnist.py --budget_bops $(BUDGET)

# Train-step throughput (float / cgmq / dq / fixed, the levers, PyTorch if `make
# setup-peers` ran) and the headline fit's time split and peak memory.
bench: data
	$(PY) benchmarks/train_step.py --fit --json bench.json \
		$(if $(wildcard $(PEERS)/bin/python),--torch_python $(PEERS)/bin/python)

lint: setup
	$(VENV)/bin/ruff check cgmq_jax experiments tests benchmarks

# The API reference (pdoc, offline) into docs/api/; any pdoc warning fails the build.
docs: setup
	$(PY) docs/build_api.py

# Both tiers on two workers (pytest-xdist), the 25 slowest tests listed: what CI runs.
test: setup-tfds setup-onnx lint docs
	$(PY) -m pytest -n 2 --durations=25

# The unit tier alone (everything not marked slow, TFDS not needed): the fast check while
# editing; fits, kill and resume, meshes, C compiles, TFDS and the big fuzz loops are slow.
test-unit: setup
	$(PY) -m pytest -n 2 -m "not slow" --durations=10
