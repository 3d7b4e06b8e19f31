"""The budget guarantee made real (CGMQ.md section 4): feasibility check, repair, certificate.

Everything here is exact: bit-widths are integers and costs are Python integers.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from cgmq_jax import cost, quantizer


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest cost the network can have."""


def check_budget(budget: float, specs: tuple[cost.LayerSpec, ...]) -> None:
    """Raise a clear error for a budget that is not a positive finite number, or infeasible."""
    cost.validate_budget(budget)
    require_feasible(budget, cost.min_cost(specs))


def require_feasible(budget: float, minimum: int) -> None:
    """Raise :class:`InfeasibleBudgetError`, stating both numbers, if ``budget < minimum``.

    ``minimum`` is the network's cost with every quantizer at its minimum bit-width.
    """
    if budget < minimum:
        raise InfeasibleBudgetError(
            f"budget {budget:,.0f} BOPs is infeasible: the minimum achievable cost of this "
            f"network (every quantizer at its minimum bit-width) is {minimum:,} BOPs; "
            f"use --budget_bops {minimum:.4g} or more"
        )


def _set_bits(theta: jax.Array, bits: int, *, signed: bool) -> jax.Array:
    """The leaf with ``q_max`` at the largest value that gives ``bits`` bits at the same step."""
    d, _ = quantizer.from_latents(theta)
    d_q = quantizer.power_of_two_step(d)
    top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return theta.at[..., 1].set(jnp.log2(top * d_q))


def greedy_repair(params, specs: tuple[cost.LayerSpec, ...], budget: float):
    """Lower bits one at a time, where each bit saves most, until the exact cost fits.

    Each step lowers by one bit the quantizer whose decrement saves the most BOPs, by
    setting its ``q_max`` to the largest value with one bit fewer at the same step. It
    ends in at most (sum of bits above the floors) steps because the minimum-bit network is
    feasible (checked by :func:`check_budget`).

    Returns:
      ``(params, steps)``: the repaired parameters and the number of bits removed.
    """
    check_budget(budget, specs)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    steps = 0
    while True:
        table = cost.layer_table(flax.traverse_util.unflatten_dict(flat), specs)
        if sum(row["bops"] for row in table) <= budget:
            return flax.traverse_util.unflatten_dict(flat), steps
        best = max(_decrements(specs, table), key=lambda candidate: candidate[0])
        _, path, channel, bits, signed = best
        leaf = jnp.asarray(flat[path])
        if channel is None:
            flat[path] = _set_bits(leaf, bits, signed=signed)
        else:
            flat[path] = leaf.at[channel].set(_set_bits(leaf[channel], bits, signed=signed))
        steps += 1


def _decrements(specs, table):
    """Every one-bit decrement of a learned quantizer above its floor, with its saving:
    ``(saving, leaf path, channel or None, new bits, signed)``."""
    for spec, row in zip(specs, table, strict=True):
        if not spec.quantized:
            continue
        per_channel_macs = spec.macs // spec.channels
        weight_bits = row["weight_bits"]
        channels = weight_bits if isinstance(weight_bits, list) else [weight_bits]
        floor = quantizer.min_bitwidth(signed=spec.weight_signed)
        if spec.weight_bits is None:
            for c, bits in enumerate(channels):
                if bits > floor:
                    channel = c if isinstance(weight_bits, list) else None
                    path = (*spec.path, "weight_quantizer")
                    yield (per_channel_macs * row["input_bits"], path, channel, bits - 1, True)
        floor = quantizer.min_bitwidth(signed=spec.input_signed)
        if spec.input_bits is None and row["input_bits"] > floor:
            path = (*spec.path, "input_quantizer")
            saving = per_channel_macs * sum(channels)
            yield (saving, path, None, row["input_bits"] - 1, spec.input_signed)


def cost_report(params, specs: tuple[cost.LayerSpec, ...], budget: float | None) -> dict:
    """Exact cost, per-layer bits and MACs, and whether ``C <= budget``.

    ``params=None`` reports the float network (32-bit weights and inputs).
    """
    if params is None:
        table = [
            {
                "layer": spec.name,
                "macs": spec.macs,
                "weight_bits": cost.FLOAT_BITS,
                "input_bits": cost.FLOAT_BITS,
                "bops": spec.macs * cost.FLOAT_BITS**2,
            }
            for spec in specs
        ]
    else:
        table = cost.layer_table(params, specs)
    total = sum(row["bops"] for row in table)
    return {
        "budget_bops": budget,
        "bops": total,
        "within_budget": budget is not None and total <= budget,
        "relative_bops_percent": cost.relative_bops(total, specs),
        "float_bops": cost.float_bops(specs),
        "min_cost_bops": cost.min_cost(specs),
        "layers": table,
    }


class CertificateRefused(AssertionError):
    """A model that must not be certified: over budget, non-finite, or below the minimum."""


def certify(params, specs: tuple[cost.LayerSpec, ...], budget: float) -> dict:
    """The certificate of a model: :func:`cost_report`, asserting ``C <= budget``.

    Raises:
      CertificateRefused: (an ``AssertionError``) if any parameter or quantizer latent is
        not finite, if the exact cost is below the network's minimum cost (the latents are
        broken), or if it exceeds the budget (never for a repaired model).
    """
    bad = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if not bool(jnp.all(jnp.isfinite(jnp.asarray(leaf))))
    ]
    if bad:
        raise CertificateRefused(f"certificate refused: non-finite parameters in {', '.join(bad)}")
    report = cost_report(params, specs, budget)
    if report["bops"] < report["min_cost_bops"]:
        raise CertificateRefused(
            f"certificate refused: exact cost {report['bops']:,} is below the network's "
            f"minimum {report['min_cost_bops']:,}; the quantizer latents are broken"
        )
    if not report["within_budget"]:
        raise CertificateRefused(
            f"certificate refused: exact cost {report['bops']:,} > budget {budget:,.0f}"
        )
    return report
