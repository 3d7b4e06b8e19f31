"""The quantizer ranges a constrained step leaves: at least one level, and a refitted range
where a weight quantizer lost a bit.

:func:`cgmq_jax.constraint.constrained_update` chooses the step; what it then does to each
quantizer's range is here. ``_keep_levels`` keeps ``q_max`` at least at the rounded step
``d_q`` (``n >= 1``, or ``d_q / 4`` for a removed channel), so the floor is held without
adding a bit; :func:`refit_lost_weight_ranges` (``refit_weight_ranges=True``) gives a weight
quantizer that lost bits the least-squares range of its new bit-width. Neither changes a
bit-width, so neither changes a cost.

Kept apart from :mod:`cgmq_jax.constraint` (the guard, the infeasible step, the checks of
its arguments), which re-exports every name here; nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from cgmq_jax import quantizer


def refit_lost_weight_ranges(updates, params, prunable=None):
    """``updates`` with every weight quantizer that they leave with fewer bits refitted.

    For each mapping of ``params`` holding a ``weight_quantizer`` leaf and its ``kernel``
    (a linen layer's parameters), where the updated leaf has fewer bits than the current
    one (per channel for a per-channel leaf), its update is replaced by the one that
    lands on :func:`cgmq_jax.quantizer.least_squares_latents` of the updated kernel at
    the updated (smaller) bit-width. Bit-widths after the update are exactly those of
    ``params + updates``: no cost changes. Everything else passes through. ``prunable``
    (a tree of bools like ``params``) marks the leaves whose channels may be removed: a
    channel the update removes (0 bits) stays removed, not refitted.
    """
    if not isinstance(params, Mapping):
        return updates
    prunable = prunable if isinstance(prunable, Mapping) else {}
    out = dict(updates)
    for name, value in params.items():
        if isinstance(value, Mapping):
            out[name] = refit_lost_weight_ranges(updates[name], value, prunable.get(name))
    theta, kernel = params.get("weight_quantizer"), params.get("kernel")
    if (
        theta is None
        or kernel is None
        or not hasattr(theta, "shape")
        or not hasattr(kernel, "shape")
        or theta.shape[-1:] != (2,)
    ):
        return out
    update = updates["weight_quantizer"]
    new_theta = theta + update
    prune = bool(prunable.get("weight_quantizer", False))
    bits = lambda leaf: quantizer.exact_bitwidth(  # noqa: E731
        *quantizer.from_latents(leaf), signed=True, prune=prune
    )
    before, after = bits(theta), bits(new_theta)
    lost = ((after < before) & (after > 0))[..., None]
    dtype = jnp.result_type(jnp.float32, theta, update)  # as jnp.where(lost, refit, update)

    def refit():
        refitted = quantizer.least_squares_latents(
            kernel + updates["kernel"],
            jnp.maximum(after, quantizer.min_bitwidth(signed=True)),
            signed=True,
            per_channel=theta.ndim == 2,
        )
        return jnp.where(lost, refitted - theta, update).astype(dtype)

    # Most steps lose no bit: the least-squares search (13 passes over the kernel) runs
    # only on those that do.
    out["weight_quantizer"] = jax.lax.cond(jnp.any(lost), refit, lambda: update.astype(dtype))
    return out


def _keep_levels(update: jax.Array, theta: jax.Array, *, prune: bool = False) -> jax.Array:
    """Raise the ``log2 q_max`` update so that ``q_max >= d_q`` after it (``n >= 1``).

    ``d_q`` is computed exactly as the forward pass computes it, so at the floor
    ``q_max / d_q`` is 1 (less a millionth) and ``n = round(q_max / d_q)`` is 1: this never
    adds a bit. (A half-step margin below ``d_q`` made bits slower to come back after the
    constraint: the 2e6 runs then used 1.59-1.93M BOPs and lost accuracy.) A prunable leaf's
    floor is a removed channel's range, ``q_max >= d_q / 4`` (``n = 0``, half a level from
    coming back, :data:`cgmq_jax.quantizer.PRUNED_RANGE_LOG2`).
    """
    new = theta + update
    d_step = quantizer.power_of_two_step(jnp.exp2(new[..., 0]))
    # 2**-20 of slack in log2 units: float noise in log2/exp2 must not move a leaf at q_max == d_q.
    lowest = quantizer.PRUNED_RANGE_LOG2 if prune else 0.0
    floor = jnp.log2(d_step) + lowest - theta[..., 1] - 2.0**-20
    return update.at[..., 1].set(jnp.maximum(update[..., 1], floor))
