"""The optax chains CGMQ trains with, built on :func:`cgmq_jax.constrained_update`.

``cgmq_optimizer`` is the recommended chain (Adam for the weights, its own Adam for the
quantizer latents, then the budget constraint, last); ``partitioned_adam`` is its first
half, and ``fixed_bitwidths`` the last link of the fixed-bit baseline (``--method fixed``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cgmq_jax import quantizer
from cgmq_jax.constraint import DEFAULT_RESCALE, constrained_update


def fixed_bitwidths(
    is_quantizer: Callable[[Any], Any] | None = None,
    prunable: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Freeze every quantizer's level count ``n`` (so its bit-width) while its step learns.

    The ``log2 q_max`` update is replaced so that ``q_max = n * d_q`` after the update: the
    range follows the learned power-of-two step (LSQ-style fixed-bit QAT). Put it last in
    a chain, like :func:`constrained_update`.

    Evaluate the loss at :func:`cgmq_jax.quantizer.tie_ranges` ``(params)``, so that the
    step's gradient is the total derivative of the tied range. With DQ's partial
    derivative (``q_max`` held), the clipping signal is lost once the range follows the
    step, and the step random-walks: measured on LeNet-5 W4A4, the training loss rose
    from 0.05 to 1.09 over 8 QAT epochs.
    """
    if is_quantizer is None:
        is_quantizer = quantizer.is_quantizer
    if prunable is None:
        prunable = lambda params: jax.tree.map(lambda _: False, params)  # noqa: E731

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("fixed_bitwidths needs the current params: tx.update(u, s, params)")

        def follow_step(update, theta, prune):
            n = quantizer.levels(*quantizer.from_latents(theta), prune=prune)
            d_step = quantizer.power_of_two_step(jnp.exp2(theta[..., 0] + update[..., 0]))
            # A removed channel (prunable leaves only) stays removed: its range at d_q / 4.
            n = jnp.where(n == 0, 2.0**quantizer.PRUNED_RANGE_LOG2, n)
            return update.at[..., 1].set(jnp.log2(n * d_step) - theta[..., 1])

        new_updates = jax.tree.map(
            lambda u, p, q, r: follow_step(u, p, r) if q else u,
            updates,
            params,
            is_quantizer(params),
            prunable(params),
        )
        return new_updates, state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def partitioned_adam(
    learning_rate: optax.ScalarOrSchedule, quantizer_learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """Adam for the weights and its own Adam for the quantizer latents (log2 units).

    ``optax.partition`` by :func:`cgmq_jax.quantizer.param_labels`: each optimizer sees
    and keeps state for its own leaves only.
    """
    return optax.partition(
        {"weight": optax.adam(learning_rate), "quantizer": optax.adam(quantizer_learning_rate)},
        quantizer.param_labels,
    )


def cgmq_optimizer(
    cost_fn: Callable[[optax.Params], jax.Array],
    budget: float | jax.typing.ArrayLike,
    *,
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    quantizer_learning_rate: optax.ScalarOrSchedule = 1e-2,
    rescale: float = DEFAULT_RESCALE,
    admission: str = "all_or_nothing",
    refit_weight_ranges: bool = False,
    prunable: Callable[[Any], Any] | None = None,
    move_at_floor: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The recommended CGMQ chain, the one :func:`cgmq_jax.train.fit` trains with.

    ``optax.chain(partitioned_adam(learning_rate, quantizer_learning_rate),
    constrained_update(cost_fn, budget, rescale=rescale))``: Adam for the weights, a
    separate Adam for the quantizer latents, then the budget constraint, last. ``fit``
    passes a cosine-decayed ``learning_rate`` (over all QAT steps) and a constant
    ``quantizer_learning_rate``. To clip gradients, chain a clip before it:
    ``optax.chain(optax.clip_by_global_norm(1.0), cgmq_optimizer(...))``.

    Args:
      cost_fn: ``params -> BOPs``, as for :func:`constrained_update`.
      budget: the maximum BOPs per example, or a schedule ``step -> budget`` (e.g.
        ``optax.exponential_decay`` from the network's cost at 8 bits down to the budget,
        ``end_value=budget``: ``--budget_warmup_epochs``), then ``constrained_update``
        runs under ``optax.inject_hyperparams`` and each step is feasible for that step's
        budget.
      learning_rate: the weights' Adam learning rate (or schedule).
      quantizer_learning_rate: the quantizer latents' Adam learning rate (or schedule),
        in log2 units.
      rescale: CGGD's ``R`` (> 1).
      admission: what the guard admits (:func:`constrained_update`).
      refit_weight_ranges: refit the range of a weight quantizer that loses bits
        (:func:`constrained_update`).
      prunable: the weight quantizers that may remove channels (:func:`constrained_update`).
      move_at_floor: a guarded quantizer at its minimum bit-width moves where it stays
        there (:func:`constrained_update`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params`` (and
      takes the loss gradient as ``loss_grads``).

    Examples:
      >>> import functools, jax, optax
      >>> from cgmq_jax import cgmq_optimizer, cost, models
      >>> model = models.MLP()
      >>> x = jax.numpy.ones((1, 28, 28, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> specs = cost.layer_specs(model, x)
      >>> tx = cgmq_optimizer(functools.partial(cost.bops, specs=specs), 4e6)
      >>> state = tx.init(params)
      >>> type(state[-1]).__name__
      'ConstrainedUpdateState'
    """
    update = constrained_update
    if callable(budget):  # a schedule: the budget becomes a hyperparameter of the step count
        update = optax.inject_hyperparams(
            constrained_update,
            static_args=("cost_fn", "admission", "prunable", "move_at_floor"),
        )
    return optax.chain(
        partitioned_adam(learning_rate, quantizer_learning_rate),
        update(
            cost_fn,
            budget,
            rescale=rescale,
            admission=admission,
            refit_weight_ranges=refit_weight_ranges,
            prunable=prunable,
            move_at_floor=move_at_floor,
        ),
    )
