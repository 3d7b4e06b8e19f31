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

# The benchmark's peers (PyTorch, Qwix) in their own venv, never dependencies of cgmq-jax;
# `-c requirements.txt`: Qwix runs on our very jax, jaxlib and flax (about 2 minutes).
PEERS ?= .venv-peers
$(PEERS)/.installed: requirements-peers.txt requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet -r requirements-peers.txt -c requirements.txt
	touch $@

setup-peers: $(PEERS)/.installed

data: setup
	$(PY) -m cgmq_jax.data fetch

demo: data
	$(PY) experiments/mnist.py --budget_bops $(BUDGET)

# Train-step throughput of LeNet-5, lenet5_bb and DS-CNN (float / cgmq / dq / fixed, the
# levers; PyTorch and Qwix if `make setup-peers` ran, ratios paired per round) and the
# headline fit's time split and peak memory.
bench: data
	$(PY) benchmarks/train_step.py --models lenet5,lenet5_bb,dscnn --devices 1,2 --fit --json bench.json \
		$(if $(wildcard $(PEERS)/bin/python),--peers_python $(PEERS)/bin/python)

lint: setup
	$(VENV)/bin/ruff check cgmq_jax experiments tests benchmarks

# The API reference (pdoc, offline) into docs/api/; any pdoc warning fails the build.
docs: setup
	$(PY) docs/build_api.py

# Both tiers on two workers (pytest-xdist), the 25 slowest tests listed: what CI runs.
test: setup-tfds setup-onnx lint docs
	$(PY) -m pytest -n 2 --dist worksteal --durations=25

# The unit tier alone (everything not marked slow, TFDS not needed): the fast check while
# editing; fits, kill and resume, meshes, C compiles, TFDS and the big fuzz loops are slow.
test-unit: setup
	$(PY) -m pytest -n 2 --dist worksteal -m "not slow" --durations=10
