"""What a run is built from: the checked config and data, the models and the layer specs
(:class:`_Setup`), the first states of both phases with their optimizers, and the QAT loss.

The limits reach the guard in one way: the config's flags become ``{cost name: limit}``
(:attr:`TrainConfig.limits`, by :func:`cgmq_jax.limits.limits_from_flags`); their
feasibility is checked once, before any data is loaded (:func:`check_config`, by
:func:`cgmq_jax.limits.check_budget`); :func:`guard_constraints` hands them to the
optimizer (whose own check at ``init``, for users of the optimizer alone, then passes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from cgmq_jax import cost, data, models, optimizers, quantizer
from cgmq_jax.calibration import init_quantizers
from cgmq_jax.limits import InfeasibleBudgetError, check_budget
from cgmq_jax.runs import parallel
from cgmq_jax.runs.config import TrainConfig
from cgmq_jax.runs.steps import BatchNormTrainState, _cross_entropy, dq_penalty, make_train_step


def check_config(
    config: TrainConfig, input_shape: tuple[int, ...] = (28, 28, 1)
) -> tuple[cost.LayerSpec, ...]:
    """Validate a config before any data is loaded; return the model's layer specs.

    Raises:
      ValueError: a bad flag value, a budget that is not a positive finite number, or more
        devices than there are.
      InfeasibleBudgetError: the budget is below the network's minimum cost.
    """
    config.validate()
    parallel.data_parallel_mesh(config.devices)  # as many devices as asked for
    specs = _named_model_specs(
        config.model, config.input_bits, tuple(input_shape), config.prune
    )
    if config.guarded_limits:
        try:
            check_budget(config.guarded_limits, specs)
        except InfeasibleBudgetError as error:
            hint = _with_pruning(config, input_shape)
            raise InfeasibleBudgetError(f"{error}{hint}") from None
    return specs


def _with_pruning(config: TrainConfig, input_shape) -> str:
    """For an infeasible run that could prune but does not: what ``--prune`` allows."""
    if config.prune or config.method != "cgmq" or not hasattr(models.MODELS[config.model], "prune"):
        return ""
    specs = _named_model_specs(config.model, config.input_bits, tuple(input_shape), True)
    minimum = cost.min_costs(specs)
    if any(limit < minimum[name] for name, limit in config.guarded_limits.items()):
        return ""
    return f" (or add --prune: channels at 0 bits; its minimum BOPs is {minimum['bops']:,})"


@functools.lru_cache(maxsize=32)
def _named_model_specs(
    name: str, input_bits: int | None, input_shape: tuple[int, ...], prune: bool = False
) -> tuple[cost.LayerSpec, ...]:
    """A named model's layer specs, traced once per process (a sweep checks every config
    before it trains any; the specs of our own models depend on these four facts only)."""
    model = models.get_model(name, quantized=True, input_bits=input_bits, prune=prune)
    return cost.layer_specs(model, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))


def _lams(config: TrainConfig, limits: dict) -> dict:
    """DQ's penalty weight per limit: ``lam``, or the limit's own (``lam_weight``...)."""
    own = {"weight_memory_bits": config.lam_weight, "activation_bits": config.lam_activation}
    return {name: config.lam if own.get(name) is None else own[name] for name in limits}


def guard_constraints(limits: dict, specs: tuple[cost.LayerSpec, ...]) -> tuple[Any, Any]:
    """``(cost_fn, budget)`` for :func:`cgmq_jax.optimizers.cgmq_optimizer` from
    ``{cost name: limit}``: ``({name: (cost function, limit)}, None)``, one constraint per
    limit; a lone BOP limit is the plain pair ``(bops, limit)``, 0.1.0's path (its optimizer
    state holds scalars, so its runs and checkpoints are unchanged)."""
    if list(limits) == ["bops"]:
        return functools.partial(cost.bops, specs=specs), limits["bops"]
    functions = cost.cost_functions(specs)
    return {name: (functions[name], limit) for name, limit in limits.items()}, None


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
    def limits(self) -> dict:
        """``{cost name: limit}`` that the method trains under (``{}``: fixed, float)."""
        return self.config.guarded_limits


def _make_setup(config: TrainConfig, dataset: data.MnistData, *, pretrained: bool) -> _Setup:
    check_dataset(config, dataset)
    specs = check_config(config, dataset.train[0].shape[1:])
    model = models.get_model(
        config.model, quantized=True, input_bits=config.input_bits, prune=config.prune
    )
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
    first state, as ``fit`` builds them (float network at its random init; for QAT,
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
    step = make_train_step(
        model,
        loss_fn,
        placement=setup.placement,
        donate=donate,
        compiler_options=setup.config.compiler_options,
        microbatches=setup.config.microbatches,
    )
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
    before it first (by :func:`cgmq_jax.calibration.init_quantizers`, given the variables with
    their ``batch_stats``: the public way a user's own model takes too), so the quantizers
    are calibrated on, and quantize, the folded weights.
    """
    config = setup.config
    if config.method == "fixed":
        bits = {"input_bits": config.bits_a, "weight_bits": config.bits_w}
    else:
        bits = {"input_bits": config.init_bits, "weight_bits": config.init_bits}
    float_params = variables if "batch_stats" in variables else variables["params"]
    params = init_quantizers(setup.model, float_params, calibration, **bits)
    steps = max(len(setup.qat_epochs) * setup.steps_per_epoch, 1)
    learning_rate = optax.cosine_decay_schedule(config.lr, steps)
    quantizer_lr = config.quantizer_lr
    if config.quantizer_lr_decay:
        quantizer_lr = optax.cosine_decay_schedule(quantizer_lr, steps)
    if config.method == "cgmq":
        cost_fn, budget = guard_constraints(setup.limits, setup.specs)
        warmup = config.budget_warmup(cost.min_cost(setup.specs))
        if warmup:
            budget = _budget_warmup(setup, budget, warmup)
        tx = optimizers.cgmq_optimizer(
            cost_fn,
            budget,
            learning_rate=learning_rate,
            quantizer_learning_rate=quantizer_lr,
            rescale=config.rescale,
            admission=config.admission,
            refit_weight_ranges=config.refits,
            prunable=cost.prunable_quantizers(setup.specs),
            move_at_floor=config.move_at_floor,
        )
    else:
        tx = optimizers.partitioned_adam(learning_rate, quantizer_lr)
        if config.method == "fixed":
            tx = optax.chain(tx, optimizers.fixed_bitwidths())
    return train_state.TrainState.create(apply_fn=setup.model.apply, params=params, tx=tx)


def _budget_warmup(setup: _Setup, budget: float, epochs: float):
    """``--budget_warmup_epochs``: the BOP budget as a schedule, lowered geometrically (an
    equal share of the way in log-cost per step) from the network's exact cost at its
    initial bits to ``budget`` over the first ``epochs`` QAT epochs' steps, ``budget`` after.

    That cost is counted from the specs (:func:`cgmq_jax.cost.costs_at`), not from
    ``params``: a resumed run builds its QAT state abstractly, with no values to count."""
    config = setup.config
    start = float(cost.costs_at(setup.specs, config.init_bits, config.init_bits)["bops"])
    if start <= budget:
        return budget
    steps = max(round(epochs * setup.steps_per_epoch), 1)
    return optax.exponential_decay(start, steps, budget / start, end_value=budget)


def _qat_loss(setup: _Setup):
    config, model = setup.config, setup.model
    if config.method == "dq":

        def loss_fn(params, images, labels):
            # Traced in this order (cross-entropy, then the penalty) as in 0.1.0, so that the
            # gradient sums, and the runs, stay bit for bit those of the last release.
            return _cross_entropy(model, params, images, labels) + dq_penalty(
                params, setup.specs, setup.limits, _lams(config, setup.limits)
            )

    elif config.method == "fixed":  # the range follows the step: the loss sees the tie

        def loss_fn(params, images, labels):
            return _cross_entropy(model, quantizer.tie_ranges(params), images, labels)

    else:
        loss_fn = functools.partial(_cross_entropy, model)
    return loss_fn
