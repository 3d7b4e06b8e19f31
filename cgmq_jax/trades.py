"""Bits that move to where they pay, priced by measured loss (docs/method.md section 3).

Under a full budget the guard refuses every cost-raising move, so during QAT bits can only
fall. :func:`trade_bits` moves them between quantizers at a network as it stands: for every
learned quantizer it measures the loss with one bit more and one bit less (each both ways:
the step halved or doubled with the range kept, or the range doubled or halved with the step
kept; the better of the two), then takes moves in order of their loss decrease (one bit
more that fits, one bit less that lowers the loss, or a *trade*: one bit to ``r`` paid for
by one bit from ``d``), each only if the exact costs of the network with it stay within
every limit and its measured loss is lower than the network's. Each quantizer moves at most
once per call. The loss is measured, not estimated from a gradient: ``dL/d log2 d`` is a
pressure, not a worth (section 3 explains how the gradient rule failed).

The trainer (:func:`cgmq_jax.train.fit`, ``TrainConfig.trades``) calls it after every QAT
epoch but the last, with the loss on a fresh draw of training images, so the next epoch
trains the network with its new bits; every network it returns is within every limit.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import cost, quantizer, repair
from cgmq_jax.export.base import BIAS_BITS, LayerRow
from cgmq_jax.limits import limits_of

#: No quantizer is given more bits than this (as the fill, :data:`repair.MAX_FILL_BITS`).
MAX_BITS = repair.MAX_FILL_BITS


def _bits(leaf, signed: bool) -> np.ndarray:
    return np.asarray(quantizer.exact_bitwidth(*quantizer.from_latents(leaf), signed=signed))


def _at_range(leaf, bits, signed: bool):
    """``leaf`` with ``q_max`` the largest value giving ``bits`` (per channel) at its step."""
    d, _ = quantizer.from_latents(leaf)
    d_q = quantizer.power_of_two_step(d)
    bits = jnp.asarray(bits, jnp.float32)
    top = 2.0 ** (bits - 1) - 1 if signed else 2.0**bits - 1
    return leaf.at[..., 1].set(jnp.log2(top * d_q))


def _at_step(leaf, shift: float):
    """``leaf`` with its power-of-two step times ``2 ** shift`` (latent at its centre)."""
    d, _ = quantizer.from_latents(leaf)
    return leaf.at[..., 0].set(jnp.log2(quantizer.power_of_two_step(d)) + shift)


def _as_bits(bits: np.ndarray):
    """A layer row's bit-width: an int, or a tuple (one per channel)."""
    return tuple(int(b) for b in bits.reshape(-1)) if bits.ndim else int(bits)


def _costs(specs, bits: list, activation_reduce: str) -> dict:
    """The exact costs of ``specs`` at ``bits`` (per layer ``[weight bits, input bits]``),
    as :func:`cgmq_jax.cost.exact_costs` counts them, from integers alone."""
    rows = [
        LayerRow(
            layer=spec.name,
            macs=spec.macs,
            weight_bits=w,
            input_bits=a,
            weights=spec.weights,
            biases=spec.biases,
            bias_bits=BIAS_BITS,
            input_elements=spec.input_elements,
        )  # fmt: skip
        for spec, (w, a) in zip(specs, bits, strict=True)
    ]
    sizes = [row.activation_bits for row in rows]
    return {
        "bops": sum(row.bops for row in rows),
        "weight_memory_bits": sum(row.weight_memory_bits for row in rows),
        "activation_bits": max(sizes) if activation_reduce == "max" else sum(sizes),
    }


def neighbours(leaf, signed: bool, direction: int) -> list:
    """The leaves one bit finer (``direction=+1``) or coarser (``-1``) than ``leaf``, in
    every channel: by the step (halved / doubled, the range kept) and by the range (the
    largest / smallest ``q_max`` with that many bits at the same step). Only those whose
    every channel moved exactly one bit, within the floor and :data:`MAX_BITS`."""
    leaf = jnp.asarray(leaf, jnp.float32)
    bits = _bits(leaf, signed)
    target = bits + direction
    if target.min() < quantizer.min_bitwidth(signed=signed) or target.max() > MAX_BITS:
        return []
    found = []
    for candidate in (_at_step(leaf, -direction), _at_range(leaf, target, signed)):
        if np.array_equal(_bits(candidate, signed), target):
            found.append(candidate)
    return found


def _learned_units(specs) -> list[tuple]:
    """The learned quantizers, in the certificate's order: ``(path, signed, layer index,
    0: weight / 1: input)`` each (a pinned quantizer is not one)."""
    return [
        ((*spec.path, f"{kind}_quantizer"), signed, k, j)
        for k, spec in enumerate(specs)
        if spec.quantized
        for j, (kind, signed, pinned) in enumerate(
            (
                ("weight", spec.weight_signed, spec.weight_bits),
                ("input", spec.input_signed, spec.input_bits),
            )
        )
        if pinned is None
    ]


def _ranked_moves(gain: dict) -> list[tuple[tuple, tuple]]:
    """``(ups, downs)`` unit indices of every move whose measured loss gain is positive: one
    bit up, one bit down, or one up and another down (a trade), by gain, the largest first.
    ``gain`` is ``{+1 or -1: {unit index: loss gain of its best neighbour that way}}``."""
    candidates = [(g, (i,), ()) for i, g in gain[+1].items() if g > 0]
    candidates += [(g, (), (i,)) for i, g in gain[-1].items() if g > 0]
    candidates += [
        (gu + gd, (u,), (d,))
        for u, gu in gain[+1].items()
        for d, gd in gain[-1].items()
        if u != d and gu > 0 and gu + gd > 0
    ]
    candidates.sort(key=lambda c: -c[0])
    return [(ups, downs) for _, ups, downs in candidates]


def trade_bits(
    params, specs: tuple[cost.LayerSpec, ...], budget, loss_fn: Callable, *,
    activation_reduce: str = "max", max_checks: int | None = None,
):  # fmt: skip
    """Move bits between learned quantizers where the measured loss says they pay.

    Args:
      params: a quantized network's parameters, within every limit of ``budget``.
      specs: its layer specs (:func:`cgmq_jax.cost.layer_specs`).
      budget: the BOP budget or ``{cost name: limit}`` (:func:`cgmq_jax.limits.limits_of`).
      loss_fn: ``params -> float``, the loss on a fixed set of examples (jit it: it is
        called about four times per learned quantizer, on trees of the same shapes).
      max_checks: at most this many candidate moves are measured together (default: twice
        the number of learned quantizers).

    Returns:
      ``(params, record)``: the network after the moves (within every limit: each move is
      checked with the exact costs) and ``{"moves": [...], "loss_before", "loss_after",
      "evaluations"}``; each move names the quantizers that gained and lost a bit.
    """
    limits = limits_of(budget)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    units = _learned_units(specs)
    table = cost.layer_table(params, specs)
    bits = [
        [tuple(w) if isinstance(w := row["weight_bits"], list) else w, row["input_bits"]]
        for row in table
    ]
    evaluations = 0

    def measure(changes: dict) -> float:
        nonlocal evaluations
        evaluations += 1
        return float(loss_fn(flax.traverse_util.unflatten_dict({**flat, **changes})))

    def with_bits(moves: dict) -> list:  # ``bits`` with ``{unit index: leaf}`` moved
        moved = [list(row) for row in bits]
        for i, leaf in moves.items():
            _, signed, k, j = units[i]
            moved[k][j] = _as_bits(_bits(leaf, signed))
        return moved

    def within(moves: dict) -> bool:
        costs = _costs(specs, with_bits(moves), activation_reduce)
        return all(costs[name] <= limit for name, limit in limits.items())

    base = measure({})
    best = {+1: {}, -1: {}}  # direction -> {unit index: (loss, leaf)}
    for i, (path, signed, _, _) in enumerate(units):
        for direction in (+1, -1):
            for leaf in neighbours(flat[path], signed, direction):
                loss = measure({path: leaf})
                if i not in best[direction] or loss < best[direction][i][0]:
                    best[direction][i] = (loss, leaf)
    gain = {d: {i: base - loss for i, (loss, _) in best[d].items()} for d in best}
    current, moved, moves, checks = base, set(), [], 0
    limit = 2 * len(units) if max_checks is None else max_checks
    for ups, downs in _ranked_moves(gain):
        if checks >= limit:
            break
        if moved & {*ups, *downs}:
            continue
        moves_here = {i: best[+1][i][1] for i in ups} | {i: best[-1][i][1] for i in downs}
        if not within(moves_here):
            continue
        changes = {units[i][0]: leaf for i, leaf in moves_here.items()}
        checks += 1
        loss = measure(changes)
        if loss < current:
            flat.update(changes)
            bits = with_bits(moves_here)
            current, moved = loss, moved | {*ups, *downs}
            moves.append(
                {
                    "up": ["/".join(map(str, units[i][0])) for i in ups],
                    "down": ["/".join(map(str, units[i][0])) for i in downs],
                    "loss": loss,
                }
            )
    record = {
        "moves": moves,
        "loss_before": base,
        "loss_after": current,
        "evaluations": evaluations,
    }
    return flax.traverse_util.unflatten_dict(flat), record
