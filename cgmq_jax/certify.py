"""The budget guarantee made real (docs/method.md section 4): feasibility, repair, certificate.

Everything here is exact: bit-widths are integers and costs are Python integers.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import cost, quantizer


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest cost the network can have."""


#: Per cost (:data:`cgmq_jax.cost.COSTS`): its CLI flag, the flag's unit, and bits per unit.
LIMIT_FLAGS = {
    "bops": ("--budget_bops", "BOPs", 1),
    "weight_memory_bits": ("--budget_weight_kib", "KiB", 8192),
    "activation_bits": ("--budget_activation_kib", "KiB", 8192),
}


def limits_from_flags(values) -> dict:
    """``{cost name: limit}`` (BOPs; memory in bits) from the limit flags that are set.

    The one mapping from the CLI's units to the guard's: ``values`` maps each flag of
    :data:`LIMIT_FLAGS` without its dashes (``budget_bops``, ``budget_weight_kib``,
    ``budget_activation_kib``) to a number in the flag's unit, or None (unset); a
    ``TrainConfig`` passes its fields. Each set value is multiplied by its bits per unit.

    Example:
      >>> limits_from_flags({"budget_bops": 2e6, "budget_weight_kib": 8})
      {'bops': 2000000.0, 'weight_memory_bits': 65536}
    """
    limits = {}
    for name, (flag, _, per_unit) in LIMIT_FLAGS.items():
        value = values.get(flag.removeprefix("--"))
        if value is not None:
            limits[name] = value * per_unit
    return limits


def limits_of(budget) -> dict:
    """``{cost name: limit}`` from a BOP budget (a number) or a mapping of limits.

    Limits are in BOPs and in bits (memory); every name must be one of
    :data:`cgmq_jax.cost.COSTS`, every limit a positive finite number.
    """
    limits = dict(budget) if isinstance(budget, dict) else {"bops": budget}
    if not limits:
        raise ValueError("give at least one limit (BOPs, weight memory or activation memory)")
    for name, limit in limits.items():
        if name not in cost.COSTS:
            raise ValueError(f"unknown limit {name!r}; the limits are {', '.join(cost.COSTS)}")
        cost.validate_budget(limit)
    return limits


def check_budget(budget, specs: tuple[cost.LayerSpec, ...], *, activation_reduce="max") -> None:
    """Raise a clear error for a limit that is not a positive finite number, or infeasible.

    ``budget``: the BOP budget, or ``{cost name: limit}`` (:func:`limits_of`). Each limit is
    checked against its own minimum (all quantizers at their minimum bit-widths, which
    minimises every cost at once).
    """
    limits = limits_of(budget)
    minimum = cost.min_costs(specs, activation_reduce=activation_reduce)
    at = _PRUNED_MINIMUM if cost.is_pruning(specs) else None
    for name, limit in limits.items():
        require_feasible(limit, minimum[name], name=name, at=at)


_MINIMUM = "every quantizer at its minimum bit-width"
_PRUNED_MINIMUM = (
    "every quantizer at its minimum bit-width, every pruning layer down to one channel"
)


def require_feasible(
    budget: float, minimum: int, *, name: str | None = None, at: str | None = None
) -> None:
    """Raise :class:`InfeasibleBudgetError`, stating both numbers, if ``budget < minimum``.

    ``minimum`` is the network's cost with every quantizer at its minimum bit-width;
    ``name`` the cost (:data:`LIMIT_FLAGS`; default BOPs); ``at`` what the minimum is (the
    message's words; by default every quantizer at its minimum bit-width).
    """
    if budget >= minimum:
        return
    at = at or _MINIMUM
    if name in (None, "bops"):
        raise InfeasibleBudgetError(
            f"budget {budget:,.0f} BOPs is infeasible: the minimum achievable cost of this "
            f"network ({at}) is {minimum:,} BOPs; "
            f"use --budget_bops {minimum:.4g} or more"
        )
    if name in LIMIT_FLAGS:
        flag, unit, per_unit = LIMIT_FLAGS[name]
        least = -(-minimum * 1000 // per_unit) / 1000  # rounded up to 1/1000 of a unit
        raise InfeasibleBudgetError(
            f"{name} limit {budget:,.0f} bits is infeasible: the minimum achievable "
            f"{name} of this network ({at}) is "
            f"{minimum:,} bits ({minimum / per_unit:,.3f} {unit}); use {flag} {least:g} or more"
        )
    raise InfeasibleBudgetError(
        f"constraint {name!r}: budget {budget:,.6g} is infeasible: its minimum ({at}) is "
        f"{minimum:,.6g}"
    )


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


def _violation(costs: dict, limits: dict) -> float:
    """The normalised total violation ``sum_j max(0, C_j - B_j) / B_j``."""
    return sum(max(0, costs[name] - limit) / limit for name, limit in limits.items())


def greedy_repair(params, specs: tuple[cost.LayerSpec, ...], budget, *, activation_reduce="max"):
    """Lower bits one at a time, where each bit helps most, until every limit holds.

    ``budget``: the BOP budget, or ``{cost name: limit}`` (:func:`limits_of`). Each step
    lowers by one bit the quantizer (or channel) whose decrement most reduces the normalised
    total violation ``sum_j max(0, C_j - B_j) / B_j`` (docs/method.md section 8); ties go to the
    decrement that saves most of the violated costs in their sum form (so that lowering one
    of two equally large activations counts). It sets the quantizer's ``q_max`` to the
    largest value with one bit fewer at the same step. It ends in at most (sum of bits
    above the floors) steps because the minimum-bit network meets every limit (checked by
    :func:`check_budget`).

    Returns:
      ``(params, steps)``: the repaired parameters and the number of bits removed.
    """
    limits = limits_of(budget)
    check_budget(limits, specs, activation_reduce=activation_reduce)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    steps = 0
    while True:
        table = cost.layer_table(flax.traverse_util.unflatten_dict(flat), specs)
        costs = _costs_of(table, activation_reduce)
        if _violation(costs, limits) == 0:
            return flax.traverse_util.unflatten_dict(flat), steps
        violated = [name for name, limit in limits.items() if costs[name] > limit]

        sizes = [row["activation_bits"] for row in table]

        def score(candidate, costs=costs, sizes=sizes, violated=violated):
            after = _costs_after(costs, sizes, candidate, activation_reduce)
            direct = sum(candidate.savings[name] / limits[name] for name in violated)
            return (-_violation(after, limits), direct)

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
    limit). One more bit halves a quantizer's quantization error wherever it is, but it
    matters most at few bits (1 -> 2 bits, not 8 -> 9). The quantizer's power-of-two step is
    halved and its range ``q_max`` kept, so it gains exactly one bit of resolution.
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
        before = _costs_of(cost.layer_table(current, specs), activation_reduce)
        best, best_key = None, None
        for path, signed, prune in _learned_quantizers(specs):
            leaf = jnp.asarray(flat[path])
            bits = int(
                np.max(quantizer.exact_bitwidth(*quantizer.from_latents(leaf), signed=signed))
            )
            if bits >= MAX_FILL_BITS:
                continue
            trial = {**flat, path: _halve_step(leaf, prune=prune)}
            table = cost.layer_table(flax.traverse_util.unflatten_dict(trial), specs)
            after = _costs_of(table, activation_reduce)
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


def _learned_quantizers(specs):
    """``(path, signed, prune)`` of every quantizer leaf whose bit-width is learned."""
    for spec in specs:
        if not spec.quantized:
            continue
        if spec.weight_bits is None:
            yield (*spec.path, "weight_quantizer"), spec.weight_signed, spec.prune
        if spec.input_bits is None:
            yield (*spec.path, "input_quantizer"), spec.input_signed, False


@functools.partial(jax.jit, static_argnames="prune")
def _halve_step(theta: jax.Array, *, prune: bool = False) -> jax.Array:
    """The leaf with its power-of-two step halved (the latent at the new step's centre) and
    its range kept: twice the levels, one more bit. A removed channel (``prune``) stays
    removed: its range goes to a quarter of its new step."""
    d, q_max = quantizer.from_latents(theta)
    step = jnp.log2(quantizer.power_of_two_step(d)) - 1.0
    halved = theta.at[..., 0].set(step)
    if not prune:
        return halved
    removed = quantizer.levels(d, q_max, prune=True) == 0
    return halved.at[..., 1].set(
        jnp.where(removed, step + quantizer.PRUNED_RANGE_LOG2, theta[..., 1])
    )


def _costs_of(table: list[dict], activation_reduce: str) -> dict:
    sizes = [row["activation_bits"] for row in table]
    return {
        "bops": sum(row["bops"] for row in table),
        "weight_memory_bits": sum(row["weight_memory_bits"] for row in table),
        "activation_bits": max(sizes) if activation_reduce == "max" else sum(sizes),
    }


def _costs_after(costs: dict, sizes: list, decrement, activation_reduce: str) -> dict:
    """``_costs_of(decrement.table_after(table))`` from the table's ``costs`` and its rows'
    ``activation_bits`` (``sizes``), without copying the table (the repair scores every
    candidate decrement at every step)."""
    after = {name: costs[name] - decrement.savings[name] for name in ("bops", "weight_memory_bits")}
    saved = decrement.savings["activation_bits"]
    if activation_reduce != "max":
        after["activation_bits"] = costs["activation_bits"] - saved
    elif saved == 0:
        after["activation_bits"] = costs["activation_bits"]
    else:
        rest = sizes[: decrement.index] + sizes[decrement.index + 1 :]
        after["activation_bits"] = max([sizes[decrement.index] - saved, *rest])
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

    def table_after(self, table: list[dict]) -> list[dict]:
        row = dict(table[self.index])
        for name in ("bops", "weight_memory_bits", "activation_bits"):
            row[name] = row[name] - self.savings[name]
        return [*table[: self.index], row, *table[self.index + 1 :]]


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


def cost_report(
    params, specs: tuple[cost.LayerSpec, ...], budget, *, activation_reduce="max"
) -> dict:
    """Exact costs, per-layer bits and MACs, and every limit's verdict.

    ``budget``: the BOP budget, ``{cost name: limit}`` (:func:`limits_of`), or ``None``.
    ``params=None`` reports the float network (32-bit weights and inputs).

    Returns ``budget_bops`` / ``bops`` / ``within_budget`` (every limit holds) as before,
    ``weight_memory_bits`` and ``activation_bits`` (exact, bits per example), and
    ``limits``: ``{name: {"limit", "cost", "minimum", "within"}}`` for each limit given;
    ``relative_bops_percent`` (of the 32x32-bit cost) and ``relative_bops_percent_input8``
    (the same with the network input counted at 8 bits, Bayesian Bits' convention);
    ``one_more_bit_bops`` (:func:`one_more_bit_bops`).
    """
    if params is None:
        table = [
            {
                "layer": spec.name,
                "macs": spec.macs,
                "weight_bits": cost.FLOAT_BITS,
                "input_bits": cost.FLOAT_BITS,
                "bops": spec.macs * cost.FLOAT_BITS**2,
                "weight_memory_bits": (spec.weights + spec.biases) * cost.FLOAT_BITS,
                "activation_bits": spec.input_elements * cost.FLOAT_BITS,
            }
            for spec in specs
        ]
    else:
        table = cost.layer_table(params, specs)
    limits = {} if budget is None else limits_of(budget)
    costs = _costs_of(table, activation_reduce)
    minimum = cost.min_costs(specs, activation_reduce=activation_reduce)
    verdicts = {
        name: {
            "limit": limit,
            "cost": costs[name],
            "minimum": minimum[name],
            "within": costs[name] <= limit,
        }
        for name, limit in limits.items()
    }
    return {
        "budget_bops": limits.get("bops"),
        "bops": costs["bops"],
        "within_budget": bool(limits) and all(v["within"] for v in verdicts.values()),
        "weight_memory_bits": costs["weight_memory_bits"],
        "activation_bits": costs["activation_bits"],
        "activation_reduce": activation_reduce,
        "limits": verdicts,
        "relative_bops_percent": cost.relative_bops(costs["bops"], specs),
        # Bayesian Bits' convention: the network input counted at 8 bits.
        "relative_bops_percent_input8": cost.relative_bops(cost.bops_with_input_at(table), specs),
        "float_bops": cost.float_bops(specs),
        "min_cost_bops": minimum["bops"],
        "one_more_bit_bops": None if params is None else one_more_bit_bops(specs, table),
        "layers": table,
    }


class CertificateRefused(AssertionError):
    """A model that must not be certified: over budget, non-finite, or below the minimum."""


def certify(
    params,
    specs: tuple[cost.LayerSpec, ...],
    budget,
    *,
    activation_reduce="max",
    float_accuracy: float | None = None,
    accuracy: float | None = None,
) -> dict:
    """The certificate of a model: :func:`cost_report`, asserting every limit holds.

    ``budget``: the BOP budget, or ``{cost name: limit}`` (:func:`limits_of`).

    Given the float network's ``float_accuracy`` and this model's ``accuracy`` (fractions,
    on the same validation set), the certificate also says whether the model collapsed:
    ``"collapsed"`` and ``"collapse"`` (:func:`collapse_check`). A collapsed model is still
    certified (its cost is what it is), but it is not a result.

    Raises:
      CertificateRefused: (an ``AssertionError``) if any parameter or quantizer latent is
        not finite, if the exact cost is below the network's minimum cost (the latents are
        broken), or if any limit is exceeded (never for a repaired model).

    Examples:
      >>> import jax
      >>> from cgmq_jax import certify, cost, models
      >>> model = models.MLP(hidden=(), num_classes=4)  # one dense layer, 16 -> 4
      >>> x = jax.numpy.ones((1, 4, 4, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]  # quantizers start at 8 bits
      >>> specs = cost.layer_specs(model, x)
      >>> report = certify.certify(params, specs, 5000)  # 64 MACs * 8 * 8 = 4096 BOPs
      >>> report["bops"], report["within_budget"], report["weight_memory_bits"]
      (4096, True, 640)
      >>> limits = {"bops": 5000, "weight_memory_bits": 600}  # 64 * 8 + 4 * 32 bits > 600
      >>> certify.certify(params, specs, limits)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      cgmq_jax.certify.CertificateRefused: ... over a limit: weight_memory_bits 640 > 600
    """
    bad = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if not bool(jnp.all(jnp.isfinite(jnp.asarray(leaf))))
    ]
    if bad:
        raise CertificateRefused(f"certificate refused: non-finite parameters in {', '.join(bad)}")
    report = cost_report(params, specs, budget, activation_reduce=activation_reduce)
    if report["bops"] < report["min_cost_bops"]:
        raise CertificateRefused(
            f"certificate refused: exact cost {report['bops']:,} is below the network's "
            f"minimum {report['min_cost_bops']:,}; the quantizer latents are broken"
        )
    over = [
        f"{name} {v['cost']:,} > {v['limit']:,.0f}"
        for name, v in report["limits"].items()
        if not v["within"]
    ]
    if over:
        if list(report["limits"]) == ["bops"]:
            raise CertificateRefused(
                f"certificate refused: exact cost {report['bops']:,} > budget "
                f"{report['budget_bops']:,.0f}"
            )
        raise CertificateRefused(f"certificate refused: over a limit: {'; '.join(over)}")
    if float_accuracy is not None and accuracy is not None:
        with_collapse(report, float_accuracy, accuracy)
    return report


def with_collapse(report: dict, float_accuracy: float, accuracy: float) -> dict:
    """``report`` (a :func:`cost_report` / :func:`certify` result) with ``"collapse"``
    (:func:`collapse_check`) and ``"collapsed"`` added, in place; returned."""
    report["collapse"] = collapse_check(report, float_accuracy, accuracy)
    report["collapsed"] = report["collapse"]["collapsed"]
    return report


#: A quantized model whose validation accuracy is more than this many points (percent)
#: below its float network's has collapsed.
COLLAPSE_POINTS = 5.0


def collapse_check(report: dict, float_accuracy: float, accuracy: float) -> dict:
    """Whether a model collapsed: its accuracy more than :data:`COLLAPSE_POINTS` points below
    the float network's (both fractions, on the same validation set).

    ``report`` is a :func:`cost_report` / :func:`certify` result. The returned dict holds
    ``collapsed``, both accuracies, the drop in points, the rule, the *binding* limit (the
    one set closest to its minimum, as a multiple of it) and ``message``, one line that says
    what happened and what to do.

    Examples:
      >>> report = {"limits": {"bops": {"limit": 4e6, "minimum": 2403456, "cost": 3932928}}}
      >>> check = collapse_check(report, float_accuracy=0.8896, accuracy=0.3663)
      >>> check["collapsed"], check["binding"]["name"], round(check["binding"]["times_minimum"], 2)
      (True, 'bops', 1.66)
      >>> collapse_check(report, 0.8896, 0.86)["collapsed"]
      False
    """
    drop = 100.0 * (float(float_accuracy) - float(accuracy))
    collapsed = drop > COLLAPSE_POINTS
    limits = report.get("limits") or {}
    binding = None
    if limits:
        name, verdict = min(
            limits.items(), key=lambda item: item[1]["limit"] / max(item[1]["minimum"], 1)
        )
        binding = {
            "name": name,
            "limit": verdict["limit"],
            "minimum": verdict["minimum"],
            "times_minimum": verdict["limit"] / max(verdict["minimum"], 1),
        }
    message = (
        f"validation accuracy {100 * accuracy:.2f}% is {drop:.2f} points below the float "
        f"network's {100 * float_accuracy:.2f}%"
    )
    if collapsed:
        message = f"COLLAPSED: {message} (more than {COLLAPSE_POINTS:g} points)"
        if binding is not None:
            message += (
                f"; the binding limit {binding['name']} {binding['limit']:,.0f} is "
                f"{binding['times_minimum']:.2f}x its minimum {binding['minimum']:,}: raise it, "
                "or train longer"
            )
        message += ". The model is certified within its limits but is not a usable result."
    return {
        "collapsed": collapsed,
        "float_accuracy": float(float_accuracy),
        "accuracy": float(accuracy),
        "drop_points": drop,
        "rule": f"collapsed when more than {COLLAPSE_POINTS:g} points below the float network",
        "binding": binding,
        "message": message,
    }
