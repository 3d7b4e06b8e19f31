"""The training protocol (CGMQ.md sections 4-5) as one library call: :func:`fit`.

``fit`` checks feasibility, pretrains the float network, initialises every quantizer at
8 bits, runs quantization-aware training inside one jitted train step, evaluates the
validation accuracy and the exact cost after each epoch, keeps the best feasible
checkpoint, repairs if none was feasible, certifies, and reports the test accuracy.

Methods (``TrainConfig.method``):

* ``cgmq``: ``optax.chain(partition(adam), constrained_update(cost, budget))``;
* ``dq``: DQ's penalty, loss ``+ lam * max(0, C / budget - 1) ** 2``, no constrained update;
* ``fixed``: uniform ``bits_w`` / ``bits_a`` with learned power-of-two steps (no budget);
* ``float``: the unquantized network.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from cgmq_jax import certify, constraint, cost, data, models, nn, quantizer

METHODS = ("cgmq", "dq", "fixed", "float")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; the defaults are the README's headline run."""

    budget_bops: float | None = 2e6
    model: str = "lenet5"
    method: str = "cgmq"
    epochs: int = 25
    pretrain_epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3  # weights (Adam, cosine-decayed over QAT)
    quantizer_lr: float = 1e-2  # quantizer latents (Adam, constant), in log2 units
    rescale: float = constraint.DEFAULT_RESCALE
    init_bits: int = 8
    lam: float = 1.0  # dq only
    bits_w: int = 4  # fixed only
    bits_a: int = 4  # fixed only
    calibration_size: int = 2048
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(models.MODELS)}")
        if self.method in ("cgmq", "dq"):
            if self.budget_bops is None:
                raise ValueError(f"method {self.method!r} needs a budget (--budget_bops)")
            cost.validate_budget(self.budget_bops)
        for name in ("epochs", "pretrain_epochs", "batch_size"):
            if getattr(self, name) < (1 if name == "batch_size" else 0):
                raise ValueError(f"{name} must be non-negative (batch_size positive)")
        if self.method in ("cgmq", "dq", "fixed") and self.epochs < 1:
            raise ValueError(f"method {self.method!r} needs at least one QAT epoch (--epochs)")
        if not (self.lr > 0 and self.quantizer_lr > 0):
            raise ValueError("learning rates must be positive")


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the certified model and everything measured on the way."""

    config: TrainConfig
    params: Any
    history: list[dict]
    test_accuracy: float
    certificate: dict
    wall_seconds: float
    data_source: str
    specs: tuple[cost.LayerSpec, ...] = ()


def _cross_entropy(model, params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def dq_penalty(params, specs, budget: float, lam: float) -> jax.Array:
    """DQ-style penalty ``lam * max(0, C / budget - 1) ** 2`` on the surrogate cost."""
    return lam * jnp.square(jnp.maximum(cost.bops(params, specs) / budget - 1.0, 0.0))


def make_train_step(model, loss_fn=None):
    """A jitted step ``(state, images, labels) -> (state, loss)`` for a ``TrainState``."""
    loss_fn = loss_fn or functools.partial(_cross_entropy, model)

    @jax.jit
    def train_step(state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, images, labels)
        return state.apply_gradients(grads=grads), loss

    return train_step


def make_accuracy(model, batch_size: int = 1000):
    """``(params, images, labels) -> accuracy`` over a whole split, jitted per batch."""

    @jax.jit
    def correct(params, images, labels):
        logits = model.apply({"params": params}, images)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    def accuracy(params, images, labels) -> float:
        total = 0
        for start in range(0, len(labels), batch_size):
            stop = start + batch_size
            total += int(correct(params, images[start:stop], labels[start:stop]))
        return total / len(labels)

    return accuracy


def _run_epochs(state, train_step, split, config, *, epochs, first_epoch, desc, on_epoch):
    images, labels = split
    steps = len(labels) // config.batch_size
    for epoch in range(first_epoch, first_epoch + epochs):
        losses = []
        batches = data.batches(images, labels, config.batch_size, seed=config.seed, epoch=epoch)
        for x, y in tqdm(batches, total=steps, desc=f"{desc} {epoch + 1}", leave=False):
            state, loss = train_step(state, x, y)
            losses.append(loss)
        state = on_epoch(state, epoch, float(np.mean(jax.device_get(losses))))
    return state


def _quantizer_optimizer(config: TrainConfig, steps: int) -> optax.GradientTransformation:
    weights = optax.adam(optax.cosine_decay_schedule(config.lr, max(steps, 1)))
    return optax.partition(
        {"weight": weights, "quantizer": optax.adam(config.quantizer_lr)}, quantizer.param_labels
    )


def check_config(
    config: TrainConfig, input_shape: tuple[int, ...] = (28, 28, 1)
) -> tuple[cost.LayerSpec, ...]:
    """Validate a config before any data is loaded; return the model's layer specs.

    Raises:
      ValueError: a bad flag value, or a budget that is not a positive finite number.
      certify.InfeasibleBudgetError: the budget is below the network's minimum cost.
    """
    config.validate()
    model = models.get_model(config.model, quantized=True)
    specs = cost.layer_specs(model, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    if config.method in ("cgmq", "dq"):
        certify.check_budget(config.budget_bops, specs)
    return specs


def fit(
    config: TrainConfig,
    dataset: data.MnistData,
    *,
    log=tqdm.write,
    float_params=None,
) -> FitResult:
    """Run the whole protocol and return a certified result.

    Args:
      config: the run's settings.
      dataset: train / validation / test splits (:func:`cgmq_jax.data.load_mnist`).
      log: where the per-epoch lines go.
      float_params: a pretrained float checkpoint (e.g. :func:`pretrain`'s); pretraining
        is skipped when given.

    Raises:
      certify.InfeasibleBudgetError: before any training, if the budget is below the
        network's minimum cost (the message states both numbers).
    """
    started = time.perf_counter()
    key = jax.random.key(config.seed)
    train, validation, test = dataset.train, dataset.validation, dataset.test
    sample = jnp.asarray(train[0][:2])
    specs = check_config(config, sample.shape[1:])
    quantized_model = models.get_model(config.model, quantized=True)
    float_model = quantized_model.clone(quantized=False)
    budget = config.budget_bops if config.method in ("cgmq", "dq") else None

    history: list[dict] = []
    float_accuracy = make_accuracy(float_model)

    # 1. Float pretraining.
    pretrain_epochs = config.pretrain_epochs if config.method != "float" else config.epochs
    if float_params is None:
        float_params = jax.jit(float_model.init)(key, sample)["params"]
    else:
        pretrain_epochs = 0
    tx = optax.adam(config.lr)
    state = train_state.TrainState.create(apply_fn=float_model.apply, params=float_params, tx=tx)

    def log_float(state, epoch, loss):
        accuracy = float_accuracy(state.params, *validation)
        history.append(
            {"epoch": epoch + 1, "phase": "float", "loss": loss, "val_accuracy": accuracy}
        )
        log(f"float epoch {epoch + 1}: loss {loss:.4f}  val acc {100 * accuracy:.2f}%")
        return state

    state = _run_epochs(
        state,
        make_train_step(float_model),
        train,
        config,
        epochs=pretrain_epochs,
        first_epoch=0,
        desc="float",
        on_epoch=log_float,
    )
    if config.method == "float":
        return _finish_float(config, state.params, float_model, specs, history, dataset, started)

    # 2. Quantizers at init_bits (fixed: at bits_w / bits_a).
    rng = np.random.default_rng(config.seed)
    calibration = train[0][rng.permutation(len(train[1]))[: config.calibration_size]]
    if config.method == "fixed":
        bits = {"input_bits": config.bits_a, "weight_bits": config.bits_w}
    else:
        bits = {"input_bits": config.init_bits, "weight_bits": config.init_bits}
    params = nn.init_quantizers(quantized_model, state.params, jnp.asarray(calibration), **bits)

    # 3. QAT.
    steps = config.epochs * (len(train[1]) // config.batch_size)
    optimizer = _quantizer_optimizer(config, steps)
    loss_fn = functools.partial(_cross_entropy, quantized_model)
    if config.method == "cgmq":
        cost_fn = functools.partial(cost.bops, specs=specs)
        tx = optax.chain(
            optimizer, constraint.constrained_update(cost_fn, budget, rescale=config.rescale)
        )
    elif config.method == "dq":
        tx = optimizer

        def loss_fn(params, images, labels):
            return _cross_entropy(quantized_model, params, images, labels) + dq_penalty(
                params, specs, budget, config.lam
            )
    else:  # fixed: the range follows the step, so the loss sees the tied range
        tx = optax.chain(optimizer, constraint.fixed_bitwidths())

        def loss_fn(params, images, labels):
            return _cross_entropy(quantized_model, quantizer.tie_ranges(params), images, labels)
    state = train_state.TrainState.create(apply_fn=quantized_model.apply, params=params, tx=tx)
    accuracy = make_accuracy(quantized_model)
    best = {"val_accuracy": -1.0, "params": None, "epoch": None}

    def log_qat(state, epoch, loss):
        val_accuracy = accuracy(state.params, *validation)
        bops = cost.exact_bops(state.params, specs)
        feasible = budget is None or bops <= budget
        row = {
            "epoch": epoch + 1,
            "phase": "qat",
            "loss": loss,
            "val_accuracy": val_accuracy,
            "bops": bops,
            "relative_bops_percent": cost.relative_bops(bops, specs),
            "within_budget": feasible,
        }
        constrained = _constraint_state(state.opt_state)
        if constrained is not None:
            row["infeasible_steps"] = int(constrained.infeasible_steps)
            row["guard_steps"] = int(constrained.guard_steps)
        history.append(row)
        verdict = "" if budget is None else ("  within budget" if feasible else "  OVER budget")
        log(
            f"QAT epoch {epoch + 1 - config.pretrain_epochs}: loss {loss:.4f}  "
            f"val acc {100 * val_accuracy:.2f}%  BOPs {bops:,} "
            f"({row['relative_bops_percent']:.3f}% of 32-bit){verdict}"
        )
        if feasible and val_accuracy > best["val_accuracy"]:
            best.update(val_accuracy=val_accuracy, params=jax.device_get(state.params))
            best["epoch"] = epoch + 1
        return state

    state = _run_epochs(
        state,
        make_train_step(quantized_model, loss_fn),
        train,
        config,
        epochs=config.epochs,
        first_epoch=config.pretrain_epochs,
        desc="QAT",
        on_epoch=log_qat,
    )

    # 4. The result: best feasible checkpoint, or the last one repaired; then certify.
    # dq keeps its last epoch when no epoch was feasible (as DQ's code does); cgmq repairs.
    repaired_bits = 0
    if best["params"] is not None:
        params = best["params"]
    else:
        params = jax.device_get(state.params)
        if config.method == "cgmq":
            params, repaired_bits = certify.greedy_repair(params, specs, budget)
            log(f"no feasible checkpoint: greedy repair removed {repaired_bits} bits")
    if config.method == "cgmq":
        certificate = certify.certify(params, specs, budget)
    else:  # dq and fixed are reported as they are: meeting the budget is their problem
        certificate = certify.cost_report(params, specs, budget)
    certificate["selected_epoch"] = best["epoch"]
    certificate["repaired_bits"] = repaired_bits
    test_accuracy = accuracy(params, *test)
    return FitResult(
        config=config,
        params=params,
        history=history,
        test_accuracy=test_accuracy,
        certificate=certificate,
        wall_seconds=time.perf_counter() - started,
        data_source=dataset.source,
        specs=specs,
    )


def _constraint_state(opt_state):
    for leaf in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, constraint.ConstrainedUpdateState)
    ):
        if isinstance(leaf, constraint.ConstrainedUpdateState):
            return leaf
    return None


def _finish_float(config, params, float_model, specs, history, dataset, started) -> FitResult:
    params = jax.device_get(params)
    certificate = certify.cost_report(None, specs, config.budget_bops)
    certificate.update(selected_epoch=config.epochs, repaired_bits=0)
    return FitResult(
        config=config,
        params=params,
        history=history,
        test_accuracy=make_accuracy(float_model)(params, *dataset.test),
        certificate=certificate,
        wall_seconds=time.perf_counter() - started,
        data_source=dataset.source,
        specs=specs,
    )
