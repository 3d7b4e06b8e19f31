"""Why the DS-CNN does not train at a tight budget: its float network, folded, quantized at
uniform bit-widths and evaluated without any QAT, with per-layer statistics.

    python experiments/diagnose_dscnn.py [--train_examples 10000] [--pretrain_epochs 3]
    python experiments/diagnose_dscnn.py --qat [--method cgmq] [--refit both] ...

Prints per layer the spread of the folded kernel's per-output-channel ranges (max over min
of max|W|) and the fraction of weights that round to zero at 2 bits with the range at
max|W| (what ``init_quantizers`` gives and the constraint keeps while it coarsens the
step); then, for uniform weight/input bits, the validation accuracy of the quantized float
network with no QAT, and at 2-bit weights with each kernel's least-squares range instead.
The numbers are in docs/results.md (DS-CNN).

With ``--qat``: a short QAT run instead, from a float network trained once (cached under
``--cache``), printing every ``--every`` steps the mean loss, the exact BOPs and each
layer's weight/input bits, and the validation accuracy after each epoch: CGMQ under
``--budget`` or fixed bits (``--bits_w`` / ``--bits_a``, or one ``--alloc`` per layer),
with ranges of least squared error at the start (``--least_squares_init``) and/or
refitted where bits are lost (``--refit``: ``weights`` by the optimizer,
``constraint.constrained_update(refit_weight_ranges=True)``; ``inputs`` after each step
that lost an input bit, ``calibration.refit_ranges`` on 512 calibration images). The trainer does
both with ``experiments/mnist.py --refit_ranges``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax.numpy as jnp
import numpy as np

UNIFORM_BITS = ((8, 8), (4, 4), (3, 3), (2, 2), (2, 8), (8, 2), (8, 1), (3, 1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", help="the dataset")
    p.add_argument("--train_examples", type=int, default=10000, help="training examples used")
    p.add_argument("--pretrain_epochs", type=int, default=3, help="float epochs")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--qat", action="store_true", help="a short QAT run (below)")
    p.add_argument("--method", default="cgmq", choices=("cgmq", "fixed"))
    p.add_argument("--epochs", type=int, default=3, help="QAT epochs (--qat)")
    p.add_argument("--budget", type=float, default=4e6, help="BOP budget (cgmq)")
    p.add_argument("--bits_w", type=int, default=4, help="fixed: weight bits")
    p.add_argument("--bits_a", type=int, default=4, help="fixed: input bits")
    p.add_argument("--alloc", default="", help='fixed: "w/a w/a ..." one per layer')
    p.add_argument("--least_squares_init", action="store_true", help="ranges at the start")
    p.add_argument(
        "--refit", default="none", choices=("none", "weights", "inputs", "both"),
        help="ranges refitted where bits are lost",
    )  # fmt: skip
    p.add_argument("--quantizer_lr", type=float, default=1e-2)
    p.add_argument("--every", type=int, default=10, help="steps between lines")
    p.add_argument("--cache", default="/tmp/cgmq_diagnose_dscnn", help="float networks")
    args = p.parse_args(argv)
    if args.qat:
        return _qat(args)

    from cgmq_jax import data, models
    from cgmq_jax.calibration import init_quantizers
    from cgmq_jax.runs import train

    dataset = data.load(args.dataset)
    dataset = dataclasses.replace(
        dataset, train=tuple(a[: args.train_examples] for a in dataset.train)
    )
    config = train.TrainConfig(
        model="dscnn", method="float", epochs=args.pretrain_epochs, pretrain_epochs=0,
        budget_bops=None, seed=args.seed,
    )  # fmt: skip
    result = train.fit(config, dataset, log=lambda *_: None)
    print(
        f"float DS-CNN, {args.pretrain_epochs} epochs on {args.train_examples} examples: "
        f"test {100 * result.test_accuracy:.2f}%"
    )
    images = jnp.asarray(dataset.train[0][:2048])
    float_model = models.get_model("dscnn", quantized=False)
    folded = models.fold_batchnorm(float_model, result.params, images[:1])
    for name, layer in folded.items():
        kernel = np.abs(np.asarray(layer["kernel"]))
        ranges = kernel.reshape(-1, kernel.shape[-1]).max(axis=0)
        # 2-bit signed, range max|W|: levels -max, 0, max; below max / 2 rounds to 0.
        zero = np.mean(kernel < 0.5 * kernel.max())
        print(
            f"  {name:5s} per-channel max|W| spread {ranges.max() / max(ranges.min(), 1e-12):5.1f}x"
            f"  weights rounding to 0 at 2 bits {100 * zero:5.1f}%"
        )
    model = models.folded(models.get_model("dscnn"))
    accuracy = train.make_accuracy(model)
    for bits_w, bits_a in UNIFORM_BITS:
        params = init_quantizers(model, folded, images, input_bits=bits_a, weight_bits=bits_w)
        print(
            f"  W{bits_w}A{bits_a}: validation "
            f"{100 * accuracy(params, *dataset.validation):.2f}% (no QAT)"
        )
    for bits_a in (8, 2):
        params = init_quantizers(model, folded, images, input_bits=bits_a, weight_bits=2)
        for layer in params.values():
            layer["weight_quantizer"] = _least_squares_two_bits(np.asarray(layer["kernel"]))
        print(
            f"  W2A{bits_a}, weight ranges of least squared error: validation "
            f"{100 * accuracy(params, *dataset.validation):.2f}% (no QAT)"
        )
    return 0


def _float_network(args, dataset):
    """The float DS-CNN's variables after ``--pretrain_epochs``, trained once per setup."""
    import os
    import pickle

    import jax

    from cgmq_jax.runs import train

    os.makedirs(args.cache, exist_ok=True)
    name = f"{args.dataset}_{args.train_examples}_{args.pretrain_epochs}_{args.seed}.pkl"
    path = os.path.join(args.cache, name)
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    config = train.TrainConfig(
        model="dscnn", method="float", epochs=args.pretrain_epochs, pretrain_epochs=0,
        budget_bops=None, seed=args.seed,
    )  # fmt: skip
    variables = jax.device_get(train.fit(config, dataset, log=print).params)
    with open(path, "wb") as f:
        pickle.dump(variables, f)
    return variables


def _qat(args) -> int:
    """The short QAT run of ``--qat`` (the module's docstring)."""
    import time

    import flax

    from cgmq_jax import cost, data, quantizer
    from cgmq_jax.calibration import refit_ranges
    from cgmq_jax.runs import setup as run_setup
    from cgmq_jax.runs import steps, train

    dataset = data.load(args.dataset)
    dataset = dataclasses.replace(
        dataset, train=tuple(a[: args.train_examples] for a in dataset.train)
    )
    variables = _float_network(args, dataset)
    config = train.TrainConfig(
        model="dscnn", method=args.method, epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs, seed=args.seed,
        budget_bops=args.budget if args.method == "cgmq" else None,
        bits_w=args.bits_w, bits_a=args.bits_a, quantizer_lr=args.quantizer_lr,
        refit_ranges=args.refit in ("weights", "both"),  # the weights' refit, in the update
    )  # fmt: skip
    setup = run_setup._make_setup(config, dataset, pretrained=True)
    calibration = run_setup._calibration_batch(setup, dataset.train[0])
    state = run_setup._qat_state(setup, variables, calibration)
    model, specs = setup.model, setup.specs
    params = flax.core.unfreeze(state.params)
    for spec, bits in zip(specs, args.alloc.split(), strict=False):
        weight_bits, input_bits = map(int, bits.split("/"))
        layer = params[spec.path[0]]
        for leaf, b, signed in (
            ("weight_quantizer", weight_bits, True),
            ("input_quantizer", input_bits, spec.input_signed),
        ):
            _, q_max = quantizer.from_latents(layer[leaf])
            layer[leaf] = quantizer.latents(*quantizer.init_at_bits(q_max, b, signed=signed))
    if args.least_squares_init:
        params = refit_ranges(model, params, calibration[:512])
    state = state.replace(params=params)
    step = steps.make_train_step(model, run_setup._qat_loss(setup))
    accuracy = steps.make_accuracy(model)

    def bits_of(params):
        return [(row["weight_bits"], row["input_bits"]) for row in cost.layer_table(params, specs)]

    def line(params):
        bits = " ".join(f"{w}/{a}" for w, a in bits_of(params))
        return f"BOPs {cost.exact_bops(params, specs):>11,}  bits {bits}"

    print("layers:", " ".join(spec.name for spec in specs))
    print(
        f"start: val {100 * accuracy(state.params, *dataset.validation):.2f}%  {line(state.params)}"
    )
    started, count, val, losses = time.time(), 0, 0.0, []
    for epoch in setup.qat_epochs:
        losses = []
        for x, y in steps.batches(*dataset.train, config.batch_size, seed=args.seed, epoch=epoch):
            before = bits_of(state.params) if args.refit in ("inputs", "both") else None
            state, loss = step(state, x, y)
            losses.append(float(loss))
            count += 1
            if before is not None:
                after = bits_of(state.params)
                lost = [
                    spec.path
                    for spec, (_, a), (_, b) in zip(specs, before, after, strict=True)
                    if b < a
                ]
                if lost:
                    refitted = refit_ranges(
                        model, state.params, calibration[:512], weights=False, layers=lost
                    )
                    state = state.replace(params=refitted)
            if count % args.every == 0:
                recent = np.mean(losses[-args.every :])
                print(f"  step {count:4d}  loss {recent:.3f}  {line(state.params)}")
        val = accuracy(state.params, *dataset.validation)
        print(
            f"QAT epoch {epoch + 1 - args.pretrain_epochs}: loss {np.mean(losses):.4f}  "
            f"val {100 * val:.2f}%  {line(state.params)}  ({time.time() - started:.0f} s)",
            flush=True,
        )
    print(f"final: val {100 * val:.2f}%  last epoch's loss {np.mean(losses):.4f}")
    return 0


def _least_squares_two_bits(kernel: np.ndarray):
    """The 2-bit weight quantizer (power-of-two step d, levels -d, 0, d) of least squared
    error on ``kernel``."""
    from cgmq_jax import quantizer

    kernel = kernel.astype(np.float64)
    best = min(
        (2.0**k for k in range(-12, 4)),
        key=lambda d: np.mean((np.clip(np.round(kernel / d), -1, 1) * d - kernel) ** 2),
    )
    return quantizer.latents(best, best)


if __name__ == "__main__":
    sys.exit(main())
