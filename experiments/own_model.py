"""Your own Flax linen model under a hard BOP budget, from your own training loop.

The model below is plain ``flax.linen`` (nothing from cgmq_jax). ``quantize_model`` adds
CGMQ quantizers to its ``Conv`` / ``Dense`` layers by rules, ``init_quantizers`` turns its
float checkpoint into a quantized one, ``constrained_update`` (last in an optax chain)
keeps the exact cost within the budget, and ``greedy_repair`` + ``certify`` give the
certificate. Run: ``python experiments/own_model.py --budget_bops 1e6`` (real MNIST from
the local cache, ``make data``; ``--synthetic`` for a smoke run without it).
``--export FILE`` also writes the integer model file (``cgmq_jax.export.export``: any
model of quantized layers, ReLU, pooling, adds, concatenation and reshapes exports); check
it and write C with ``python experiments/export.py FILE --check --c OUT_DIR``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import cgmq_jax
from cgmq_jax import certify, cost, data, repair
from cgmq_jax.limits import InfeasibleBudgetError, check_budget
from cgmq_jax.runs.train import batches


class Net(nn.Module):
    """A user's model: strided convolutions, no pooling, one dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="stem")(x))  # 14x14x8
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv")(x))  # 7x7x16
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def cross_entropy(model, params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train(model, params, tx, splits, *, epochs, batch_size, seed):
    """A plain optax loop: ``tx.update`` gets ``params`` (constrained_update needs them)."""
    state = tx.init(params)

    @jax.jit
    def step(params, state, images, labels):
        grads = jax.grad(functools.partial(cross_entropy, model))(params, images, labels)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    images, labels = splits
    for epoch in range(epochs):
        for x, y in batches(images, labels, batch_size, seed=seed, epoch=epoch):
            params, state = step(params, state, x, y)
    return params, state


def accuracy(model, params, images, labels) -> float:
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
    hits = sum(
        int(jnp.sum(predict(params, images[i : i + 1000]) == labels[i : i + 1000]))
        for i in range(0, len(labels), 1000)
    )
    return hits / len(labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_bops", type=float, default=1e6)
    parser.add_argument("--float_epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", action="store_true", help="tiny random data (smoke)")
    parser.add_argument("--export", default=None, metavar="FILE", help="write the integer file")
    args = parser.parse_args(argv)
    mnist = data.synthetic() if args.synthetic else data.load_mnist(verbose=False)
    start = time.perf_counter()

    # 1. Quantizers by rules: the image input is unsigned; everything else decided by data.
    net = Net()
    model = cgmq_jax.quantize_model(
        net, [cgmq_jax.QuantRule(module_path="stem", input_signed=False), cgmq_jax.QuantRule()]
    )
    sample = jnp.asarray(mnist.train[0][:256])
    float_params = net.init(jax.random.key(args.seed), sample)["params"]
    try:  # a budget below the minimum cost is refused before any training
        params = cgmq_jax.init_quantizers(model, float_params, sample)
        check_budget(args.budget_bops, cost.layer_specs(model, sample, params=params))
    except InfeasibleBudgetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # 2. Float pretraining of the unmodified model, then quantizers at 8 bits from it.
    float_params, _ = train(
        net, float_params, optax.adam(1e-3), mnist.train,
        epochs=args.float_epochs, batch_size=128, seed=args.seed,
    )  # fmt: skip
    params = cgmq_jax.init_quantizers(model, float_params, sample)
    specs = cost.layer_specs(model, sample, params=params)

    # 3. CGMQ: the recommended chain, optax.chain(optax.partition(Adam for the weights,
    # Adam for the quantizers), constrained_update(cost_fn, budget)); compose your own the
    # same way (constrained_update last).
    cost_fn = functools.partial(cost.bops, specs=specs)
    tx = cgmq_jax.cgmq_optimizer(cost_fn, args.budget_bops)
    params, state = train(
        model, params, tx, mnist.train, epochs=args.epochs, batch_size=128, seed=args.seed
    )

    # 4. The certificate: exact integer cost, repaired if the last step left the budget.
    params, repaired_bits = repair.greedy_repair(params, specs, args.budget_bops)
    report = certify.certify(params, specs, args.budget_bops)
    seconds = time.perf_counter() - start
    print(f"{'layer':<6} {'MACs':>7} {'w bits':>6} {'in bits':>7} {'BOPs':>9}")
    for row in report["layers"]:
        print(
            f"{row['layer']:<6} {row['macs']:>7,} {row['weight_bits']:>6} "
            f"{row['input_bits']:>7} {row['bops']:>9,}"
        )
    test_accuracy = accuracy(model, params, *mnist.test)
    print(
        f"float test accuracy {accuracy(net, float_params, *mnist.test):.2%}; "
        f"quantized {test_accuracy:.2%} at {report['bops']:,} BOPs "
        f"<= budget {args.budget_bops:,.0f} ({report['relative_bops_percent']:.2f}% of 32-bit); "
        f"{int(state[-1].infeasible_steps)} infeasible steps, {repaired_bits} bits repaired, "
        f"{seconds:.0f} s"
    )
    if args.export is not None:
        from cgmq_jax import export

        path = export.export(
            params,
            model,
            args.export,
            certificate=report,
            metadata={"test_accuracy": float(test_accuracy), "seed": args.seed},
        )
        compared = export.compare_with_model(path, params, model, mnist.test[0])
        print(
            f"wrote {path}: the integer engine agrees with the model on {compared['agree']:,} "
            f"of {compared['examples']:,} test predictions"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
