"""Steps to the first feasible QAT step, per quantizer learning rate.

    python experiments/first_feasible.py --budget_bops 2e6

Pretrains the float network once, then, for each ``--quantizer_lrs`` value, runs
:func:`cgmq_jax.runs.train.fit` from that checkpoint (quantizers at 8 bits, the default chain)
for ``--epochs`` QAT epochs. Once feasible, the guard keeps a run feasible, so the
constraint's count of infeasible steps is the step at which it first became feasible.
"""

from __future__ import annotations

import argparse
import dataclasses


def parse_args(argv=None) -> argparse.Namespace:
    from cgmq_jax.runs.train import TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget_bops", type=float, default=defaults.budget_bops)
    p.add_argument("--model", choices=("lenet5", "mlp"), default=defaults.model)
    p.add_argument(
        "--quantizer_lrs",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[1e-4, 1e-3, 1e-2, 1e-1],
        help="comma-separated quantizer learning rates (default 1e-4,1e-3,1e-2,1e-1)",
    )
    p.add_argument("--epochs", type=int, default=1, help="QAT epochs per learning rate")
    p.add_argument("--pretrain_epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--data", choices=("auto", "tfds", "bundled", "idx"), default="auto")
    p.add_argument("--data_dir", default=None, help="tfds data dir, or the IDX directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cgmq_jax import data
    from cgmq_jax.runs import train

    base = train.TrainConfig(
        budget_bops=args.budget_bops,
        model=args.model,
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        lr=1e-3,  # this experiment's documented setting, whatever the model's schedule
        seed=args.seed,
    )
    train.check_config(base)
    dataset = data.load_mnist(args.data, data_dir=args.data_dir)
    quiet = {"log": lambda _: None}
    pretrain = dataclasses.replace(
        base, method="float", epochs=base.pretrain_epochs, budget_bops=None
    )
    float_params = train.fit(pretrain, dataset, **quiet).params
    steps = len(dataset.train[1]) // base.batch_size
    print(f"budget {base.budget_bops:,.0f} BOPs, {args.epochs} QAT epoch(s) of {steps} steps")
    print("quantizer_lr  first feasible step  certified BOPs  val acc  test acc")
    for lr in args.quantizer_lrs:
        config = dataclasses.replace(base, quantizer_lr=lr)
        result = train.fit(config, dataset, float_params=float_params, **quiet)
        feasible = [row for row in result.history if row["within_budget"]]
        first = feasible[0]["infeasible_steps"] if feasible else "none"
        best = max((row["val_accuracy"] for row in feasible), default=float("nan"))
        print(
            f"{lr:<12g}  {first:>19}  {result.certificate['bops']:>14,}  {100 * best:6.2f}%  "
            f"{100 * result.test_accuracy:7.2f}%",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
