"""The certificate of a quantized model (docs/method.md section 4): its exact costs, every
limit's verdict, and whether it collapsed.

Everything here is exact: bit-widths are integers and costs are Python integers. The
limits and their feasibility are :mod:`cgmq_jax.limits`; repairing and filling a model to
its limits is :mod:`cgmq_jax.repair`. The names that lived here before (``limits_of``,
``check_budget``, ``InfeasibleBudgetError``, ``greedy_repair``, ...) still resolve, with
a ``DeprecationWarning`` naming their module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cgmq_jax import _deprecated, cost, repair
from cgmq_jax import limits as _limits

#: Names that moved out of this module: ``{name: its module}``.
_MOVED = {
    **dict.fromkeys(
        (
            "InfeasibleBudgetError",
            "LIMIT_FLAGS",
            "limits_from_flags",
            "limits_of",
            "check_budget",
            "require_feasible",
        ),
        "cgmq_jax.limits",
    ),
    **dict.fromkeys(
        ("greedy_repair", "greedy_fill", "MAX_FILL_BITS", "one_more_bit_bops"), "cgmq_jax.repair"
    ),
}


__getattr__ = _deprecated.moved("cgmq_jax.certify", _MOVED)


def cost_report(
    params, specs: tuple[cost.LayerSpec, ...], budget, *, activation_reduce="max"
) -> dict:
    """Exact costs, per-layer bits and MACs, and every limit's verdict.

    ``budget``: the BOP budget, ``{cost name: limit}``
    (:func:`cgmq_jax.limits.limits_of`), or ``None``.
    ``params=None`` reports the float network (32-bit weights and inputs).

    Returns ``budget_bops`` / ``bops`` / ``within_budget`` (every limit holds) as before,
    ``weight_memory_bits`` and ``activation_bits`` (exact, bits per example), and
    ``limits``: ``{name: {"limit", "cost", "minimum", "within"}}`` for each limit given;
    ``relative_bops_percent`` (of the 32x32-bit cost) and ``relative_bops_percent_input8``
    (the same with the network input counted at 8 bits, Bayesian Bits' convention);
    ``one_more_bit_bops`` (:func:`cgmq_jax.repair.one_more_bit_bops`).
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
    limits = {} if budget is None else _limits.limits_of(budget)
    costs = cost.table_costs(table, activation_reduce)
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
        "one_more_bit_bops": None if params is None else repair.one_more_bit_bops(specs, table),
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

    ``budget``: the BOP budget, or ``{cost name: limit}`` (:func:`cgmq_jax.limits.limits_of`).

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
