"""Train a Flax NNX model under a hard BOP budget with ``nnx.Optimizer``: the README example.

The model is ordinary NNX code built from :class:`cgmq_jax.nnx.QuantConv` and
:class:`cgmq_jax.nnx.QuantLinear` (LeNet-5, 281,640 MACs). Float pretraining, calibration
at 8 bits, then quantization-aware training with ``constrained_update`` under the budget,
and the exact integer cost certified at the end.

    python experiments/nnx_example.py               # real MNIST: python -m cgmq_jax.data fetch
    python experiments/nnx_example.py --synthetic   # no data needed (a smoke test)

Exit status: 0 certified within budget, 1 not within budget at the end, 2 bad input.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cgmq_jax import certify, constrained_update, cost, data, quantizer
from cgmq_jax import nnx as cnnx
from cgmq_jax.limits import check_budget
from cgmq_jax.runs.train import batches


class LeNet5(nnx.Module):
    """LeNet-5 in NNX: every input is non-negative (pixels, ReLU), so unsigned."""

    def __init__(self, rngs: nnx.Rngs):
        unsigned = {"input_signed": False, "rngs": rngs}
        self.conv1 = cnnx.QuantConv(1, 6, (5, 5), padding="VALID", **unsigned)
        self.conv2 = cnnx.QuantConv(6, 16, (5, 5), padding="VALID", **unsigned)
        self.fc1 = cnnx.QuantLinear(16 * 4 * 4, 120, **unsigned)
        self.fc2 = cnnx.QuantLinear(120, 84, **unsigned)
        self.fc3 = cnnx.QuantLinear(84, 10, **unsigned)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def loss_fn(model: nnx.Module, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def correct(model, images, labels):
    return jnp.sum(jnp.argmax(model(images), -1) == labels)


def accuracy(model, split, batch_size: int = 1000) -> float:
    images, labels = split
    hits = sum(
        int(correct(model, images[i : i + batch_size], labels[i : i + batch_size]))
        for i in range(0, len(labels), batch_size)
    )
    return hits / len(labels)


def train_epoch(model, optimizer, split, *, batch_size: int, seed: int, epoch: int) -> float:
    losses = [
        train_step(model, optimizer, images, labels)
        for images, labels in batches(*split, batch_size, seed=seed, epoch=epoch)
    ]
    return float(jnp.mean(jnp.stack(losses)))


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_bops", type=float, default=2e6)
    parser.add_argument("--pretrain_epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="QAT epochs under the budget")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quantizer_lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true", help="tiny synthetic data")
    return parser.parse_args(argv)


def load(args) -> data.Dataset:
    if args.synthetic:
        return data.synthetic()
    if not data.bundled.cache_path().exists():
        raise data.DataError(
            "real MNIST is not cached: run `python -m cgmq_jax.data fetch` once, or pass "
            "--synthetic"
        )
    return data.load_mnist("bundled")


def main(argv=None) -> int:
    args = parse(argv)
    start = time.time()
    try:
        mnist = load(args)
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = LeNet5(nnx.Rngs(args.seed))

    # 1. Float pretraining: quantizers off, and out of the optimizer (selected by type).
    model.set_attributes(quantize=False)
    weights = nnx.All(nnx.Param, nnx.Not(cnnx.Quantizer))
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=weights)
    for epoch in range(args.pretrain_epochs):
        loss = train_epoch(
            model, optimizer, mnist.train, batch_size=args.batch_size, seed=args.seed, epoch=epoch
        )
        print(
            f"float epoch {epoch + 1}: loss {loss:.4f}  val {accuracy(model, mnist.validation):.2%}"
        )

    # 2. Quantize: every quantizer at 8 bits from a calibration batch, then the cost.
    model.set_attributes(quantize=True)
    order = np.random.default_rng(args.seed).permutation(len(mnist.train[1]))
    cnnx.calibrate(model, mnist.train[0][order[:2048]])
    specs = cnnx.layer_specs(model, mnist.train[0][:1])
    try:
        check_budget(args.budget_bops, specs)
    except (TypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    eight_bits = cost.exact_bops(nnx.state(model, nnx.Param), specs)
    print(f"8-bit cost {eight_bits:,} BOPs, budget {args.budget_bops:,.0f}")

    # 3. QAT under the budget: Adam for weights and quantizers, then the constraint.
    steps = args.epochs * (len(mnist.train[1]) // args.batch_size)
    tx = optax.chain(
        optax.partition(
            {
                "weight": optax.adam(optax.cosine_decay_schedule(args.lr, max(steps, 1))),
                "quantizer": optax.adam(args.quantizer_lr),
            },
            quantizer.param_labels,
        ),
        constrained_update(functools.partial(cost.bops, specs=specs), args.budget_bops),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for epoch in range(args.epochs):
        loss = train_epoch(
            model,
            optimizer,
            mnist.train,
            batch_size=args.batch_size,
            seed=args.seed,
            epoch=args.pretrain_epochs + epoch,
        )
        bops = cost.exact_bops(nnx.state(model, nnx.Param), specs)
        print(
            f"QAT epoch {epoch + 1}: loss {loss:.4f}  val {accuracy(model, mnist.validation):.2%}"
            f"  BOPs {bops:,}  {'within' if bops <= args.budget_bops else 'over'} budget"
        )

    # 4. The certificate: exact integer bit-widths and cost of the trained model.
    try:
        report = certify.certify(nnx.state(model, nnx.Param), specs, args.budget_bops)
    except certify.CertificateRefused as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{'layer':8} {'w bits':>6} {'in bits':>7} {'MACs':>9} {'BOPs':>11}")
    for row in report["layers"]:
        print(
            f"{row['layer']:8} {row['weight_bits']:6} {row['input_bits']:7} "
            f"{row['macs']:9,} {row['bops']:11,}"
        )
    print(
        f"test accuracy {accuracy(model, mnist.test):.2%}  BOPs {report['bops']:,} "
        f"({report['relative_bops_percent']:.3f}% of 32-bit)  "
        f"certified within budget {args.budget_bops:,.0f}  "
        f"wall {time.time() - start:.0f} s  data {mnist.source}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
