"""Train a quantized LeNet-5 (or MLP) on MNIST under a BOP budget and certify it.

    python experiments/mnist.py --budget_bops 2e6

Parses flags and calls :func:`cgmq_jax.train.fit`; everything else is library code.
Exit status: 0 on success, 2 on bad input (infeasible budget, missing data, bad flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from cgmq_jax.train import METHODS, TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--budget_bops",
        type=float,
        default=defaults.budget_bops,
        help="max bit-operations per example, e.g. 2e6 (default %(default)g)",
    )
    p.add_argument("--model", choices=("lenet5", "mlp"), default=defaults.model)
    p.add_argument("--method", choices=METHODS, default=defaults.method)
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="QAT epochs")
    p.add_argument(
        "--pretrain_epochs",
        type=int,
        default=defaults.pretrain_epochs,
        help="float epochs before QAT",
    )
    p.add_argument("--batch_size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="weight learning rate (Adam)")
    p.add_argument(
        "--quantizer_lr",
        type=float,
        default=defaults.quantizer_lr,
        help="quantizer learning rate (Adam, log2 units)",
    )
    p.add_argument("--rescale", type=float, default=defaults.rescale, help="CGGD's R (> 1)")
    p.add_argument("--lam", type=float, default=defaults.lam, help="dq penalty weight")
    p.add_argument("--bits_w", type=int, default=defaults.bits_w, help="fixed: weight bits")
    p.add_argument("--bits_a", type=int, default=defaults.bits_a, help="fixed: input bits")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--data", choices=("auto", "tfds", "bundled", "idx"), default="auto")
    p.add_argument("--data_dir", default=None, help="tfds data dir, or the IDX directory")
    p.add_argument("--download", action="store_true", help="let tfds download MNIST")
    p.add_argument(
        "--train_examples",
        type=int,
        default=None,
        help="use only the first N training examples (quick checks)",
    )
    p.add_argument("--out", default="runs/mnist", help="results directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cgmq_jax import certify, data, report, train

    config = train.TrainConfig(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(train.TrainConfig)
            if hasattr(args, f.name)
        }
    )
    try:
        train.check_config(config)
        dataset = data.load_mnist(args.data, data_dir=args.data_dir, download=args.download)
        if args.train_examples is not None:
            dataset = dataclasses.replace(
                dataset, train=tuple(a[: args.train_examples] for a in dataset.train)
            )
        result = train.fit(config, dataset)
    except (ValueError, TypeError, certify.InfeasibleBudgetError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = report.write_results(result, args.out, flags=vars(args))
    print()
    print(report.layer_table_text(result.certificate["layers"], config.budget_bops))
    print(
        f"test accuracy {100 * result.test_accuracy:.2f}%  "
        f"BOPs {result.certificate['bops']:,} "
        f"({result.certificate['relative_bops_percent']:.3f}% of 32-bit)  "
        f"wall {result.wall_seconds:.0f} s  data {result.data_source}"
    )
    print(f"wrote {out}/results.json, params.msgpack, training.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
