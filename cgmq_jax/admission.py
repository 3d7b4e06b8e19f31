"""Which cost-raising quantizer moves pass when the whole proposal would break a limit.

:func:`cgmq_jax.constraint.constrained_update` calls one of these on a feasible step whose
proposed update, taken whole, would leave some limit (the *guard*). Each returns the
update to apply; neither ever admits a move that leaves a limit, since every candidate set
is priced with the exact cost functions themselves (docs/method.md section 3):

* :func:`by_gain` (the default, ``admission="gain"``): each quantizer's cost-raising
  components form one candidate. Its *price* is the exact cost it adds alone, as a
  fraction of the room left under each limit (the largest fraction over the limits); its
  *gain* is the first-order loss decrease ``-g . r`` of its move ``r`` (``g`` the loss
  gradient when the caller passes ``loss_grads``, else the incoming update stands in for
  ``-g``, which makes the gain ``|r|^2``). A move that adds no cost (it crosses no rounding
  boundary) is free and always admitted; the others are admitted in order of gain per
  price, skipping any that no longer fits, each checked against every limit with the
  moves already admitted. A move with no gain is not paid for.
* :func:`all_or_nothing` (``admission="all_or_nothing"``, the rule of releases up to
  0.3): every cost-raising component is refused, so in a budget that is full, bits can
  only fall.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

ADMISSIONS = ("gain", "all_or_nothing")


def all_or_nothing(updates, masked, params, constraints, quantizer_mask, loss_grads=None):
    """``masked``: every cost-raising component refused."""
    del updates, params, constraints, quantizer_mask, loss_grads
    return masked


def by_gain(updates, masked, params, constraints, quantizer_mask, loss_grads=None):
    """The update with the cost-raising moves admitted by gain per price (module docstring).

    Args:
      updates: the proposed update (weights and quantizers).
      masked: ``updates`` with every cost-raising quantizer component zeroed.
      params: the current (feasible) params.
      constraints: ``[(cost_fn, limit), ...]``.
      quantizer_mask: tree of bools, True at quantizer leaves.
      loss_grads: the loss gradient w.r.t. ``params`` (optional).

    Returns:
      ``masked`` plus the admitted quantizers' cost-raising components.
    """
    leaves, treedef = jax.tree.flatten(updates)
    masked_leaves = jax.tree.leaves(masked)
    chosen = [i for i, q in enumerate(jax.tree.leaves(quantizer_mask)) if q]
    if not chosen:
        return masked
    raising = [leaves[i] - masked_leaves[i] for i in chosen]
    limits = jnp.stack([jnp.asarray(limit, jnp.float32) for _, limit in constraints])

    def with_moves(selected):  # ``masked`` plus the moves of the selected quantizers
        out = list(masked_leaves)
        for k, i in enumerate(chosen):
            out[i] = (masked_leaves[i] + selected[k] * raising[k]).astype(masked_leaves[i].dtype)
        return jax.tree.unflatten(treedef, out)

    def costs(selected):
        proposal = optax.apply_updates(params, with_moves(selected))
        return jnp.stack([jnp.asarray(fn(proposal), jnp.float32) for fn, _ in constraints])

    count = len(chosen)
    base = costs(jnp.zeros(count))
    added = jax.vmap(costs)(jnp.eye(count)) - base[None, :]  # (candidates, limits)
    room = limits - base
    fraction = jnp.where(
        added > 0, added / jnp.maximum(room, jnp.finfo(jnp.float32).tiny)[None, :], 0.0
    )
    price = jnp.max(fraction, axis=1)
    gradient = jax.tree.leaves(loss_grads) if loss_grads is not None else None
    gain = jnp.stack(
        [
            jnp.sum(
                -(gradient[i] if gradient is not None else -leaves[i]).astype(jnp.float32)
                * raising[k]
            )
            for k, i in enumerate(chosen)
        ]
    )
    priority = jnp.where(
        price <= 0, jnp.inf, jnp.where(gain > 0, gain / jnp.where(price > 0, price, 1.0), -jnp.inf)
    )

    def consider(selected, k):
        trial = selected.at[k].set(1.0)
        fits = (priority[k] > -jnp.inf) & jnp.all(costs(trial) <= limits)
        return jnp.where(fits, trial, selected), None

    selected, _ = jax.lax.scan(consider, jnp.zeros(count), jnp.argsort(-priority))
    return with_moves(selected)


RULES = {"gain": by_gain, "all_or_nothing": all_or_nothing}
