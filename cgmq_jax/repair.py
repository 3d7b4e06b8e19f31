"""Meeting and filling the limits exactly, one bit at a time (docs/method.md sections 4 and 8).

Every move here is one bit of one quantizer (or one channel of a per-channel one), whose
exact savings come from the cost table (:func:`cgmq_jax.cost.layer_table`):
:func:`greedy_repair` removes bits where they help most until every limit holds,
:func:`greedy_fill` adds bits where they are fewest while every limit still holds, and
:func:`one_more_bit_bops` is the cheapest bit a model could still add. Bit-widths are
integers and costs Python integers, as in the certificate (:mod:`cgmq_jax.certify`).
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import cost, quantizer
from cgmq_jax.limits import check_budget, limits_of, violation


def _set_bits(theta, bits: int, *, signed: bool, channel: int | None = None) -> jax.Array:
    """The leaf with ``q_max`` at the largest value that gives ``bits`` bits at the same step
    (0 bits: a removed channel of a pruning layer, ``q_max = d_q / 4``); only row ``channel``
    of a per-channel leaf when given. One compiled call per leaf shape: the repair makes
    hundreds (662 bits in the DS-CNN pruning test, where the eager ops took 3.8 of its 11 s)."""
    if channel is None:
        return _set_leaf_bits(theta, bits, signed=signed)
    return _set_channel_bits(theta, channel, bits, signed=signed)


@functools.partial(jax.jit, static_argnames="signed")
def _set_leaf_bits(theta, bits, *, signed):
    d, _ = quantizer.from_latents(theta)
    d_q = quantizer.power_of_two_step(d)
    top = jnp.maximum(jnp.where(signed, 2.0 ** (bits - 1) - 1, 2.0**bits - 1), 1.0)  # 0: removed
    removed = jnp.log2(d_q) + quantizer.PRUNED_RANGE_LOG2
    return theta.at[..., 1].set(jnp.where(bits == 0, removed, jnp.log2(top * d_q)))


@functools.partial(jax.jit, static_argnames="signed")
def _set_channel_bits(theta, channel, bits, *, signed):
    return theta.at[channel].set(_set_leaf_bits(theta[channel], bits, signed=signed))


def greedy_repair(params, specs: tuple[cost.LayerSpec, ...], budget, *, activation_reduce="max"):
    """Lower bits one at a time, where each bit helps most, until every limit holds.

    ``budget``: the BOP budget, or ``{cost name: limit}`` (:func:`cgmq_jax.limits.limits_of`).
    Each step lowers by one bit the quantizer (or channel) whose decrement most reduces the
    normalised total violation ``sum_j max(0, C_j - B_j) / B_j`` (docs/method.md section 8);
    ties go to the decrement that saves most of the violated costs in their sum form (so
    that lowering one of two equally large activations counts). It sets the quantizer's
    ``q_max`` to the largest value with one bit fewer at the same step. It ends in at most
    (sum of bits above the floors) steps because the minimum-bit network meets every limit
    (checked by :func:`cgmq_jax.limits.check_budget`).

    Returns:
      ``(params, steps)``: the repaired parameters and the number of bits removed.
    """
    limits = limits_of(budget)
    check_budget(limits, specs, activation_reduce=activation_reduce)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    steps = 0
    while True:
        table = cost.layer_table(flax.traverse_util.unflatten_dict(flat), specs)
        costs = cost.table_costs(table, activation_reduce)
        if violation(costs, limits) == 0:
            return flax.traverse_util.unflatten_dict(flat), steps
        violated = [name for name, limit in limits.items() if costs[name] > limit]

        sizes = [row["activation_bits"] for row in table]

        def score(candidate, costs=costs, sizes=sizes, violated=violated):
            after = _costs_after(costs, sizes, [candidate], activation_reduce)
            direct = sum(candidate.savings[name] / limits[name] for name in violated)
            return (-violation(after, limits), direct)

        best = max(_decrements(specs, table), key=score)
        flat[best.path] = _set_bits(
            flat[best.path], best.bits, signed=best.signed, channel=best.channel
        )
        steps += 1


def greedy_fill(params, specs: tuple[cost.LayerSpec, ...], budget, *, activation_reduce="max"):
    """Add bits one at a time, where they are fewest, until no single bit fits.

    The converse of :func:`greedy_repair`, for a model within every limit: each step gives
    one more bit to the learned quantizer with the fewest bits whose extra bit keeps every
    limit (ties: the one that uses the most of the limits, each cost relative to its
    limit; a per-channel quantizer's bit goes to its live channel with the fewest bits, and
    a removed channel is never revived). One more bit halves a quantizer's quantization
    error wherever it is, but it matters most at few bits (1 -> 2 bits, not 8 -> 9). The
    quantizer's power-of-two step is halved and its range ``q_max`` kept, so it gains
    exactly one bit of resolution.
    :func:`cgmq_jax.train.fit` calls it on the model CGMQ returns, trains the filled
    network's weights for an epoch, and keeps whichever of the three has the best validation
    accuracy: bits a network was not trained with can break it, e.g. a 1-bit input whose
    step is halved passes values it learned to treat as zero.
    It is needed because the constraint only lowers
    bits and the guard blocks any proposal that would cross the budget, so runs end below
    their budget (LeNet-5 at 1e6 BOPs on 846,240, 85%). (Called at every epoch end
    instead, the cheap layers took the room and kept it: LeNet-5 at 2e6 then ended with
    conv2's input at 1 bit and fc3 at 11-12 bits, test 98.74% / 98.82% for seeds 0 / 1.)

    Returns:
      ``(params, steps)``: the filled parameters and the number of bits added.
    """
    limits = limits_of(budget)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    steps = 0
    while True:
        current = flax.traverse_util.unflatten_dict(flat)
        before = cost.table_costs(cost.layer_table(current, specs), activation_reduce)
        best, best_key = None, None
        for path, signed, prune in _learned_quantizers(specs):
            leaf = jnp.asarray(flat[path])
            bits, grown = _one_more_bit(leaf, signed=signed, prune=prune)
            if bits is None or bits >= MAX_FILL_BITS:
                continue
            trial = {**flat, path: grown}
            table = cost.layer_table(flax.traverse_util.unflatten_dict(trial), specs)
            after = cost.table_costs(table, activation_reduce)
            if after == before or any(after[name] > limit for name, limit in limits.items()):
                continue  # no bit gained (the step at its floor), or over a limit
            use = sum((after[name] - before[name]) / limit for name, limit in limits.items())
            if best_key is None or (bits, -use) < best_key:
                best, best_key = (path, trial[path]), (bits, -use)
        if best is None:
            return current, steps
        flat[best[0]] = best[1]
        steps += 1


#: :func:`greedy_fill` gives no quantizer more bits than this.
MAX_FILL_BITS = 16


def _one_more_bit(leaf: jax.Array, *, signed: bool, prune: bool):
    """``(bits, leaf with one more bit)`` for the fill's next move on one quantizer leaf;
    ``(None, None)`` if it has no live channel.

    A per-tensor leaf gains its bit as a whole. A per-channel leaf (one step and range per
    output channel, shape ``(channels, 2)``) gains it on one live channel, the one with the
    fewest bits (the first of those): every channel of a layer costs the same per bit, so
    one channel at a time is the finest move, and a pruned network's last few thousand BOPs
    can still be used (a whole layer's bit may not fit where one channel's does).
    """
    per_channel = quantizer.exact_bitwidth(
        *quantizer.from_latents(leaf), signed=signed, prune=prune
    )
    if leaf.ndim < 2:
        return int(np.max(per_channel)), _halve_step(leaf)
    per_channel = np.asarray(per_channel).reshape(-1)
    live = np.flatnonzero(per_channel > 0) if prune else np.arange(per_channel.size)
    if live.size == 0:
        return None, None
    c = int(live[np.argmin(per_channel[live])])
    return int(per_channel[c]), leaf.at[c].set(_halve_step(leaf[c]))


def _learned_quantizers(specs):
    """``(path, signed, prune)`` of every quantizer leaf whose bit-width is learned."""
    for spec in specs:
        if not spec.quantized:
            continue
        if spec.weight_bits is None:
            yield (*spec.path, "weight_quantizer"), spec.weight_signed, spec.prune
        if spec.input_bits is None:
            yield (*spec.path, "input_quantizer"), spec.input_signed, False


@jax.jit
def _halve_step(theta: jax.Array) -> jax.Array:
    """The leaf with its power-of-two step halved (the latent at the new step's centre) and
    its range kept: twice the levels, one more bit."""
    d, _ = quantizer.from_latents(theta)
    return theta.at[..., 0].set(jnp.log2(quantizer.power_of_two_step(d)) - 1.0)


def _costs_after(costs: dict, sizes: list, decrements, activation_reduce: str) -> dict:
    """The costs (:func:`cgmq_jax.cost.table_costs`) of a table after ``decrements`` (one or
    several :class:`_Decrement`), from its ``costs`` and its rows' ``activation_bits``
    (``sizes``), without copying the table: the repair scores every candidate at every
    step, the post-training search every quantizer's move (all channels of a per-channel
    leaf at once)."""
    after = dict(costs)
    sizes = list(sizes)
    for decrement in decrements:
        for name in ("bops", "weight_memory_bits"):
            after[name] -= decrement.savings[name]
        sizes[decrement.index] -= decrement.savings["activation_bits"]
    after["activation_bits"] = max(sizes) if activation_reduce == "max" else sum(sizes)
    return after


@dataclasses.dataclass(frozen=True)
class _Decrement:
    """One bit less for one quantizer (or one channel of a per-channel one)."""

    index: int  # the layer's row in the table
    path: tuple
    channel: int | None
    bits: int  # the new bit-width
    signed: bool
    savings: dict  # per cost, in its sum form: what the bit saves


def _one_bit_each(specs, table):
    """``(bits, floor, decrement)`` for every learned quantizer (and every channel of a
    per-channel one): its bits, its floor, and one bit less (whose savings are also what
    one more bit would cost)."""
    for index, (spec, row) in enumerate(zip(specs, table, strict=True)):
        if not spec.quantized:
            continue
        # A pruning network's rows say each live channel's MACs and kernel size.
        per_channel_macs = row.get("channel_macs", spec.macs // spec.channels)
        per_channel_weights = row.get("channel_weights", spec.weights // spec.channels)
        weight_bits = row["weight_bits"]
        channels = weight_bits if isinstance(weight_bits, list) else [weight_bits]
        if spec.weight_bits is None:
            floor = quantizer.min_bitwidth(signed=spec.weight_signed)
            for c, bits in enumerate(channels):
                if bits == 0:  # a removed channel: neither repair nor fill moves it
                    continue
                yield (
                    bits,
                    floor,
                    _Decrement(
                        index,
                        (*spec.path, "weight_quantizer"),
                        c if isinstance(weight_bits, list) else None,
                        bits - 1,
                        True,
                        {
                            "bops": per_channel_macs * row["input_bits"],
                            "weight_memory_bits": per_channel_weights,
                            "activation_bits": 0,
                        },
                    ),
                )
        if spec.input_bits is None:
            yield (
                row["input_bits"],
                quantizer.min_bitwidth(signed=spec.input_signed),
                _Decrement(
                    index,
                    (*spec.path, "input_quantizer"),
                    None,
                    row["input_bits"] - 1,
                    spec.input_signed,
                    {
                        "bops": per_channel_macs * sum(channels),
                        "weight_memory_bits": 0,
                        "activation_bits": row["activation_bits"] // row["input_bits"],
                    },
                ),
            )


def _decrements(specs, table):
    """Every one-bit decrement of a learned quantizer above its floor, with its savings; in
    a pruning layer with more than one live channel, also each channel at its floor
    removed (its savings here are its own layer's: the next layer's, on its output, come
    on top, and the repair's loop recounts every step exactly)."""
    for bits, floor, d in _one_bit_each(specs, table):
        if bits > floor:
            yield d
        elif d.channel is not None and specs[d.index].prune and bits == floor:
            if table[d.index]["live_channels"] > 1:
                yield dataclasses.replace(
                    d, bits=0, savings={k: v * floor for k, v in d.savings.items()}
                )


def one_more_bit_bops(specs, table) -> int | None:
    """The fewest BOPs that one more bit on any learned quantizer (a weight channel or an
    input) would add, from :func:`cgmq_jax.cost.layer_table` rows; ``None`` if nothing is
    learned. A model whose ``bops`` plus this exceeds its budget uses all of it: no single
    bit fits anywhere."""
    extras = [d.savings["bops"] for _, _, d in _one_bit_each(specs, table)]
    return min(extras) if extras else None
