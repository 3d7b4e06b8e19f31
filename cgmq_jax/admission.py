"""Which cost-raising quantizer moves pass when the whole proposal would break a limit.

:func:`cgmq_jax.constraint.constrained_update` calls :func:`guarded` on every feasible
step; the rule matters where the proposed update, taken whole, would leave some limit (the
*guard*). Neither rule ever admits a move that leaves a limit, since every candidate set is
priced with the exact cost functions themselves (docs/method.md section 3):

* :func:`by_gain` (``admission="gain"``): each quantizer's cost-raising
  components form one candidate. Its *price* is the exact cost it adds alone, as a
  fraction of the room left under each limit (the largest fraction over the limits); its
  *gain* is the first-order loss decrease ``-g . r`` of its move ``r`` (``g`` the loss
  gradient when the caller passes ``loss_grads``, else the incoming update stands in for
  ``-g``, which makes the gain ``|r|^2``). A move that adds no cost (it crosses no rounding
  boundary) is free and always admitted; the others are admitted in order of gain per
  price, skipping any that no longer fits, each checked against every limit with the
  moves already admitted. A move with no gain is not paid for. Then one *trade*: the
  refused move worth most per unit of cost (a running mean of ``dL/d log2 d``, see
  :func:`bit_values`) takes a bit from the quantizer whose bit is worth least per unit of
  cost freed, when that is a gain and the result is within every limit.
* ``admission="all_or_nothing"`` (the default): every cost-raising component is
  refused, so in a budget that is full, bits can only fall. With ``move_at_floor``,
  :func:`floor_moves` lets a quantizer at its minimum bit-width that stays there move as
  proposed.
* :func:`within_bits` (``admission="within_bits"``): a quantizer's whole move passes
  where it gives that quantizer (or channel) no more bits, else its cost-raising
  components are refused; no bit is gained, so no cost rises.

Measured (docs/method.md section 3): LeNet-5 at 2e6 BOPs, seeds 0-2 on the 2-core CPU,
``gain`` used 99.9% of the budget with no fill needed but tested 98.71 / 98.60 / 98.66%
against 98.91 / 98.99 / 99.04% for ``all_or_nothing`` (same machine): its first-order worth per BOP
gives the cheap last layer 8-9 bits and the convolutions' inputs 1 bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cgmq_jax import quantizer

ADMISSIONS = ("gain", "all_or_nothing", "within_bits")
# How far past a rounding boundary of log2 d a bit-losing step lands (as the infeasible
# step's): far above float32 error in exp2/log2, far below a power-of-two step.
PAST_THE_BOUNDARY = 2.0**-10
# The decay of the running mean of each quantizer's bit value (``bit_values``) that the
# trades weigh: about the last 100 steps.
BIT_VALUE_DECAY = 0.99


def guarded(
    admission, updates, masked, guard, *, params, constraints, quantizer_mask, bit_value,
    loss_grads=None, move_at_floor=False, prunable_mask=None,
):  # fmt: skip
    """``(update, bit_value)``: what passes of ``updates`` (``masked`` is it with every
    cost-raising component zeroed) on a feasible step, and the running bit values.

    ``guard`` says whether the whole proposal would break a limit; where it does not,
    ``updates`` passes. ``"all_or_nothing"`` then passes ``masked`` (computed op for op as
    releases up to 0.3 did; the bit values are not kept); ``"gain"`` passes
    :func:`by_gain`'s choice (only evaluated on guarded steps) and keeps the running mean
    of :func:`bit_values`. With ``move_at_floor``, ``"all_or_nothing"`` passes
    :func:`floor_moves` of ``masked`` instead (``prunable_mask`` marks the leaves it leaves
    alone).
    """
    if admission == "all_or_nothing":
        if move_at_floor:
            masked = floor_moves(updates, masked, params, quantizer_mask, prunable_mask)
        return jax.tree.map(lambda u, m: jnp.where(guard, m, u), updates, masked), bit_value
    if admission == "within_bits":
        return within_bits(updates, masked, guard, params, quantizer_mask), bit_value
    new = bit_values(updates, quantizer_mask, loss_grads)
    bit_value = BIT_VALUE_DECAY * bit_value + (1.0 - BIT_VALUE_DECAY) * new
    admitted = jax.lax.cond(
        guard,
        lambda: by_gain(
            updates, masked, params, constraints, quantizer_mask, loss_grads, bit_value
        ),
        lambda: updates,
    )
    return admitted, bit_value


def _bit_length(theta) -> jax.Array:
    """Per element (channel), the bit length of a leaf's level count (the bit-width less
    the sign bit): what every cost rises with."""
    return jnp.frexp(quantizer.levels(*quantizer.from_latents(theta)))[1]


def within_bits(updates, masked, guard, params, quantizer_mask):
    """On a guarded step, each quantizer (channel) moves as proposed where that gives it no
    more bits, and as in ``masked`` (its cost-raising components zeroed) where it would.

    No quantizer gains a bit, so no cost rises (every cost rises with every bit-width),
    yet within its bit-width a step moves both ways: under ``all_or_nothing`` the refused
    finer-step components leave only the coarser ones, so ``log2 d`` ratchets up on the
    loss gradient's noise until a bit falls.
    """

    def pick(u, m, p, q):
        if not q:
            return u
        rises = _bit_length(p + u) > _bit_length(p)
        return jnp.where(guard & rises[..., None], m, u)

    return jax.tree.map(pick, updates, masked, params, quantizer_mask)


def floor_moves(updates, masked, params, quantizer_mask, prunable_mask=None):
    """``masked``, except that a quantizer (channel) at its minimum bit-width moves as
    proposed where it stays at it (so no cost rises).

    Under ``all_or_nothing`` a quantizer keeps only the coarser-step components on a
    guarded step. Above its minimum that ratchet is how bits fall and move. At the
    minimum no bit can fall, so ``log2 d`` (and ``q_max`` with it, kept at ``d_q``) only
    rises, however the loss pushes back, until the quantizer rounds every value to 0.
    Leaves marked in ``prunable_mask`` (their minimum is 0 levels, a removed
    channel) keep the ratchet.
    """
    if prunable_mask is None:
        prunable_mask = jax.tree.map(lambda _: False, quantizer_mask)

    def pick(u, m, p, q, prunable):
        if not q or prunable:
            return m
        stays = (_bit_length(p) <= 1) & (_bit_length(p + u) <= 1)
        return jnp.where(stays[..., None], u, m)

    return jax.tree.map(pick, updates, masked, params, quantizer_mask, prunable_mask)


def bit_values(updates, quantizer_mask, loss_grads=None) -> jax.Array:
    """Per quantizer leaf (in ``jax.tree.leaves`` order), how much the loss wants a finer
    step: ``dL/d log2 d`` summed over the leaf (from ``loss_grads``; without them the
    incoming update's ``-u[..., 0]`` stands in). Positive: a bit more would lower the loss,
    a bit less would raise it, by about this much (a bit is one unit of ``log2 d``)."""
    source = jax.tree.leaves(loss_grads) if loss_grads is not None else None
    leaves = jax.tree.leaves(updates)
    values = [
        jnp.sum(source[i][..., 0]) if source is not None else -jnp.sum(leaves[i][..., 0])
        for i, q in enumerate(jax.tree.leaves(quantizer_mask))
        if q
    ]
    return jnp.stack(values).astype(jnp.float32) if values else jnp.zeros([0], jnp.float32)


def by_gain(updates, masked, params, constraints, quantizer_mask, loss_grads=None, bit_value=None):
    """The update with the cost-raising moves admitted by gain per price (module docstring).

    Args:
      updates: the proposed update (weights and quantizers).
      masked: ``updates`` with every cost-raising quantizer component zeroed.
      params: the current (feasible) params.
      constraints: ``[(cost_fn, limit), ...]``.
      quantizer_mask: tree of bools, True at quantizer leaves.
      loss_grads: the loss gradient w.r.t. ``params`` (optional).
      bit_value: per quantizer leaf, the running mean of :func:`bit_values` (optional;
        without it no trade is made).

    Returns:
      ``masked`` plus the admitted quantizers' cost-raising components (and, after a
      trade, one more bit in one quantizer and one less in another).
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
        return _costs(params, constraints, with_moves(selected))

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
    admitted = with_moves(selected)
    if bit_value is None:
        return admitted
    return _trade(
        admitted,
        params,
        chosen,
        raising,
        costs_of=lambda update: _costs(params, constraints, update),
        limits=limits,
        blocked=(selected == 0) & (price > 0) & (gain > 0),
        paid=(selected > 0) & (price > 0),
        added=added,
        fraction=fraction,
        bit_value=bit_value,
    )


def _costs(params, constraints, update) -> jax.Array:
    """Every constraint's cost (float32) after ``update``, in order."""
    proposal = optax.apply_updates(params, update)
    return jnp.stack([jnp.asarray(fn(proposal), jnp.float32) for fn, _ in constraints])


def _trade(
    admitted,
    params,
    chosen,
    raising,
    *,
    costs_of,
    limits,
    blocked,
    paid,
    added,
    fraction,
    bit_value,
):
    """``admitted``, or ``admitted`` with one more bit where it is worth most per unit of
    cost and one bit less where it is worth least, when that is a gain and fits.

    The refused move worth most per unit of the limit it strains most (``bit_value`` per
    added cost) is weighed against every other quantizer losing a bit (its ``log2 d`` just
    past the boundary, as the infeasible step moves it): the donor is the one whose bit is
    worth least per unit of cost freed, among those with which the traded proposal is
    within every limit (exact costs). The trade is made when the move's worth per cost is
    the higher.
    """
    tiny = jnp.finfo(jnp.float32).tiny
    count = len(chosen)
    strained = jnp.argmax(fraction, axis=1)  # the limit each move strains most
    need = added[jnp.arange(count), strained]
    want = jnp.where(blocked & (bit_value > 0), bit_value / jnp.maximum(need, tiny), -jnp.inf)
    best = jnp.argmax(want)
    leaves, treedef = jax.tree.flatten(admitted)
    proposal = jax.tree.leaves(optax.apply_updates(params, admitted))
    drops = []
    for i in chosen:
        rise = quantizer.step_rise_to_lose_a_bit(proposal[i]) + PAST_THE_BOUNDARY
        rise = jnp.where(jnp.isfinite(rise), rise, 0.0).astype(leaves[i].dtype)
        drops.append(jnp.stack([rise, jnp.zeros_like(rise)], axis=-1))
    can_drop = jnp.stack([jnp.any(d[..., 0] > 0) for d in drops])

    def traded(donor):  # ``admitted`` + the best move + ``donor`` (one-hot) a bit lower
        out = list(leaves)
        for k, i in enumerate(chosen):
            raise_k = (k == best).astype(leaves[i].dtype)
            out[i] = leaves[i] + raise_k * raising[k] + donor[k].astype(leaves[i].dtype) * drops[k]
        return jax.tree.unflatten(treedef, out)

    raised = costs_of(traded(jnp.zeros(count)))
    with_donor = jax.vmap(lambda donor: costs_of(traded(donor)))(jnp.eye(count))
    fits = jnp.all(with_donor <= limits[None, :], axis=1)
    limit = strained[best]
    freed = raised[limit] - with_donor[:, limit]
    eligible = fits & can_drop & (jnp.arange(count) != best) & ~paid & (freed > 0)
    worth = jnp.where(eligible, bit_value / jnp.maximum(freed, tiny), jnp.inf)
    donor = jnp.argmin(worth)
    trade = jnp.isfinite(want[best]) & jnp.isfinite(worth[donor]) & (want[best] > worth[donor])
    return jax.lax.cond(trade, lambda: traded(jax.nn.one_hot(donor, count)), lambda: admitted)
