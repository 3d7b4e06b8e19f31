"""Why the DS-CNN does not train at a tight budget: its float network, folded, quantized at
uniform bit-widths and evaluated without any QAT, with per-layer statistics.

    python experiments/diagnose_dscnn.py [--train_examples 10000] [--pretrain_epochs 3]

Prints per layer the spread of the folded kernel's per-output-channel ranges (max over min
of max|W|) and the fraction of weights that round to zero at 2 bits with the range at
max|W| (what ``init_quantizers`` gives and the constraint keeps while it coarsens the
step); then, for uniform weight/input bits, the validation accuracy of the quantized float
network with no QAT, and at 2-bit weights with each kernel's least-squares range instead.
The numbers are in docs/results.md (DS-CNN).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax.numpy as jnp
import numpy as np

UNIFORM_BITS = ((8, 8), (4, 4), (3, 3), (2, 2), (2, 8), (8, 2), (8, 1), (3, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", help="the dataset")
    p.add_argument("--train_examples", type=int, default=10000, help="training examples used")
    p.add_argument("--pretrain_epochs", type=int, default=3, help="float epochs")
    p.add_argument("--seed", type=int, default=0, help="seed")
    args = p.parse_args(argv)

    from cgmq_jax import data, models, nn
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
        params = nn.init_quantizers(model, folded, images, input_bits=bits_a, weight_bits=bits_w)
        print(
            f"  W{bits_w}A{bits_a}: validation "
            f"{100 * accuracy(params, *dataset.validation):.2f}% (no QAT)"
        )
    for bits_a in (8, 2):
        params = nn.init_quantizers(model, folded, images, input_bits=bits_a, weight_bits=2)
        for layer in params.values():
            layer["weight_quantizer"] = _least_squares_two_bits(np.asarray(layer["kernel"]))
        print(
            f"  W2A{bits_a}, weight ranges of least squared error: validation "
            f"{100 * accuracy(params, *dataset.validation):.2f}% (no QAT)"
        )
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
