"""The limits a network must meet: what a limit is, its flag, and whether it is feasible.

A limit binds one of :data:`cgmq_jax.cost.COSTS` (BOPs, weight memory, the largest or the
total activation, in bits per example). :func:`check_budget` is the one feasibility check:
every limit against the network's own minimum (every quantizer at its minimum bit-width),
raising :class:`InfeasibleBudgetError` with that minimum and the flag that fixes it.
Moving bits to meet the limits is :mod:`cgmq_jax.repair`; the certificate that says they
hold is :mod:`cgmq_jax.certify`.
"""

from __future__ import annotations

from cgmq_jax import cost


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


def violation(costs: dict, limits: dict) -> float:
    """The normalised total violation ``sum_j max(0, C_j - B_j) / B_j``."""
    return sum(max(0, costs[name] - limit) / limit for name, limit in limits.items())
