"""Post-training quantization under every limit (docs/method.md section 11): a trained
float network's bits allocated by measured sensitivity, without quantization-aware training.

From a calibrated network (every learned quantizer at 8 bits,
:func:`cgmq_jax.calibration.init_quantizers`), :func:`allocate` removes one bit at a time, each
time the one whose loss increase per unit of cost freed is smallest, until every limit
holds; then it gives back, one at a time, the bits that still fit and lower the loss most
per unit of cost. The loss is measured, not estimated: a candidate is the network with that
one quantizer changed, its loss computed on a calibration set by one jitted function of
the bit-width vector (compiled once: the bit-widths are traced), and its cost is exact
(one :func:`cgmq_jax.cost.layer_table` per step, with the repair's exact one-bit savings).
The search is lazy: a move measured at an earlier network is re-measured before it is
taken (Minoux's accelerated greedy), so a step costs a few loss evaluations, not one per
candidate. Each quantizer at ``b`` bits
takes the best of a few ranges: the calibrated one (``q_max``), halved, or quartered, so
that at 2 or 3 bits the range may clip the outliers rather than round most values to zero
(:data:`RANGE_SHIFTS`); the step is the one :func:`cgmq_jax.quantizer.init_at_bits` gives
that range at ``b`` bits, as in calibration.

The result is within every limit by construction and certified like any other model
(:func:`cgmq_jax.certify.certify`); an infeasible limit raises
:class:`cgmq_jax.limits.InfeasibleBudgetError` before any loss is computed. The harness
(:mod:`cgmq_jax.runs.ptq`, ``experiments/mnist.py --method ptq``) measures the loss on
1,024 calibration images with one compiled program that also gives every accuracy of the
run, then trains the weights for 100 steps with the bits frozen and keeps whichever is
better on validation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import cost, quantizer, repair
from cgmq_jax.limits import check_budget, limits_of, violation

#: A quantizer at ``b`` bits may take its calibrated range divided by ``2 ** shift`` for each
#: of these shifts; the one with the lowest loss is kept (the step follows the range).
RANGE_SHIFTS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One learned quantizer leaf: where it is, its floor and start, its candidate leaves."""

    path: tuple
    floor: int  # the minimum bit-width
    start: int  # the calibrated bit-width: no bit is given back above it
    table: jax.Array  # (start - floor + 1, len(RANGE_SHIFTS), *leaf shape): every leaf

    @property
    def name(self) -> str:
        """``layer/quantizer`` (e.g. ``conv1/input_quantizer``)."""
        return "/".join(map(str, self.path))


def _units(flat: dict, specs) -> list[_Unit]:
    """Every learned quantizer of ``specs``, with its leaves at each bit-width and range.

    The range is the calibrated leaf's ``q_max``; a per-channel weight quantizer moves all
    its channels together (each keeps its own range).
    """
    units = []
    for path, signed, _ in repair._learned_quantizers(specs):
        leaf = jnp.asarray(flat[path], jnp.float32)
        d, q_max = quantizer.from_latents(leaf)
        start = int(np.max(quantizer.exact_bitwidth(d, q_max, signed=signed)))
        floor = quantizer.min_bitwidth(signed=signed)
        rows = [
            [
                quantizer.latents(*quantizer.init_at_bits(q_max / 2**shift, bits, signed=signed))
                for shift in RANGE_SHIFTS
            ]
            for bits in range(floor, max(start, floor) + 1)
        ]
        units.append(_Unit(path, floor, max(start, floor), jnp.asarray(rows)))
    return units


def _loss_of_choice(params, units: list[_Unit], loss_fn: Callable, compiled: bool) -> Callable:
    """``choice -> loss``: ``loss_fn`` at the network whose learned quantizers take the
    leaves ``choice`` selects (an int array ``(units, 2)``: per quantizer its bits above the
    floor and its range shift index). One jitted function, compiled once: the choice is a
    traced array, so no bit-width recompiles it. With ``compiled``, ``loss_fn`` (already
    compiled by the caller) is called as it is on the parameter tree of each choice.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    if compiled:
        tables = {u.path: np.asarray(u.table) for u in units}

        def at(choice):
            leaves = {
                u.path: tables[u.path][c[0], c[1]] for u, c in zip(units, choice, strict=True)
            }
            return float(loss_fn(flax.traverse_util.unflatten_dict({**flat, **leaves})))

        return at
    moving = {u.path for u in units}
    weights = {path: leaf for path, leaf in flat.items() if path not in moving}

    @jax.jit
    def loss(weights, tables, choice):
        leaves = {
            u.path: t[choice[i, 0], choice[i, 1]]
            for i, (u, t) in enumerate(zip(units, tables, strict=True))
        }
        return loss_fn(flax.traverse_util.unflatten_dict({**weights, **leaves}))

    tables = [u.table for u in units]
    return lambda choice: float(loss(weights, tables, jnp.asarray(choice, jnp.int32)))


@dataclasses.dataclass
class _Search:
    """The greedy search: the units, the loss of a choice, exact costs, the limits, and
    the losses measured so far."""

    flat: dict
    units: list[_Unit]
    loss_at: Callable
    specs: tuple
    limits: dict
    activation_reduce: str
    evaluations: int = 0

    def params(self, choice: np.ndarray):
        """The parameter tree at ``choice`` (host arrays)."""
        flat = dict(self.flat)
        for i, unit in enumerate(self.units):
            flat[unit.path] = np.asarray(unit.table[choice[i, 0], choice[i, 1]])
        return flax.traverse_util.unflatten_dict(flat)

    def costs(self, choice: np.ndarray, direction: int) -> tuple[dict, dict]:
        """``(now, after)``: the exact costs at ``choice`` and, per unit that can move one
        bit in ``direction``, after that move. One :func:`cgmq_jax.cost.layer_table`; a
        move's costs are the table's with the repair's exact one-bit savings applied."""
        table = cost.layer_table(self.params(choice), self.specs)
        now = cost.table_costs(table, self.activation_reduce)
        sizes = [row["activation_bits"] for row in table]
        bits = {}
        for _, _, decrement in repair._one_bit_each(self.specs, table):
            if direction > 0:  # one more bit costs what one bit less saves
                saved = {name: -value for name, value in decrement.savings.items()}
                decrement = dataclasses.replace(decrement, savings=saved)
            bits.setdefault(decrement.path, []).append(decrement)
        after = {}
        for i, unit in enumerate(self.units):
            if 0 <= choice[i, 0] + direction <= unit.start - unit.floor:
                # every channel of a per-channel leaf moves
                moves = bits[unit.path]
                after[i] = repair._costs_after(now, sizes, moves, self.activation_reduce)
        return now, after

    def measure(self, choice: np.ndarray, index: int, shifts) -> tuple[float, int]:
        """``(loss, shift)``: the lowest loss of unit ``index`` moved one bit as
        ``choice[index]`` says, over ``shifts``."""
        best = None
        for shift in shifts:
            self.evaluations += 1
            loss = self.loss_at(_moved(choice, index, choice[index, 0], shift))
            if best is None or loss < best[0]:
                best = (loss, shift)
        return best


def _moved(choice: np.ndarray, index: int, bits: int, shift: int) -> np.ndarray:
    moved = choice.copy()
    moved[index] = (bits, shift)
    return moved


def _prices(search: _Search, choice, direction: int) -> tuple[float, dict]:
    """``(violation, prices)``: the normalised violation ``sum_j max(0, C_j - B_j) / B_j``
    at ``choice`` (the repair's measure), and per unit that can move, what its move is
    worth in cost. Removing: the violation it removes
    (units that remove none are left out). Giving back: the share of the limits it uses,
    ``sum_j dC_j / B_j`` (units whose move would cross a limit are left out)."""
    now, after = search.costs(choice, direction)
    limits, prices = search.limits, {}
    for i, costs in after.items():
        if direction < 0:
            price = violation(now, limits) - violation(costs, limits)
            if price > 0:
                prices[i] = price
        elif all(costs[name] <= limit for name, limit in limits.items()):
            prices[i] = sum((costs[n] - now[n]) / limit for n, limit in limits.items())
    return violation(now, limits), prices


def _score(change: float, price: float, direction: int) -> float:
    """A move's loss change per unit of price: lowest first. Giving back, only moves that
    lower the loss count (a free one first)."""
    if direction < 0:
        return change / price
    if change >= 0:
        return math.inf
    return change / price if price > 0 else -math.inf


def _shifts(shift: int, direction: int) -> list[int]:
    """The range shifts a quantizer tries when it moves a bit: its own, and when it loses
    a bit the next smaller range too (the range that minimises the error shrinks with the
    bits, never grows), when it gains one the next larger."""
    other = shift - direction
    return [shift, other] if 0 <= other < len(RANGE_SHIFTS) else [shift]


def _greedy(search: _Search, choice, loss: float, direction: int):
    """Move one bit at a time in ``direction`` (-1: until every limit holds; +1: while a
    move fits and lowers the loss), the best move by :func:`_score` each time.

    Lazy (Minoux's accelerated greedy): a move's loss, measured at an earlier network, is
    re-measured at the current one before it is taken, and it is taken only if it is still
    the best; a quantizer that has just moved is measured at its range and the next one
    (:func:`_shifts`), the others at the range they chose. Exact whenever a move's loss
    change does not shrink as the other bits move. Returns ``(choice, loss, moves)``.
    """
    measured: dict[int, tuple[float, int, float]] = {}  # unit -> (change, shift, loss)
    fresh: set[int] = set()
    moves = 0
    while True:
        violation, prices = _prices(search, choice, direction)
        if direction < 0 and violation == 0:
            break
        if not prices:
            if direction < 0:  # cannot happen: check_budget passed
                raise AssertionError("no bit left to remove, and a limit is still exceeded")
            break

        def key(i, prices=prices):
            score = _score(measured[i][0], prices[i], direction) if i in measured else -math.inf
            return score, -prices[i]

        while (best := min(prices, key=key)) not in fresh:
            target = _moved(choice, best, choice[best, 0] + direction, choice[best, 1])
            shifts = (
                [measured[best][1]] if best in measured else _shifts(choice[best, 1], direction)
            )
            after, shift = search.measure(target, best, shifts)
            measured[best] = (after - loss, shift, after)
            fresh.add(best)
        change, shift, after = measured.pop(best)
        if direction > 0 and _score(change, prices[best], direction) == math.inf:
            break
        choice = _moved(choice, best, choice[best, 0] + direction, shift)
        loss, fresh, moves = after, set(), moves + 1
    return choice, loss, moves


def _record(search: _Search, choice, losses, removed, given_back, started) -> dict:
    """What :func:`allocate` did, JSON-ready."""
    return {
        "bits_removed": removed,
        "bits_given_back": given_back,
        "loss_evaluations": search.evaluations,
        "calibration_loss_start": losses[0],
        "calibration_loss_end": losses[1],
        "quantizers": {
            unit.name: {"bits": int(choice[i, 0]) + unit.floor, "range_shift": int(choice[i, 1])}
            for i, unit in enumerate(search.units)
        },
        "seconds": time.perf_counter() - started,
    }


def allocate(
    params,
    specs: tuple[cost.LayerSpec, ...],
    budget,
    loss_fn: Callable[[Any], jax.Array],
    *,
    activation_reduce: str = "max",
    log: Callable[[str], None] | None = None,
    compiled: bool = False,
) -> tuple[Any, dict]:
    """Bits for every learned quantizer of a calibrated network, by measured sensitivity,
    within every limit.

    Greedy: repeatedly remove the bit whose measured loss increase per unit of cost freed
    is smallest (a move is re-measured at the current network before it is taken), until
    every limit holds; then give back, one at a time, the bits that still fit and lower the
    loss most per unit of cost. Each move also picks the quantizer's range among
    :data:`RANGE_SHIFTS`. Weights, biases and pinned quantizers are not changed.

    Args:
      params: the calibrated quantized parameters (:func:`cgmq_jax.calibration.init_quantizers`,
        8 bits by default); each learned quantizer keeps its ``q_max`` as its range, and no
        quantizer gets more bits than it has here.
      specs: the layer specs (:func:`cgmq_jax.cost.layer_specs`).
      budget: the BOP budget, or ``{cost name: limit}`` (:func:`cgmq_jax.limits.limits_of`).
      loss_fn: ``params -> scalar`` loss, jittable: e.g. the cross-entropy on a calibration
        set of a few thousand training images (never the test set).
      activation_reduce: as in :func:`cgmq_jax.certify.certify`.
      log: called with one line when done.
      compiled: ``loss_fn`` is already compiled (e.g. it calls a jitted function that other
        evaluations share): it is called as it is on each candidate's parameters, instead
        of being jitted here as a function of the bit-widths.

    Returns:
      ``(params, record)``: the allocated parameters and what was done (``bits_removed``,
      ``bits_given_back``, ``loss_evaluations``, the calibration loss at the start and the
      end, ``seconds``, each quantizer's ``bits`` and ``range_shift``).

    Raises:
      InfeasibleBudgetError: a limit below the network's minimum cost (the message
        states it), before any loss is computed.

    Examples:
      >>> import jax, optax
      >>> from cgmq_jax import calibration, certify, cost, models, ptq
      >>> model = models.MLP(hidden=(8,), num_classes=3)
      >>> x = jax.random.uniform(jax.random.key(0), (64, 4, 4, 1))  # images in [0, 1)
      >>> y = jax.numpy.arange(64) % 3
      >>> float_params = model.clone(quantized=False).init(jax.random.key(1), x)["params"]
      >>> params = calibration.init_quantizers(model, float_params, x)  # 8 bits everywhere
      >>> specs = cost.layer_specs(model, x, params=params)
      >>> def loss(p):
      ...     logits = model.apply({"params": p}, x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> allocated, record = ptq.allocate(params, specs, 2000, loss)
      >>> certify.certify(allocated, specs, 2000)["within_budget"]
      True
    """
    started = time.perf_counter()
    limits = limits_of(budget)
    check_budget(limits, specs, activation_reduce=activation_reduce)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(params)))
    units = _units(flat, specs)
    search = _Search(
        flat,
        units,
        _loss_of_choice(params, units, loss_fn, compiled),
        specs,
        limits,
        activation_reduce,
    )
    choice = np.array([(u.start - u.floor, 0) for u in units], np.int64).reshape(-1, 2)
    first_loss = search.loss_at(choice)
    search.evaluations += 1
    choice, loss, removed = _greedy(search, choice, first_loss, -1)
    choice, loss, given_back = _greedy(search, choice, loss, +1)
    record = _record(search, choice, (first_loss, loss), removed, given_back, started)
    if log is not None:
        log(
            f"PTQ allocation: {removed} bit(s) removed, {given_back} given back, "
            f"{search.evaluations} loss evaluations, calibration loss {first_loss:.4f} -> "
            f"{loss:.4f}, {record['seconds']:.1f} s"
        )
    return search.params(choice), record
