"""``constrained_update``: CGMQ's budget constraint as an optax gradient transformation.

This is Constraint Guided Gradient Descent (Van Baelen & Karsmakers) applied to the
quantizer parameters, made exact for the integer BOP cost (docs/method.md section 3).

What a step then does to the quantizers' ranges (at least one level kept, a lost bit's
weight range refitted) is :mod:`cgmq_jax.step_ranges`'s; its names resolve here too
(``cgmq_jax.constraint.refit_lost_weight_ranges``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgmq_jax import _deprecated, quantizer
from cgmq_jax import admission as admission_rules
from cgmq_jax import cost as cost_module
from cgmq_jax.step_ranges import _keep_levels, refit_lost_weight_ranges

#: The optax chains built on the constraint moved to :mod:`cgmq_jax.optimizers`; the old
#: names still resolve there, with a warning.
_MOVED = dict.fromkeys(
    ("fixed_bitwidths", "partitioned_adam", "cgmq_optimizer"), "cgmq_jax.optimizers"
)


__getattr__ = _deprecated.moved("cgmq_jax.constraint", _MOVED)

#: The public names, in the API reference's order (``refit_lost_weight_ranges`` from
#: :mod:`cgmq_jax.step_ranges`).
__all__ = [
    "DEFAULT_RESCALE",
    "DEFAULT_MIN_SCALE",
    "ConstrainedUpdateState",
    "constrained_update",
    "refit_lost_weight_ranges",
]

DEFAULT_RESCALE = 1.5
# Smallest CGGD scale s while infeasible, in log2 units (the step is at least rescale * s,
# and at least the length that loses a bit, whichever is longer).
DEFAULT_MIN_SCALE = 1e-2
# Weights of [log2 d, log2 q_max] in g (NumPy: importing must not start a JAX backend,
# so that jax.distributed.initialize can still come after ``import cgmq_jax``).
_STEP_ONLY = np.array([1.0, 0.0], np.float32)
# How far past a rounding boundary of log2 d the bit-losing step lands, in log2 units: far
# above float32 error in exp2/log2 (about 1e-6 here), far below a power-of-two step (1.0).
_PAST_THE_BOUNDARY = 2.0**-10


class ConstrainedUpdateState(NamedTuple):
    """State of :func:`constrained_update`."""

    cost: jax.Array  # exact cost (BOPs) of the params the last update was computed at
    infeasible_steps: jax.Array  # int32: steps taken while the cost was over budget
    guard_steps: jax.Array  # int32: feasible steps whose whole proposal would break a limit
    scale_floor: jax.Array  # largest quantizer-update norm seen; keeps the constraint alive
    # Per quantizer leaf, a running mean of dL/d log2 d: what a bit is worth to the loss,
    # weighed by the guard's trades (cgmq_jax.admission.bit_values).
    bit_value: jax.Array = None


def _cost_raising(updates: optax.Updates, is_quantizer) -> optax.Updates:
    """Boolean tree: quantizer components that could add bits (d down, or q_max up)."""
    sign = jnp.asarray(quantizer.COST_RAISING_SIGN, jnp.float32)
    return jax.tree.map(
        lambda u, q: (u * jnp.broadcast_to(sign, jnp.shape(u)) > 0)
        if q
        else jnp.zeros(jnp.shape(u), bool),
        updates,
        is_quantizer,
    )


def _zero_where(updates, mask):
    return jax.tree.map(lambda u, m: jnp.where(m, jnp.zeros_like(u), u), updates, mask)


def _quantizer_norm(tree, is_quantizer) -> jax.Array:
    return optax.tree.norm(
        jax.tree.map(lambda t, q: t if q else jnp.zeros_like(t), tree, is_quantizer)
    )


def _concrete(value) -> float | None:
    """``value`` as a Python float, or None while it is traced (under ``jit``, ``eval_shape``)."""
    try:
        return float(value)
    except jax.errors.ConcretizationTypeError:
        return None


def _check_hyperparameter(value, name: str, is_valid, message: str) -> None:
    """A Python number is checked now; a JAX scalar (``optax.inject_hyperparams`` passes them)
    is checked when concrete and must be a numeric scalar; a traced one passes as it is."""
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        dtype = np.dtype(value.dtype)
        if np.ndim(value) != 0 or dtype == np.bool_ or not np.issubdtype(dtype, np.number):
            raise TypeError(
                f"{name} must be a number or a numeric JAX scalar, got an array of shape "
                f"{np.shape(value)} and dtype {dtype}"
            )
        value = _concrete(value)
        if value is None:
            return
    elif name == "budget":
        cost_module.validate_budget(value)  # raises TypeError for what is not a number
    if not (isinstance(value, int | float) and not isinstance(value, bool) and is_valid(value)):
        raise ValueError(message.format(value=value))


def _constraints(cost_fn, budget) -> tuple[list[str] | None, list[tuple[Callable, Any]]]:
    """``(names, [(cost_fn, budget), ...])``; ``names`` is None for one plain constraint."""
    if callable(cost_fn):
        if budget is None:
            raise TypeError("constrained_update(cost_fn, budget): the budget is missing")
        return None, [(cost_fn, budget)]
    if budget is not None:
        raise TypeError(
            "with several constraints, give each its budget: constrained_update({'bops': "
            "(bops_fn, 2e6), 'weight_memory_bits': (w_fn, 65536)}), not a separate budget"
        )
    if isinstance(cost_fn, Mapping):
        names, pairs = [str(k) for k in cost_fn], list(cost_fn.values())
    elif isinstance(cost_fn, Sequence) and not isinstance(cost_fn, str):
        pairs = list(cost_fn)
        names = [str(i) for i in range(len(pairs))]
    else:
        raise TypeError(
            "constrained_update takes cost_fn and budget, or a mapping / sequence of "
            f"(cost_fn, budget) pairs; got {type(cost_fn).__name__}"
        )
    if not pairs:
        raise ValueError("constrained_update needs at least one constraint")
    checked = []
    for name, pair in zip(names, pairs, strict=True):
        if not (isinstance(pair, Sequence) and len(pair) == 2 and callable(pair[0])):
            raise TypeError(f"constraint {name!r} must be a (cost_fn, budget) pair, got {pair!r}")
        checked.append((pair[0], pair[1]))
    return names, checked


def constrained_update(
    cost_fn: Callable[[optax.Params], jax.Array]
    | Mapping[str, tuple[Callable[[optax.Params], jax.Array], Any]]
    | Sequence[tuple[Callable[[optax.Params], jax.Array], Any]],
    budget: float | jax.typing.ArrayLike | None = None,
    *,
    rescale: float = DEFAULT_RESCALE,
    min_scale: float = DEFAULT_MIN_SCALE,
    is_quantizer: Callable[[Any], Any] | None = None,
    admission: str = "all_or_nothing",
    refit_weight_ranges: bool = False,
    prunable: Callable[[Any], Any] | None = None,
    move_at_floor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Keep a quantized network's cost within ``budget``, CGGD-style, with no penalty weight.

    Put it last in a chain, after the optimizer (it rewrites the *updates* it is given):
    ``optax.chain(optax.adam(1e-3), constrained_update(cost_fn, budget))``, or let
    :func:`cgmq_optimizer` build the recommended chain.

    Weight updates always pass through untouched. For the quantizer updates
    (leaves ``[log2 d, log2 q_max]``; *cost-raising* components decrease ``d`` or increase
    ``q_max``, the only changes that can add bits):

    * feasible, and the exact cost after the proposed update is still within budget:
      pass through;
    * feasible, but the proposed update would leave the budget (the *guard*): with
      ``admission="all_or_nothing"`` (the default) the cost-raising components are set
      to zero, so the cost cannot rise. With ``admission="gain"`` each quantizer's
      cost-raising components form one candidate move: moves that add no cost pass, the
      others are admitted in order of expected loss gain per unit of the room they take,
      each only if the exact cost with it stays within every limit, and a refused move
      may take a bit from the quantizer where it is worth least per unit of cost
      (:func:`cgmq_jax.admission.by_gain`; the gain is ``-g . r``, ``g`` the loss
      gradient passed as ``tx.update(updates, state, params, loss_grads=grads)``, or the
      incoming update standing in for ``-g``). Measured on LeNet-5 at 2e6 BOPs it filled
      99.9% of the budget but was 0.33 points worse (docs/method.md section 3);
    * infeasible: the cost-raising components are set to zero and the constraint direction
      ``-L * g / ||g||`` is added, with ``g`` the floor-aware gradient of ``cost_fn``
      w.r.t. the ``log2 d`` latents and the length ``L = max(rescale * s, L_bit)``:

      - ``s = max(||u_q||, s_floor)`` is CGGD's scale: the norm of the incoming quantizer
        update before masking, floored by ``s_floor``, the largest such norm seen so far
        and at least ``min_scale``. With ``rescale > 1`` the constraint term outweighs the
        loss term.
      - ``L_bit`` is the shortest step along ``-g`` after which some quantizer has lost a
        bit (:func:`cgmq_jax.quantizer.step_rise_to_lose_a_bit`, plus ``2**-10``). So
        every infeasible step lowers the exact cost, and a network reaches its budget in
        at most as many steps as it has bits above their minimum (65 for LeNet-5 at 8
        bits), whatever the learning rate. (With ``s`` alone, LeNet-5 from 8 bits to
        2e6 BOPs took 957 steps at a quantizer learning rate of 1e-4, 231 at 1e-2; now
        33 and 31.)

    Finally each quantizer's ``q_max`` is kept at least at its rounded step ``d_q``, so
    ``n >= 1`` holds without dragging ``d`` down (this never adds a bit).

    With ``refit_weight_ranges``, a weight quantizer (a ``weight_quantizer`` leaf next to
    its ``kernel``) that this update leaves with fewer bits (a channel of a per-channel
    one: that channel) gets, at its new bit-width, the range of least squared error on
    its updated kernel (:func:`cgmq_jax.quantizer.least_squares_latents`) instead of the
    range it had: the same bits, so the same exact cost (feasibility is untouched). The
    constraint coarsens the step and keeps the range, and at ``max|W|`` a 2-bit weight
    rounds most weights to zero; ``q_max`` learns only from clipped weights, of which
    there are none (docs/method.md section 10, the DS-CNN). Not for weight quantizers
    pinned by ``weight_bits=`` (their stored range is not their bit-width).

    Note the meaning of "mask" here: unlike ``optax.masked``, which lets masked leaves pass
    through unchanged, this transform *zeroes* the masked components.

    ``init`` evaluates ``cost_fn`` with every quantizer at its minimum bit-width
    (:func:`cgmq_jax.quantizer.at_min_bitwidth`) and raises
    :class:`cgmq_jax.limits.InfeasibleBudgetError` (a ``ValueError``) if the budget is
    below that minimum, which no training could reach. Under ``jax.jit`` or
    ``jax.eval_shape`` (traced params or budget) the check is skipped.

    The budget, ``rescale`` and ``min_scale`` may be JAX scalars, so that
    ``optax.inject_hyperparams(constrained_update, static_args="cost_fn")`` can change
    them during training (``state.hyperparams["budget"] = ...``); Python numbers are
    checked at once, JAX scalars when they are concrete. In the update the budget is
    compared with the float32 cost; a certificate (:func:`cgmq_jax.certify.certify`)
    compares the exact integer cost with a Python number.

    Args:
      cost_fn: ``params -> BOPs``, jittable, exact in value with a straight-through
        gradient, e.g. ``functools.partial(cgmq_jax.cost.bops, specs=specs)``.
      budget: the maximum BOPs per example, a positive finite number (or JAX scalar).
      rescale: CGGD's ``R``; must be > 1. The default 1.5 need not be tuned per budget.
      min_scale: the smallest ``s`` (in the log2 units of the latents), > 0.
      is_quantizer: ``params -> tree of bools`` marking quantizer leaves; by default
        leaves named ``*_quantizer`` (:func:`cgmq_jax.quantizer.param_labels`).
      admission: what the guard admits, ``"all_or_nothing"`` (the default) or
        ``"gain"`` (:mod:`cgmq_jax.admission`).
      refit_weight_ranges: a weight quantizer that loses bits gets the least-squares
        range of its new bit-width (above).
      prunable: ``params -> tree of bools`` marking the weight quantizers that may remove
        channels (layers with ``prune=True``; :func:`cgmq_jax.cost.prunable_quantizers`
        makes it from the layer specs). Their range may fall to ``d_q / 4`` (0 levels)
        instead of ``d_q``, and the minimum-cost check counts them removed. With
        ``admission`` ``"all_or_nothing"`` or ``"gain"`` (whose moves are priced with the
        exact costs, removed channels included), not ``"within_bits"``.
      move_at_floor: with ``admission="all_or_nothing"``, a guarded quantizer (channel)
        at its minimum bit-width moves as proposed where it stays at it
        (:func:`cgmq_jax.admission.floor_moves`): the refused finer-step components no
        longer ratchet its step up until it rounds every value to 0 (``"gain"`` and
        ``"within_bits"`` already pass such moves, so it is refused with them; prunable
        leaves keep the ratchet).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    Raises:
      TypeError: a budget that is not a number or a numeric scalar.
      ValueError: a budget that is not positive and finite, ``rescale <= 1``,
        ``min_scale <= 0``, ``move_at_floor`` with another admission; at ``init``, a
        budget below the minimum cost.

    Examples:
      >>> import functools, jax, optax
      >>> from cgmq_jax import constrained_update, cost, models
      >>> model = models.MLP()
      >>> x = jax.numpy.ones((1, 28, 28, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> specs = cost.layer_specs(model, x)
      >>> cost.exact_bops(params, specs)  # 8-bit everywhere: 266200 * 8 * 8
      17036800
      >>> tx = optax.chain(
      ...     optax.clip_by_global_norm(1.0),
      ...     optax.adam(1e-2),
      ...     constrained_update(functools.partial(cost.bops, specs=specs), budget=4e6),
      ... )
      >>> state = tx.init(params)
      >>> zero_loss = jax.tree.map(jax.numpy.zeros_like, params)
      >>> @jax.jit
      ... def step(params, state):
      ...     updates, state = tx.update(zero_loss, state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(50):
      ...     params, state = step(params, state)
      >>> cost.exact_bops(params, specs) <= 4e6
      True
      >>> int(state[-1].infeasible_steps) > 0
      True

      A budget below the network's minimum cost fails at ``init``:

      >>> tx = constrained_update(functools.partial(cost.bops, specs=specs), 1e5)
      >>> tx.init(params)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      cgmq_jax.limits.InfeasibleBudgetError: budget 100,000 BOPs is infeasible: ... 532,400 ...
    """
    names, constraints = _constraints(cost_fn, budget)
    _check_hyperparameters(names, constraints, rescale, min_scale)
    if admission not in admission_rules.ADMISSIONS:
        raise ValueError(
            f"admission must be one of {', '.join(map(repr, admission_rules.ADMISSIONS))}, "
            f"got {admission!r}"
        )
    if is_quantizer is None:
        is_quantizer = _default_is_quantizer
    if move_at_floor and admission != "all_or_nothing":
        raise ValueError(
            f"move_at_floor applies to admission='all_or_nothing' only ({admission!r} "
            "already lets a quantizer move where it gains no bit): drop it"
        )
    if prunable is not None and admission == "within_bits":
        raise ValueError(
            "prunable quantizers work with admission='all_or_nothing' or 'gain', not "
            "'within_bits' (it counts a removed channel's return to one level as no new bit)"
        )
    prunable_mask = _no_prunable if prunable is None else prunable

    def init_fn(params):
        _require_feasible_at_minimum(params, names, constraints, is_quantizer, prunable_mask)
        zeros = [jnp.zeros([], jnp.float32) for _ in constraints]
        count = sum(bool(q) for q in jax.tree.leaves(is_quantizer(params)))
        return ConstrainedUpdateState(
            cost=_pack(names, zeros),
            infeasible_steps=_pack(names, [jnp.zeros([], jnp.int32) for _ in constraints]),
            guard_steps=jnp.zeros([], jnp.int32),
            scale_floor=jnp.asarray(min_scale, jnp.float32),
            bit_value=jnp.zeros([count], jnp.float32),
        )

    def update_fn(updates, state, params=None, *, loss_grads=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "constrained_update needs the current params: call tx.update(updates, state, "
                "params)"
            )
        quantizer_mask, prunable_leaves = is_quantizer(params), prunable_mask(params)
        costs, grads, violated, breaks = _evaluate(constraints, params, updates)
        feasible, guard = _guard(violated, breaks)
        masked = _zero_where(updates, _cost_raising(updates, quantizer_mask))
        scale_floor = jnp.maximum(state.scale_floor, _quantizer_norm(updates, quantizer_mask))
        corrected = _infeasible_step(
            masked, params, grads, violated, quantizer_mask, rescale * scale_floor
        )
        admitted, bit_value = admission_rules.guarded(
            admission,
            updates,
            masked,
            guard,
            params=params,
            constraints=constraints,
            quantizer_mask=quantizer_mask,
            bit_value=state.bit_value,
            loss_grads=loss_grads,
            move_at_floor=move_at_floor,
            prunable_mask=prunable_leaves,
        )
        new_updates = _admit(admitted, corrected, feasible)
        new_updates = jax.tree.map(
            lambda u, p, q, r: _keep_levels(u, p, prune=r) if q else u,
            new_updates,
            params,
            quantizer_mask,
            prunable_leaves,
        )
        if refit_weight_ranges:
            new_updates = refit_lost_weight_ranges(new_updates, params, prunable_leaves)
        return new_updates, _next_state(state, names, costs, violated, guard, scale_floor)._replace(
            bit_value=bit_value
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _pack(names: list[str] | None, values: list):
    """One value per constraint: a scalar (one plain constraint), else a dict by name."""
    return values[0] if names is None else dict(zip(names, values, strict=True))


def _check_hyperparameters(names, constraints, rescale, min_scale) -> None:
    """Every budget positive and finite, ``rescale > 1``, ``min_scale > 0`` (when concrete)."""
    for name, (_, limit) in zip(names or ["budget"], constraints, strict=True):
        _check_hyperparameter(
            limit,
            "budget",
            lambda b: math.isfinite(b) and b > 0,
            f"the budget{'' if names is None else f' of {name!r}'} must be a positive finite "
            "number, got {value}",
        )
    _check_hyperparameter(
        rescale,
        "rescale",
        lambda r: math.isfinite(r) and r > 1,
        f"rescale (CGGD's R) must be a finite number > 1, got {{value}}; the default is "
        f"{DEFAULT_RESCALE}",
    )
    _check_hyperparameter(
        min_scale,
        "min_scale",
        lambda m: math.isfinite(m) and m > 0,
        "min_scale must be a positive finite number, got {value}",
    )


def _require_feasible_at_minimum(params, names, constraints, is_quantizer, prunable) -> None:
    """Raise :class:`cgmq_jax.limits.InfeasibleBudgetError` for a budget below its cost
    with every quantizer at its minimum bit-width (skipped while params or budget are traced).
    """
    from cgmq_jax.limits import require_feasible  # the error's home; loaded when checking

    at_minimum = jax.tree.map(
        lambda p, q, r: quantizer.at_min_bitwidth(p, prune=r) if q else p,
        params,
        is_quantizer(params),
        prunable(params),
    )
    for i, (fn, limit) in enumerate(constraints):
        minimum, concrete_budget = _concrete(fn(at_minimum)), _concrete(limit)
        if minimum is not None and concrete_budget is not None:
            name = None if names is None else names[i]
            require_feasible(concrete_budget, round(minimum), name=name)


def _evaluate(constraints, params, updates):
    """Per constraint: its cost and gradient at ``params``, whether it is violated now (a
    NaN cost is), and whether the proposed update would break it."""
    proposal = optax.apply_updates(params, updates)
    costs, grads, violated, breaks = [], [], [], []
    for fn, limit in constraints:
        value, grad = jax.value_and_grad(fn)(params)
        costs.append(value)
        grads.append(grad)
        violated.append(~(value <= limit))
        breaks.append(fn(proposal) > limit)
    return costs, grads, violated, breaks


def _guard(violated: list, breaks: list) -> tuple[jax.Array, jax.Array]:
    """``(feasible, guard)``: every constraint holds now; and it does, but the proposed
    update would break one (so its cost-raising components must not pass)."""
    feasible = ~jnp.any(jnp.stack(violated))
    return feasible, feasible & jnp.any(jnp.stack(breaks))


def _infeasible_step(masked, params, grads, violated, quantizer_mask, scaled_floor):
    """The infeasible update: ``masked`` (cost-raising components zeroed) plus, for each
    violated constraint, ``-L * g / ||g||`` on the step latents, with
    ``L = max(rescale * s, L_bit)`` (``scaled_floor`` is ``rescale * s``)."""
    corrected = masked
    for grad, is_violated in zip(grads, violated, strict=True):
        # The constraint moves the step latents only (measured: moving log2 q_max too, as
        # the plain cost gradient does, clipped ranges hard and cost a point of accuracy).
        grad = jax.tree.map(
            lambda g, q: g * np.broadcast_to(_STEP_ONLY, jnp.shape(g)) if q else jnp.zeros_like(g),
            grad,
            quantizer_mask,
        )
        direction_norm = jnp.maximum(optax.tree.norm(grad), 1e-30)
        length = jnp.maximum(
            scaled_floor, _length_to_lose_a_bit(params, grad, direction_norm, quantizer_mask)
        )
        step = jnp.where(is_violated, length / direction_norm, 0.0)
        corrected = jax.tree.map(
            lambda u, g, q, step=step: u - step * g if q else u, corrected, grad, quantizer_mask
        )
    return corrected


def _admit(admitted, corrected, feasible):
    """Which update passes: ``admitted`` (feasible: all of the proposal, or what the guard
    admits of it) or ``corrected`` (infeasible)."""
    return jax.tree.map(lambda a, c: jnp.where(feasible, a, c), admitted, corrected)


def _next_state(state, names, costs, violated, guard, scale_floor) -> ConstrainedUpdateState:
    """The state after an update computed at costs ``costs``."""
    old_steps = (  # by name: a dict through jax.jit comes back with its keys sorted
        [state.infeasible_steps]
        if names is None
        else [state.infeasible_steps[name] for name in names]
    )
    return ConstrainedUpdateState(
        cost=_pack(names, [c.astype(jnp.float32) for c in costs]),
        infeasible_steps=_pack(
            names, [s + v.astype(jnp.int32) for s, v in zip(old_steps, violated, strict=True)]
        ),
        guard_steps=state.guard_steps + guard.astype(jnp.int32),
        scale_floor=scale_floor,
        bit_value=state.bit_value,
    )


def _length_to_lose_a_bit(params, cost_grad, direction_norm, quantizer_mask) -> jax.Array:
    """The shortest step along ``-cost_grad`` after which some quantizer has lost a bit.

    Each ``log2 d`` moves by ``length * (-g / ||g||)``; a quantizer whose component is
    positive loses a bit once that exceeds :func:`quantizer.step_rise_to_lose_a_bit`. The
    masked loss update only adds to these rises (its ``log2 d`` part is >= 0) and lowers
    ``q_max``, which never adds a bit. Zero when no quantizer can lose one.
    """

    def lengths(theta, g):
        rise = -g[..., 0] / direction_norm
        distance = quantizer.step_rise_to_lose_a_bit(theta) + _PAST_THE_BOUNDARY
        return jnp.min(jnp.where(rise > 0, distance / jnp.where(rise > 0, rise, 1.0), jnp.inf))

    candidates = [
        lengths(p, g)
        for p, g, q in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(cost_grad),
            jax.tree.leaves(quantizer_mask),
            strict=True,
        )
        if q
    ]
    shortest = jnp.min(jnp.stack(candidates)) if candidates else jnp.inf
    return jnp.where(jnp.isfinite(shortest), shortest, 0.0)


def _default_is_quantizer(params):
    return quantizer.is_quantizer(params)


def _no_prunable(params):
    return jax.tree.map(lambda _: False, params)
