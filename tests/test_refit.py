"""Least-squares ranges at a kept bit-width (docs/method.md section 10, the DS-CNN): the
range of a quantizer refitted without changing its bits, so without changing any cost."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cgmq_jax import constraint, cost, quantizer
from cgmq_jax import nn as cnn


def _squared_error(x, theta, *, signed):
    d, q_max = quantizer.from_latents(theta)
    if jnp.ndim(d):
        shape = (1,) * (x.ndim - 1) + (-1,)
        d, q_max = jnp.reshape(d, shape), jnp.reshape(q_max, shape)
    return float(jnp.sum(jnp.square(quantizer.fake_quant(x, d, q_max, signed=signed) - x)))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_least_squares_latents_keep_the_bits_and_beat_the_max_range(bits, signed):
    if signed and bits < 2:
        pytest.skip("signed quantizers have at least 2 bits")
    x = jax.random.normal(jax.random.key(bits), (4096,), jnp.float32)
    x = x if signed else jnp.maximum(x, 0.0)
    theta = quantizer.least_squares_latents(x, bits, signed=signed)
    assert theta.shape == (2,)
    assert int(quantizer.exact_bitwidth(*quantizer.from_latents(theta), signed=signed)) == bits
    at_max = quantizer.latents(*quantizer.init_at_bits(jnp.max(jnp.abs(x)), bits, signed=signed))
    assert _squared_error(x, theta, signed=signed) <= _squared_error(x, at_max, signed=signed)
    if bits <= 2:  # at max|x| most values round to zero; the least-squares range keeps them
        assert _squared_error(x, theta, signed=signed) < 0.9 * _squared_error(
            x, at_max, signed=signed
        )


def test_least_squares_latents_per_channel_keep_each_channels_bits():
    scales = jnp.asarray([[[[0.01, 0.1, 1.0, 10.0]]]])
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 1, 4)) * scales
    bits = jnp.asarray([2, 3, 4, 8], jnp.int32)
    theta = quantizer.least_squares_latents(kernel, bits, signed=True, per_channel=True)
    assert theta.shape == (4, 2)
    got = quantizer.exact_bitwidth(*quantizer.from_latents(theta), signed=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(bits))
    # each channel's step follows its own scale
    steps = np.exp2(np.asarray(theta[:, 0]))
    assert steps[0] < steps[1] < steps[3]


def test_refit_ranges_keeps_every_cost(lenet, calibration_batch):
    model, specs = lenet["model"], lenet["specs"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            quantizer.at_min_bitwidth(leaf) if quantizer.is_quantizer_path(path) else leaf
        ),
        lenet["params8"],
    )
    refitted = cnn.refit_ranges(model, params, calibration_batch[:64])
    assert cost.exact_costs(refitted, specs) == cost.exact_costs(params, specs)
    assert cost.layer_table(refitted, specs) == cost.layer_table(params, specs)
    before = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    after = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(refitted)}
    assert before.keys() == after.keys()
    changed = [k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))]
    assert changed  # the ranges at the floor did move
    assert all(k.endswith("_quantizer']") for k in changed)


def test_refit_lost_weight_ranges_keeps_the_cost_and_refits_only_lost_bits(lenet):
    specs, params = lenet["specs"], lenet["params8"]
    cost_fn = functools.partial(cost.bops, specs=specs)
    tx = constraint.constrained_update(cost_fn, 1e6, refit_weight_ranges=True)
    plain = constraint.constrained_update(cost_fn, 1e6)
    zero = jax.tree.map(jnp.zeros_like, params)
    out, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    ref, _ = jax.jit(plain.update)(zero, plain.init(params), params)
    new, old = optax.apply_updates(params, out), optax.apply_updates(params, ref)
    assert cost.layer_table(new, specs) == cost.layer_table(old, specs)
    assert cost.exact_bops(new, specs) < cost.exact_bops(params, specs)  # a bit was lost
    for layer in params:
        for name in ("kernel", "bias", "input_quantizer"):
            np.testing.assert_array_equal(
                np.asarray(new[layer][name]), np.asarray(old[layer][name])
            )
        lost = cost.layer_table(new, specs)[[s.path[0] for s in specs].index(layer)]
        kept = cost.layer_table(params, specs)[[s.path[0] for s in specs].index(layer)]
        if lost["weight_bits"] == kept["weight_bits"]:
            np.testing.assert_array_equal(
                np.asarray(new[layer]["weight_quantizer"]),
                np.asarray(old[layer]["weight_quantizer"]),
            )
        else:
            expected = quantizer.least_squares_latents(
                params[layer]["kernel"], lost["weight_bits"], signed=True
            )
            np.testing.assert_allclose(
                np.asarray(new[layer]["weight_quantizer"]), np.asarray(expected), atol=1e-5
            )


@pytest.mark.slow
def test_a_run_with_refit_ranges_refits_and_stays_within_budget(
    tmp_path, tiny_mnist, monkeypatch, standard_promotion_fixture
):
    import json

    import flax
    from conftest import load_cli

    from cgmq_jax import data

    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    flags = ["--epochs", "3", "--pretrain_epochs", "2", "--batch_size", "32", "--lr", "3e-3"]
    flags += ["--budget_bops", "2e6", "--fill_epochs", "0"]
    cli = load_cli("mnist")
    assert cli.main([*flags, "--refit_ranges", "--out", str(tmp_path / "r")]) == 0
    assert cli.main([*flags, "--no-refit_ranges", "--out", str(tmp_path / "n")]) == 0
    results = {k: json.loads((tmp_path / k / "results.json").read_text()) for k in "rn"}
    assert results["r"]["within_budget"] and results["r"]["flags"]["refit_ranges"]
    qat = [row for row in results["r"]["history"] if row["phase"] == "qat"]
    assert qat[-1]["within_budget"]
    leaves = {}
    for k in "rn":
        raw = (tmp_path / k / "params.msgpack").read_bytes()
        flat = flax.traverse_util.flatten_dict(flax.serialization.msgpack_restore(raw))
        leaves[k] = {p: v for p, v in flat.items() if p[-1].endswith("quantizer")}
    # The refitted ranges are not the calibrated ones the plain run keeps.
    assert any(not np.array_equal(leaves["r"][p], leaves["n"][p]) for p in leaves["n"])


def test_the_runs_input_refit_refits_exactly_the_inputs_that_lost_bits(
    lenet, calibration_batch
):
    """``fit``'s jitted input refit against the eager :func:`cgmq_jax.nn.refit_ranges` of
    the one layer whose input lost bits."""
    from types import SimpleNamespace

    from cgmq_jax.runs import fit

    model, specs, old = lenet["model"], lenet["specs"], lenet["params8"]
    layer = specs[1].path[0]
    new = jax.tree.map(lambda x: x, old)
    new[layer] = {
        **new[layer],
        "input_quantizer": quantizer.at_min_bitwidth(old[layer]["input_quantizer"]),
    }
    images = calibration_batch[: fit.REFIT_EXAMPLES]
    input_bits, refit = fit._input_refit(SimpleNamespace(specs=specs, model=model), images)
    lost = np.asarray(input_bits(new)) < np.asarray(input_bits(old))
    assert lost.tolist() == [s.path[0] == layer for s in specs]  # LeNet-5: all learned

    refitted = refit(new, lost)
    expected = cnn.refit_ranges(model, new, images, weights=False, layers=[(layer,)])
    np.testing.assert_allclose(
        np.asarray(refitted[layer]["input_quantizer"]),
        np.asarray(expected[layer]["input_quantizer"]),
        atol=1e-6,
    )
    assert not np.array_equal(
        np.asarray(refitted[layer]["input_quantizer"]), np.asarray(new[layer]["input_quantizer"])
    )
    assert cost.layer_table(refitted, specs) == cost.layer_table(new, specs)  # same bits
    for path, leaf in jax.tree_util.tree_leaves_with_path(new):
        if path[0].key != layer or path[1].key != "input_quantizer":
            got = refitted[path[0].key][path[1].key]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
