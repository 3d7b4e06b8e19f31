"""The training protocol (CGMQ.md sections 4-5) as one library call: :func:`fit`.

``fit`` checks feasibility, pretrains the float network (BatchNorm, if the model has it,
on batch statistics, with running averages for evaluation), folds its BatchNorm into the
layers before it, initialises every quantizer at 8 bits, runs quantization-aware training
inside one jitted train step, evaluates the validation accuracy and the exact cost after
each epoch, keeps the best feasible checkpoint, repairs if none was feasible, certifies,
and reports the test accuracy.

Methods (``TrainConfig.method``):

* ``cgmq``: :func:`cgmq_jax.constraint.cgmq_optimizer`, that is
  ``optax.chain(partition(adam), constrained_update(cost, budget))``;
* ``dq``: DQ's penalty, loss ``+ lam * max(0, C / budget - 1) ** 2``, no constrained update;
* ``fixed``: uniform ``bits_w`` / ``bits_a`` with learned power-of-two steps (no budget);
* ``float``: the unquantized network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from cgmq_jax import certify, constraint, cost, data, models, nn, quantizer
from cgmq_jax.runs import parallel

METHODS = ("cgmq", "dq", "fixed", "float")
MAX_BITS = 16


class TrainingDiverged(RuntimeError):
    """A non-finite loss or parameter: the run stops, and nothing is certified."""


class Interrupted(Exception):
    """Training was asked to stop (Ctrl-C); ``saved`` says whether a checkpoint was written."""

    def __init__(self, where: str, saved: bool):
        super().__init__(where)
        self.where = where
        self.saved = saved


#: Bits per KiB of memory (the CLI's memory limits are in KiB).
KIB = 8192


def _positive_finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; the defaults are the README's headline run."""

    budget_bops: float | None = 2e6
    budget_weight_kib: float | None = None  # weight memory limit, KiB (8,192 bits)
    budget_activation_kib: float | None = None  # largest activation limit, KiB
    model: str = "lenet5"
    method: str = "cgmq"
    epochs: int = 25
    pretrain_epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3  # weights (Adam, cosine-decayed over QAT)
    quantizer_lr: float = 1e-2  # quantizer latents (Adam, constant), in log2 units
    rescale: float = constraint.DEFAULT_RESCALE
    init_bits: int = 8
    lam: float = 1.0  # dq only: the weight of the BOP term (and of the others by default)
    lam_weight: float | None = None  # dq only: the weight-memory term's (default: lam)
    lam_activation: float | None = None  # dq only: the activation term's (default: lam)
    bits_w: int = 4  # fixed only
    bits_a: int = 4  # fixed only
    input_bits: int | None = None  # the network input pinned at these bits (None: learned)
    fill_epochs: int = 1  # cgmq only: the filled network's weights trained this many epochs
    calibration_size: int = 2048
    seed: int = 0
    devices: int = 1  # data parallel over this many devices (of all processes' devices)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its valid range."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(models.MODELS)}")
        for name, flag in (
            ("budget_bops", "--budget_bops"),
            ("budget_weight_kib", "--budget_weight_kib"),
            ("budget_activation_kib", "--budget_activation_kib"),
        ):
            value = getattr(self, name)
            if value is not None and not _positive_finite(value):
                raise ValueError(f"{flag} must be a positive finite number, got {value!r}")
        if self.method in ("cgmq", "dq") and not self.limits:
            raise ValueError(
                f"method {self.method!r} needs a limit: --budget_bops, --budget_weight_kib "
                "and / or --budget_activation_kib"
            )
        ranges = {  # field: (smallest, largest) allowed integer
            "epochs": (1, 10_000),
            "pretrain_epochs": (0, 10_000),
            "fill_epochs": (0, 10_000),
            "batch_size": (1, 1 << 20),
            "init_bits": (2, MAX_BITS),
            "bits_w": (2, MAX_BITS),
            "bits_a": (1, MAX_BITS),
            "calibration_size": (1, 1 << 20),
            "seed": (0, 2**32 - 1),
            "devices": (1, 1 << 16),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"--{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.input_bits is not None and (
            isinstance(self.input_bits, bool)
            or not isinstance(self.input_bits, int)
            or not 1 <= self.input_bits <= MAX_BITS
        ):
            raise ValueError(
                f"--input_bits must be an integer in [1, {MAX_BITS}] (8: Bayesian Bits' "
                f"convention), or unset to learn the input's bits; got {self.input_bits!r}"
            )
        if self.batch_size % self.devices:
            raise ValueError(
                f"--batch_size {self.batch_size} does not split over --devices {self.devices}: "
                "choose a batch size that is a multiple of the number of devices"
            )
        for name in ("lr", "quantizer_lr"):
            if not _positive_finite(getattr(self, name)):
                raise ValueError(
                    f"--{name} must be a positive finite number, got {getattr(self, name)!r}"
                )
        if not (_positive_finite(self.rescale) and self.rescale > 1):
            raise ValueError(
                f"--rescale (CGGD's R) must be a finite number > 1, got {self.rescale!r}; "
                f"the default is {constraint.DEFAULT_RESCALE}"
            )
        for name in ("lam", "lam_weight", "lam_activation"):
            value = getattr(self, name)
            if name != "lam" and value is None:
                continue
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")

    @property
    def limits(self) -> dict:
        """``{cost name: limit}`` (BOPs; memory in bits) of the limits that are set."""
        limits = {}
        if self.budget_bops is not None:
            limits["bops"] = self.budget_bops
        if self.budget_weight_kib is not None:
            limits["weight_memory_bits"] = self.budget_weight_kib * KIB
        if self.budget_activation_kib is not None:
            limits["activation_bits"] = self.budget_activation_kib * KIB
        return limits


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
    #: Wall seconds by part: ``compile`` (the train steps), ``train``, ``evaluate``
    #: (validation after each epoch), ``other`` (setup, checkpoints, the fill and its
    #: weight training, certificate, test).
    timings: dict = dataclasses.field(default_factory=dict)


def _cross_entropy(model, params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def dq_penalty(params, specs, budget, lam: float) -> jax.Array:
    """DQ-style penalty ``lam * max(0, C / budget - 1) ** 2`` on the surrogate cost.

    ``budget``: the BOP budget, or ``{cost name: limit}``; with several limits the penalty
    is the sum of one such term per limit (``lam`` a number, or ``{cost name: lam}``).
    """
    if not isinstance(budget, dict):
        return lam * jnp.square(jnp.maximum(cost.bops(params, specs) / budget - 1.0, 0.0))
    functions = cost.cost_functions(specs)
    total = jnp.float32(0.0)
    for name, limit in budget.items():
        weight = lam[name] if isinstance(lam, dict) else lam
        total = total + weight * jnp.square(jnp.maximum(functions[name](params) / limit - 1.0, 0.0))
    return total


class BatchNormTrainState(train_state.TrainState):
    """A ``TrainState`` with the BatchNorm statistics of a float network (Flax's ImageNet
    example's): ``batch_stats`` are updated by each step, not by the optimizer."""

    batch_stats: Any = None


def _float_variables(state) -> dict:
    """The float network's variables: ``params``, with ``batch_stats`` if it has BatchNorm."""
    if isinstance(state, BatchNormTrainState):
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params}


def make_train_step(
    model, loss_fn=None, *, placement: parallel.Placement | None = None, donate: bool = False
):
    """A jitted step ``(state, images, labels) -> (state, loss)`` for a ``TrainState``.

    For a :class:`BatchNormTrainState` (and no ``loss_fn``) the model is called with
    ``train=True``: BatchNorm normalises with the batch's statistics and the step stores
    the updated running averages in ``state.batch_stats``.

    With a ``placement`` the step is data parallel: the batch split over its mesh, the state
    and the loss replicated (the loss and the gradients are means over the global batch).
    With ``donate`` the step reuses the input state's buffers (``fit`` does; on a CPU the
    effect was within the benchmark's noise); the state passed in is then unusable.
    """
    loss_fn = loss_fn or functools.partial(_cross_entropy, model)

    def batch_norm_loss(params, batch_stats, images, labels):
        variables = {"params": params, "batch_stats": batch_stats}
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    def train_step(state, images, labels):
        if isinstance(state, BatchNormTrainState):
            (loss, batch_stats), grads = jax.value_and_grad(batch_norm_loss, has_aux=True)(
                state.params, state.batch_stats, images, labels
            )
            return state.apply_gradients(grads=grads).replace(batch_stats=batch_stats), loss
        loss, grads = jax.value_and_grad(loss_fn)(state.params, images, labels)
        return state.apply_gradients(grads=grads), loss

    donated = (0,) if donate else ()
    if placement is None:
        return jax.jit(train_step, donate_argnums=donated)
    replicated, batch = placement.replicated, placement.batch
    return jax.jit(
        train_step,
        in_shardings=(replicated, batch, batch),
        out_shardings=replicated,
        donate_argnums=donated,
    )


def make_accuracy(model, batch_size: int = 1000):
    """``(params, images, labels) -> accuracy`` over a whole split, jitted per batch.

    For a float network with BatchNorm pass its variables, ``{"params": ...,
    "batch_stats": ...}``, as ``batch_stats=``: it is evaluated with the running averages.
    """

    @jax.jit
    def correct(variables, images, labels):
        logits = model.apply(variables, images)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    def accuracy(params, images, labels, *, batch_stats=None) -> float:
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        total = 0
        for start in range(0, len(labels), batch_size):
            stop = start + batch_size
            total += int(correct(variables, images[start:stop], labels[start:stop]))
        return total / len(labels)

    return accuracy


def check_config(
    config: TrainConfig, input_shape: tuple[int, ...] = (28, 28, 1)
) -> tuple[cost.LayerSpec, ...]:
    """Validate a config before any data is loaded; return the model's layer specs.

    Raises:
      ValueError: a bad flag value, a budget that is not a positive finite number, or more
        devices than there are.
      certify.InfeasibleBudgetError: the budget is below the network's minimum cost.
    """
    config.validate()
    parallel.data_parallel_mesh(config.devices)  # as many devices as asked for
    model = models.get_model(config.model, quantized=True, input_bits=config.input_bits)
    specs = cost.layer_specs(model, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    if config.method in ("cgmq", "dq"):
        certify.check_budget(_budget_of(config), specs)
    return specs


def _lams(config: TrainConfig, budget):
    """DQ's penalty weight: ``lam`` for one BOP budget, else one per limit."""
    if not isinstance(budget, dict):
        return config.lam
    own = {"weight_memory_bits": config.lam_weight, "activation_bits": config.lam_activation}
    return {name: config.lam if own.get(name) is None else own[name] for name in budget}


def _budget_of(config: TrainConfig):
    """The BOP budget as a number when it is the only limit (the 0.1.0 path, bit for bit),
    else ``{cost name: limit}``."""
    limits = config.limits
    return limits["bops"] if list(limits) == ["bops"] else limits


def check_dataset(config: TrainConfig, dataset: data.MnistData) -> None:
    """Raise ``ValueError`` unless the splits can train at least one step and be evaluated."""
    for name, (images, labels) in zip(
        ("train", "validation", "test"),
        (dataset.train, dataset.validation, dataset.test),
        strict=True,
    ):
        if len(images) != len(labels):
            raise ValueError(f"the {name} split has {len(images)} images but {len(labels)} labels")
        if len(labels) == 0:
            raise ValueError(f"the {name} split of {dataset.source} is empty")
    if len(dataset.train[1]) < config.batch_size:
        raise ValueError(
            f"the train split has {len(dataset.train[1])} examples, fewer than one batch "
            f"(--batch_size {config.batch_size}): no step would be trained"
        )


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every phase of a run needs: the config, the models, the layer specs."""

    config: TrainConfig
    specs: tuple[cost.LayerSpec, ...]
    model: Any  # quantized
    float_model: Any
    steps_per_epoch: int
    float_epochs: range  # global epoch numbers (they seed the data order)
    qat_epochs: range
    placement: parallel.Placement

    @property
    def budget(self):
        """The BOP budget, or ``{cost name: limit}`` (several limits), or None (no limit)."""
        return _budget_of(self.config) if self.config.method in ("cgmq", "dq") else None


@dataclasses.dataclass
class _Progress:
    """Where a run stands; with the arrays, what a checkpoint holds (JSON-serialisable)."""

    phase: str = "float"  # of the state held: "float" or "qat" ("tune": the fill's, never saved)
    epoch: int = 0  # global number of the epoch in progress (or next)
    step: int = 0  # batches of ``epoch`` already trained (non-zero after an interrupt)
    losses: list[float] = dataclasses.field(default_factory=list)  # of those batches
    history: list[dict] = dataclasses.field(default_factory=list)
    best_epoch: int | None = None
    best_val_accuracy: float = -1.0
    seconds: float = 0.0  # training time spent before this process (resumed runs)


def _make_setup(config: TrainConfig, dataset: data.MnistData, *, pretrained: bool) -> _Setup:
    check_dataset(config, dataset)
    specs = check_config(config, dataset.train[0].shape[1:])
    model = models.get_model(config.model, quantized=True, input_bits=config.input_bits)
    steps = len(dataset.train[1]) // config.batch_size
    if config.method == "float":
        float_epochs, qat_epochs = range(0 if pretrained else config.epochs), range(0)
    else:
        first_qat = config.pretrain_epochs
        float_epochs = range(0 if pretrained else first_qat)
        qat_epochs = range(first_qat, first_qat + config.epochs)
    placement = parallel.Placement(parallel.data_parallel_mesh(config.devices))
    return _Setup(
        config,
        specs,
        model,
        model.clone(quantized=False),
        steps,
        float_epochs,
        qat_epochs,
        placement,
    )


def _float_state(setup: _Setup, variables: dict) -> train_state.TrainState:
    """Adam on the float network; a :class:`BatchNormTrainState` if it has BatchNorm."""
    tx = optax.adam(setup.config.lr)
    apply_fn, params = setup.float_model.apply, variables["params"]
    if "batch_stats" in variables:
        return BatchNormTrainState.create(
            apply_fn=apply_fn, params=params, tx=tx, batch_stats=variables["batch_stats"]
        )
    return train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=tx)


def initial_step(config: TrainConfig, dataset: data.MnistData, *, donate: bool = True):
    """``(train_step, state, placement)``: the jitted step of ``config``'s training and its
    first state, as :func:`fit` builds them (float network at its random init; for QAT,
    quantizers calibrated on it; the state's buffers donated to the step), placed on
    ``config.devices``; batches go through ``placement.put_batch``. For benchmarks
    (``benchmarks/train_step.py``)."""
    setup = _make_setup(config, dataset, pretrained=False)
    sample = jnp.asarray(dataset.train[0][:2])
    variables = jax.jit(setup.float_model.init)(jax.random.key(config.seed), sample)
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    if config.method == "float":
        state, model, loss_fn = _float_state(setup, variables), setup.float_model, None
    else:
        calibration = _calibration_batch(setup, dataset.train[0])
        state, model = _qat_state(setup, variables, calibration), setup.model
        loss_fn = _qat_loss(setup)
    step = make_train_step(model, loss_fn, placement=setup.placement, donate=donate)
    return step, setup.placement.replicate(state), setup.placement


def _float_variables_of(setup: _Setup, float_params, sample: jax.Array) -> dict:
    """``fit``'s ``float_params`` as variables: the params tree, or (a float network with
    BatchNorm) its variables ``{"params", "batch_stats"}``, which it must then be."""
    shapes = jax.eval_shape(setup.float_model.init, jax.random.key(0), sample)
    if "batch_stats" not in shapes:
        return {"params": float_params}
    if not (isinstance(float_params, dict) and set(float_params) >= {"params", "batch_stats"}):
        raise ValueError(
            f"{setup.config.model} has BatchNorm: float_params must be its float variables "
            '{"params": ..., "batch_stats": ...} (a float run\'s FitResult.params)'
        )
    return {"params": float_params["params"], "batch_stats": float_params["batch_stats"]}


def _calibration_batch(setup: _Setup, images: np.ndarray) -> jax.Array:
    rng = np.random.default_rng(setup.config.seed)
    return jnp.asarray(images[rng.permutation(len(images))[: setup.config.calibration_size]])


def _qat_state(setup: _Setup, variables: dict, calibration: jax.Array) -> train_state.TrainState:
    """Quantizers at ``init_bits`` (fixed: ``bits_w`` / ``bits_a``), the method's optimizer.

    ``variables`` are the float network's; BatchNorm, if any, is folded into the layers
    before it first (:func:`cgmq_jax.models.fold_batchnorm`), so the quantizers are
    calibrated on, and quantize, the folded weights.
    """
    config = setup.config
    if config.method == "fixed":
        bits = {"input_bits": config.bits_a, "weight_bits": config.bits_w}
    else:
        bits = {"input_bits": config.init_bits, "weight_bits": config.init_bits}
    float_params = variables["params"]
    if "batch_stats" in variables:
        float_params = models.fold_batchnorm(setup.float_model, variables, calibration[:1])
    params = nn.init_quantizers(models.folded(setup.model), float_params, calibration, **bits)
    steps = len(setup.qat_epochs) * setup.steps_per_epoch
    learning_rate = optax.cosine_decay_schedule(config.lr, max(steps, 1))
    if config.method == "cgmq":
        budget = setup.budget
        if isinstance(budget, dict):  # several limits: one constraint each
            functions = cost.cost_functions(setup.specs)
            cost_fn, budget = {name: (functions[name], b) for name, b in budget.items()}, None
        else:
            cost_fn = functools.partial(cost.bops, specs=setup.specs)
        tx = constraint.cgmq_optimizer(
            cost_fn,
            budget,
            learning_rate=learning_rate,
            quantizer_learning_rate=config.quantizer_lr,
            rescale=config.rescale,
        )
    else:
        tx = constraint.partitioned_adam(learning_rate, config.quantizer_lr)
        if config.method == "fixed":
            tx = optax.chain(tx, constraint.fixed_bitwidths())
    return train_state.TrainState.create(apply_fn=setup.model.apply, params=params, tx=tx)


def _qat_loss(setup: _Setup):
    config, model = setup.config, setup.model
    if config.method == "dq":

        def loss_fn(params, images, labels):
            # Traced in this order (cross-entropy, then the penalty) as in 0.1.0, so that the
            # gradient sums, and the runs, stay bit for bit those of the last release.
            return _cross_entropy(model, params, images, labels) + dq_penalty(
                params, setup.specs, setup.budget, _lams(config, setup.budget)
            )

    elif config.method == "fixed":  # the range follows the step: the loss sees the tie

        def loss_fn(params, images, labels):
            return _cross_entropy(model, quantizer.tie_ranges(params), images, labels)

    else:
        loss_fn = functools.partial(_cross_entropy, model)
    return loss_fn


def _checkpoint_arrays(state, best_params) -> dict:
    arrays = {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": jnp.asarray(state.step, jnp.int32),
        "best_params": best_params if best_params is not None else state.params,
    }
    if isinstance(state, BatchNormTrainState):  # the float phase of a model with BatchNorm
        arrays["batch_stats"] = state.batch_stats
    return arrays


def _epoch_name(setup: _Setup, progress: _Progress) -> str:
    """``float epoch k`` or ``QAT epoch k``, numbered as the per-epoch log lines are."""
    if progress.phase == "float":
        return f"float epoch {progress.epoch + 1}"
    if progress.phase == "tune":
        return "the fill's weight training"
    return f"QAT epoch {progress.epoch + 1 - setup.qat_epochs.start}"


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(images, labels)`` minibatches in a seeded, deterministic order.

    The permutation comes from ``np.random.default_rng((seed, epoch))``, so the same
    ``(seed, epoch)`` always gives the same batches and each epoch gets its own order.

    Args:
        images: Array whose first axis indexes examples.
        labels: Array with the same first-axis length as ``images``.
        batch_size: Examples per batch (positive).
        seed: Non-negative integer seed.
        epoch: Non-negative epoch number, mixed into the seed.
        shuffle: If False, keep the original order (``seed``/``epoch`` are then unused).
        drop_last: Drop the final batch if it is smaller than ``batch_size``.

    Returns:
        An iterator over ``(images_batch, labels_batch)`` pairs (copies, not views).

    Raises:
        ValueError: Bad ``batch_size``, ``seed``, ``epoch`` or mismatched lengths.

    Example:
        >>> x, y = np.arange(10).reshape(10, 1), np.arange(10)
        >>> [b[1].tolist() for b in batches(x, y, 4, seed=0, shuffle=False)]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"images and labels differ in length: {n} vs {len(labels)}")
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(seed) != seed or seed < 0 or int(epoch) != epoch or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got {seed!r}, {epoch!r}")
    batch_size = int(batch_size)
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield images[idx], labels[idx]

    return generate()


def _train_epoch(
    state, train_step, setup, split, progress, *, desc, should_stop, save, timings, first
):
    """Train the rest of ``progress.epoch``; return the state and every loss of the epoch.

    After each step ``should_stop()`` is asked; if true, the state so far is saved with
    ``save(state, progress)`` (mid-epoch) and :class:`Interrupted` is raised. With
    ``first``, the first step (which compiles the step) is timed as ``timings["compile"]``.
    """
    config = setup.config
    order = batches(*split, config.batch_size, seed=config.seed, epoch=progress.epoch)
    order = itertools.islice(order, progress.step, None)
    losses = []
    synchronous = setup.placement.synchronous
    bar = tqdm(
        order,
        total=setup.steps_per_epoch,
        initial=progress.step,
        desc=f"{desc} {progress.epoch + 1}",
        leave=False,
    )
    for i, (x, y) in enumerate(bar, progress.step + 1):
        if first:
            started = time.perf_counter()
            state, loss = jax.block_until_ready(train_step(state, *setup.placement.put_batch(x, y)))
            timings["compile"] += time.perf_counter() - started
            first = False
        else:
            state, loss = train_step(state, *setup.placement.put_batch(x, y))
            if synchronous:  # see parallel.steps_must_not_overlap
                jax.block_until_ready(state)
        losses.append(loss)
        if should_stop() and i < setup.steps_per_epoch:
            bar.close()
            progress.step = i
            progress.losses += [float(v) for v in parallel.local_copy(losses)]
            saved = save(state, progress)
            raise Interrupted(f"{_epoch_name(setup, progress)}, batch {i}", saved)
    return state, progress.losses + [float(v) for v in parallel.local_copy(losses)]


def _check_finite(setup: _Setup, progress: _Progress, losses: list[float], params) -> None:
    """Raise :class:`TrainingDiverged` at a non-finite loss or parameter (names both)."""
    bad_step = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    finite = jax.tree.map(lambda x: np.all(np.isfinite(x)), parallel.local_copy(params))
    bad_leaves = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]
        if not ok
    ]
    if bad_step is None and not bad_leaves:
        return
    where = _epoch_name(setup, progress)
    parts = []
    if bad_step is not None:
        parts.append(f"the loss became {losses[bad_step]} at batch {bad_step + 1} of {where}")
    if bad_leaves:
        shown = ", ".join(bad_leaves[:3]) + (" ..." if len(bad_leaves) > 3 else "")
        parts.append(f"non-finite parameters after {where}: {shown}")
    raise TrainingDiverged(
        "training diverged: " + "; ".join(parts) + "; nothing certified. Lower --lr or "
        "--quantizer_lr."
    )


def _evaluate_float(setup, state, progress, loss, split, accuracy_fn, log) -> dict:
    accuracy = accuracy_fn(state.params, *split, batch_stats=getattr(state, "batch_stats", None))
    log(f"float epoch {progress.epoch + 1}: loss {loss:.4f}  val acc {100 * accuracy:.2f}%")
    return {"epoch": progress.epoch + 1, "phase": "float", "loss": loss, "val_accuracy": accuracy}


def _evaluate_qat(setup, state, progress, loss, split, accuracy_fn, log) -> dict:
    accuracy = accuracy_fn(state.params, *split)
    costs = cost.exact_costs(state.params, setup.specs)
    bops = costs["bops"]
    limits = {} if setup.budget is None else certify.limits_of(setup.budget)
    feasible = all(costs[name] <= limit for name, limit in limits.items())
    row = {
        "epoch": progress.epoch + 1,
        "phase": "qat",
        "loss": loss,
        "val_accuracy": accuracy,
        "bops": bops,
        "relative_bops_percent": cost.relative_bops(bops, setup.specs),
        "within_budget": feasible,
    }
    if set(limits) - {"bops"}:
        row["weight_memory_bits"] = costs["weight_memory_bits"]
        row["activation_bits"] = costs["activation_bits"]
    constrained = _constraint_state(state.opt_state)
    if constrained is not None:
        steps = constrained.infeasible_steps
        row["infeasible_steps"] = int(sum(jax.tree.leaves(steps)))
        if isinstance(steps, dict):
            row["infeasible_steps_by_limit"] = {k: int(v) for k, v in steps.items()}
        row["guard_steps"] = int(constrained.guard_steps)
    verdict = "" if setup.budget is None else ("  within budget" if feasible else "  OVER budget")
    log(
        f"QAT epoch {progress.epoch + 1 - setup.config.pretrain_epochs}: loss {loss:.4f}  "
        f"val acc {100 * accuracy:.2f}%  BOPs {bops:,} "
        f"({row['relative_bops_percent']:.3f}% of 32-bit){verdict}"
    )
    return row


def _stop_never() -> bool:
    return False


def fit(
    config: TrainConfig,
    dataset: data.MnistData,
    *,
    log=tqdm.write,
    float_params=None,
    checkpointer=None,
    resume: bool = False,
    checkpoint_meta: dict | None = None,
    should_stop=_stop_never,
) -> FitResult:
    """Run the whole protocol and return a certified result.

    The run is a sequence of epochs (float pretraining, then QAT); after each epoch the
    full training state is checkpointed (when ``checkpointer`` is given), so that
    ``resume=True`` continues from the last checkpoint and ends bit for bit where the
    uninterrupted run would have.

    Args:
      config: the run's settings.
      dataset: train / validation / test splits (:func:`cgmq_jax.data.load_mnist`).
      log: where the per-epoch lines go.
      float_params: a pretrained float checkpoint (e.g. the ``params`` of a ``float``
        run's result); pretraining is skipped when given. For a model with BatchNorm it is
        the float network's variables ``{"params": ..., "batch_stats": ...}`` (what a float
        run of it returns), folded before QAT.
      checkpointer: a :class:`cgmq_jax.checkpoint.Checkpointer`, or None for no checkpoints.
      resume: continue from ``checkpointer``'s latest checkpoint (from the start if none).
      checkpoint_meta: extra JSON stored in every checkpoint (e.g. the CLI's flags).
      should_stop: asked after every step; when it returns true, the state is checkpointed
        mid-epoch and :class:`Interrupted` is raised (see :func:`stop_on_sigint`).

    Raises:
      ValueError: a bad config, or a dataset that cannot train one step.
      certify.InfeasibleBudgetError: before any training, if the budget is below the
        network's minimum cost (the message states both numbers).
      TrainingDiverged: a non-finite loss or parameter; nothing is certified.
      Interrupted: ``should_stop()`` returned true.
    """
    started = time.perf_counter()
    setup = _make_setup(config, dataset, pretrained=float_params is not None)
    key = jax.random.key(config.seed)
    train, validation = dataset.train, dataset.validation
    sample = jnp.asarray(train[0][:2])
    if float_params is None:
        variables = jax.jit(setup.float_model.init)(key, sample)
        variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    else:
        variables = _float_variables_of(setup, float_params, sample)
    calibration = _calibration_batch(setup, train[0])

    progress = _Progress(epoch=setup.float_epochs.start if setup.float_epochs else 0)
    state, best_params = _float_state(setup, variables), None
    if not setup.float_epochs and config.method != "float":
        progress = _Progress(phase="qat", epoch=setup.qat_epochs.start)
        state = _qat_state(setup, variables, calibration)
    if resume and checkpointer is not None:
        restored = _restore(setup, checkpointer, state, variables, calibration)
        if restored is not None:
            state, progress, best_params = restored
            log(
                f"resumed from the checkpoint at {_epoch_name(setup, progress)}, "
                f"batch {progress.step}"
            )

    placement = setup.placement
    state = placement.replicate(state)
    timings = {"compile": 0.0, "train": 0.0, "evaluate": 0.0}

    def save(state, progress) -> bool:
        if checkpointer is None:
            return False
        elapsed = progress.seconds + time.perf_counter() - started
        body = {
            "progress": {**dataclasses.asdict(progress), "seconds": elapsed},
            "position": f"{_epoch_name(setup, progress)}, batch {progress.step}",
        }
        index = progress.epoch * setup.steps_per_epoch + progress.step
        arrays = parallel.local_copy(_checkpoint_arrays(state, best_params))
        checkpointer.save(index, arrays, {**(checkpoint_meta or {}), **body})
        return True

    phases = (
        (
            "float",
            setup.float_epochs,
            setup.float_model,
            make_train_step(setup.float_model, placement=placement, donate=True),
            _evaluate_float,
        ),
        ("qat", setup.qat_epochs, setup.model, None, _evaluate_qat),
    )
    for phase, epochs, model, train_step, evaluate in phases:
        if progress.phase != phase:
            continue
        accuracy_fn = make_accuracy(model)
        if train_step is None:
            train_step = make_train_step(model, _qat_loss(setup), placement=placement, donate=True)
        first = True
        for epoch in range(progress.epoch, epochs.stop):
            progress.epoch = epoch
            epoch_started, compiling = time.perf_counter(), timings["compile"]
            state, losses = _train_epoch(
                state,
                train_step,
                setup,
                train,
                progress,
                desc=phase,
                should_stop=should_stop,
                save=save,
                timings=timings,
                first=first,
            )
            first = False
            _check_finite(setup, progress, losses, state.params)
            loss = float(np.mean(np.asarray(losses, np.float32)))
            evaluate_started = time.perf_counter()
            timings["train"] += evaluate_started - epoch_started - (timings["compile"] - compiling)
            row = evaluate(
                setup, parallel.local_copy(state), progress, loss, validation, accuracy_fn, log
            )
            timings["evaluate"] += time.perf_counter() - evaluate_started
            progress.history.append(row)
            if (
                phase == "qat"
                and row["within_budget"]
                and row["val_accuracy"] > progress.best_val_accuracy
            ):
                progress.best_val_accuracy, progress.best_epoch = row["val_accuracy"], epoch + 1
                best_params = parallel.local_copy(state.params)
            progress.epoch, progress.step, progress.losses = epoch + 1, 0, []
            save(state, progress)
        if phase == "float" and config.method != "float":
            progress = dataclasses.replace(progress, phase="qat", epoch=setup.qat_epochs.start)
            state = _qat_state(setup, parallel.local_copy(_float_variables(state)), calibration)
            state = placement.replicate(state)
    state = parallel.local_copy(state)
    if config.method == "float":
        result = _finish_float(setup, _float_variables(state), progress.history, dataset)
    else:
        tune = functools.partial(
            _tune_weights,
            setup,
            train,
            should_stop=should_stop,
            saved=checkpointer is not None,
            timings=timings,
        )
        result = _finish_qat(setup, state.params, best_params, progress, dataset, log, tune)
    result.wall_seconds = progress.seconds + time.perf_counter() - started
    other = time.perf_counter() - started - sum(timings.values())
    result.timings = {**timings, "other": other}
    return result


def _restore(setup: _Setup, checkpointer, state, variables, calibration):
    """``(state, progress, best_params)`` from the latest checkpoint, or None if there is none.

    ``state`` is the fresh state of the run's first phase (``variables`` the float
    network's); a QAT checkpoint of a run that pretrains is restored into the QAT state's
    structure (built abstractly, no compute). A float checkpoint of a model with BatchNorm
    holds its ``batch_stats`` too.
    """
    meta = checkpointer.latest_meta()
    if meta is None:
        return None
    progress = _Progress(**meta["progress"])
    if progress.phase == "qat" and setup.float_epochs:  # ``state`` is the float one
        state = jax.eval_shape(lambda v: _qat_state(setup, v, calibration), variables)
    like = jax.eval_shape(lambda s: _checkpoint_arrays(s, None), state)
    arrays = checkpointer.restore_arrays(like)
    state = state.replace(
        params=arrays["params"], opt_state=arrays["opt_state"], step=arrays["step"]
    )
    if "batch_stats" in arrays:
        state = state.replace(batch_stats=arrays["batch_stats"])
    best_params = arrays["best_params"] if progress.best_epoch is not None else None
    return state, progress, best_params


def _finish_qat(setup, last_params, best_params, progress, dataset, log, tune) -> FitResult:
    """The best feasible checkpoint, or the last one repaired (cgmq); filled; certified."""
    config, specs, budget = setup.config, setup.specs, setup.budget
    repaired_bits = 0
    if best_params is not None:
        params = jax.device_get(best_params)
    else:
        # dq keeps its last epoch when no epoch was feasible (as DQ's code does); cgmq repairs.
        params = jax.device_get(last_params)
        if config.method == "cgmq":
            params, repaired_bits = certify.greedy_repair(params, specs, budget)
            log(f"no feasible checkpoint: greedy repair removed {repaired_bits} bits")
    fill = None
    if config.method == "cgmq":
        params, fill = _fill(setup, params, dataset.validation, log, tune)
        certificate = certify.certify(params, specs, budget)
    else:  # dq and fixed are reported as they are: meeting the budget is their problem
        certificate = certify.cost_report(params, specs, budget)
    certificate["selected_epoch"] = progress.best_epoch
    certificate["repaired_bits"] = repaired_bits
    certificate["fill"] = fill
    return FitResult(
        config=config,
        params=params,
        history=progress.history,
        test_accuracy=make_accuracy(setup.model)(params, *dataset.test),
        certificate=certificate,
        wall_seconds=0.0,  # set by fit
        data_source=dataset.source,
        specs=specs,
    )


#: The filled network's weights are trained (bits frozen) from ``lr`` times this,
#: cosine-decayed to zero over ``TrainConfig.fill_epochs``.
FILL_LR_SCALE = 0.1


def _fill(setup, params, validation, log, tune):
    """Give the bits that still fit to ``params``, train the weights to them, keep the best.

    :func:`cgmq_jax.certify.greedy_fill` adds bits until no single bit fits; the network
    was not trained with them, and they can break it (Fashion-MNIST LeNet-5 at 2e6: 8 bits
    took validation accuracy from 82.88% to 46.16%), so the filled network's weights are
    then trained for ``config.fill_epochs`` with every quantizer frozen (its bits and cost
    do not move; none with 0). Of the three (filled and trained, filled, as trained) the
    one with the best validation accuracy is returned, ties to the first: the budget is
    used wherever that costs no validation accuracy.

    Returns:
      ``(params, record)``: ``record`` holds the bits added, the three validation
      accuracies (``val_accuracy_before``, ``_filled``, ``_after``: tuned) and ``kept``
      (whether the returned network has the bits).
    """
    accuracy = make_accuracy(setup.model)
    before = accuracy(params, *validation)
    filled_params, filled = certify.greedy_fill(params, setup.specs, setup.budget)
    record = {"bits": filled, "val_accuracy_before": before, "tune_epochs": 0}
    if not filled:
        record.update(
            val_accuracy_filled=before, val_accuracy_after=before, kept=False, tuned=False
        )
        return params, record
    filled_accuracy = accuracy(filled_params, *validation)
    epochs = setup.config.fill_epochs
    tuned_params, diverged = tune(filled_params) if epochs else (None, None)
    if diverged:  # never lose the run for it: the other two remain
        log(f"the fill's weight training is dropped: {diverged}")
    tuned_accuracy = -1.0 if tuned_params is None else accuracy(tuned_params, *validation)
    candidates = [(tuned_accuracy, tuned_params), (filled_accuracy, filled_params)]
    candidates.append((before, params))
    best = max(range(3), key=lambda i: (candidates[i][0], -i))
    record.update(
        val_accuracy_filled=filled_accuracy,
        val_accuracy_after=tuned_accuracy if epochs else filled_accuracy,
        tune_epochs=epochs,
        kept=best < 2,
        tuned=best == 0,
    )
    trained = f" -> {100 * tuned_accuracy:.2f}% after {epochs} epoch(s) of weight training"
    log(
        f"{filled} more bit(s) fit in the budget: validation accuracy "
        f"{100 * before:.2f}% -> {100 * filled_accuracy:.2f}% filled"
        + (trained if epochs else "")
        + "; kept: "
        + ("filled and trained", "filled", "the network as trained (no bits added)")[best]
    )
    return candidates[best][1], record


def _tune_weights(setup, train, params, *, should_stop, saved, timings):
    """``params``' weights trained for ``config.fill_epochs``, every quantizer frozen.

    Adam from ``lr * FILL_LR_SCALE``, cosine-decayed to zero; the loss is the task's
    (cross-entropy). The batches of epoch ``qat_epochs.stop + k`` (an order no QAT epoch
    used). Not checkpointed: an interrupted run resumes from its last QAT epoch and tunes
    again, to the same result.

    Returns:
      ``(params, None)``, or ``(None, why)`` if the training diverged.
    """
    epochs = setup.config.fill_epochs
    schedule = optax.cosine_decay_schedule(
        setup.config.lr * FILL_LR_SCALE, epochs * setup.steps_per_epoch
    )
    tx = optax.partition(
        {"weight": optax.adam(schedule), "quantizer": optax.set_to_zero()},
        quantizer.param_labels,
    )
    state = train_state.TrainState.create(apply_fn=setup.model.apply, params=params, tx=tx)
    state = setup.placement.replicate(state)
    train_step = make_train_step(setup.model, placement=setup.placement, donate=True)
    for k in range(epochs):
        progress = _Progress(phase="tune", epoch=setup.qat_epochs.stop + k)
        state, losses = _train_epoch(
            state,
            train_step,
            setup,
            train,
            progress,
            desc="tune",
            should_stop=should_stop,
            save=lambda *_: saved,
            timings=timings,
            first=k == 0,
        )
        try:
            _check_finite(setup, progress, losses, state.params)
        except TrainingDiverged as error:
            return None, str(error)
    return jax.device_get(parallel.local_copy(state.params)), None


def _constraint_state(opt_state):
    for leaf in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, constraint.ConstrainedUpdateState)
    ):
        if isinstance(leaf, constraint.ConstrainedUpdateState):
            return leaf
    return None


def _finish_float(setup, variables, history, dataset) -> FitResult:
    """A float run: its params, or (a model with BatchNorm) its variables, as ``params``."""
    variables = jax.device_get(variables)
    params = variables if "batch_stats" in variables else variables["params"]
    certificate = certify.cost_report(None, setup.specs, setup.config.limits or None)
    certificate.update(selected_epoch=setup.config.epochs, repaired_bits=0)
    return FitResult(
        config=setup.config,
        params=params,
        history=history,
        test_accuracy=make_accuracy(setup.float_model)(
            variables["params"], *dataset.test, batch_stats=variables.get("batch_stats")
        ),
        certificate=certificate,
        wall_seconds=0.0,  # set by fit
        data_source=dataset.source,
        specs=setup.specs,
    )


class StopFlag:
    """A flag set by the first SIGINT (Ctrl-C); a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def stop_on_sigint():
    """Within the block, Ctrl-C asks :func:`fit` to checkpoint and stop after the current
    step (pass the yielded flag as ``should_stop``); a second Ctrl-C raises at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag.requested = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
