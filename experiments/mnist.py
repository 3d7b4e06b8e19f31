"""Train a quantized model (LeNet-5 by default) on MNIST under a BOP budget and certify it.

    python experiments/mnist.py --budget_bops 2e6

Parses flags and calls :func:`cgmq_jax.runs.train.fit`; everything else is library code.
Every flag, the output directory and the data are checked before any training. Each
epoch ends with a checkpoint in ``OUT/checkpoints``; ``--resume`` continues a killed or
interrupted run (Ctrl-C checkpoints mid-epoch) bit for bit. ``results.json`` is written
last and records the SHA-256 of ``params.msgpack``.

Exit status: 0 on success; 2 on bad input (a bad flag, an infeasible budget, missing or
empty data, validation or test splits under ``--min_eval_examples``, an empty, unusable,
busy or foreign ``--out``, a checkpoint that fails its digests on ``--resume``); 1 when
training diverged (nothing certified) or the results could not be written; 130 when
interrupted (the message says how to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys


def run_flags(args: argparse.Namespace) -> dict:
    """The run's identity: ``--resume`` must be given the same flags (``--out`` is the run).

    A flag left at ``None`` matches a checkpoint written before that flag existed;
    ``--admission`` left out is resolved to the model's (and written back into ``args``),
    the value checkpoints written before it had a per-model default hold; so is
    ``--batch_size`` (checkpoints before its per-model default hold 128); so are
    ``--refit_ranges`` with ``--prune`` (its default there is the model's),
    ``--move_at_floor`` (the model's where it is on; off, given or not, is stored as ``None``,
    as before it existed),
    ``--microbatches`` (the model's; 1 is stored as ``None``, as before it existed),
    ``--quantizer_lr_decay`` and ``--budget_warmup_epochs`` (the model's where it applies,
    else left ``None``, as is a given ``0``; flags that fail their checks are left for the
    checks to report).
    """
    from cgmq_jax.runs import train

    if args.admission is None:
        args.admission = train.TrainConfig(model=args.model, prune=args.prune).admission
    if args.batch_size is None:
        args.batch_size = train.TrainConfig(model=args.model).batch_size
    if args.refit_ranges is None and args.prune:
        args.refit_ranges = train.TrainConfig(model=args.model, prune=True).refits
    if args.move_at_floor is None:  # the model's (off is stored as None, below)
        config = train.TrainConfig(model=args.model, prune=args.prune, admission=args.admission)
        args.move_at_floor = config.move_at_floor
    if args.microbatches is None:
        devices = args.devices if isinstance(args.devices, int) else 1
        config = train.TrainConfig(model=args.model, batch_size=args.batch_size, devices=devices)
        args.microbatches = config.microbatches
    if args.quantizer_lr_decay is None:
        config = train.TrainConfig(model=args.model, prune=args.prune)
        args.quantizer_lr_decay = config.quantizer_lr_decay
    if args.budget_warmup_epochs is None:
        args.budget_warmup_epochs = _default_warmup(args) or None
    skipped = (
        *("out", "resume", "overwrite", "coordinator", "num_processes", "process_id"),
        "min_eval_examples",  # a check of the data, not part of the run
    )
    flags = {k: v for k, v in vars(args).items() if k not in skipped}
    if flags["budget_warmup_epochs"] == 0:  # off, given: as a checkpoint before the flag
        flags["budget_warmup_epochs"] = None
    if flags["move_at_floor"] is False:  # the same
        flags["move_at_floor"] = None
    if flags["microbatches"] == 1:  # the same
        flags["microbatches"] = None
    return flags


def _default_warmup(args: argparse.Namespace) -> float:
    """The model's budget warm-up for these flags (0 where it does not apply or a flag is bad)."""
    from cgmq_jax import cost, data
    from cgmq_jax.runs import train

    names = ("model", "method", "prune", "epochs", "input_bits", "budget_bops")
    names += ("budget_weight_kib", "budget_activation_kib")
    try:
        config = train.TrainConfig(**{name: getattr(args, name) for name in names})
        specs = train.check_config(config, data.DATASETS[args.dataset or "mnist"].image_shape)
    except (ValueError, KeyError):
        return 0
    return config.budget_warmup(cost.min_cost(specs))


def parse_args(argv=None) -> argparse.Namespace:
    from cgmq_jax.data import DATASETS, MIN_EVAL_EXAMPLES, SOURCES
    from cgmq_jax.models import MODELS
    from cgmq_jax.runs.train import METHODS, TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--budget_bops",
        type=float,
        default=None,
        help=f"max bit-operations per example, e.g. 2e6 (default {defaults.budget_bops:g} "
        "when no other limit is given)",
    )
    p.add_argument(
        "--budget_weight_kib",
        type=float,
        default=None,
        help="max weight memory, KiB (weights at their bits + 32-bit biases)",
    )
    p.add_argument(
        "--budget_activation_kib",
        type=float,
        default=None,
        help="max largest activation, KiB (a layer's quantized input, per example)",
    )
    p.add_argument("--model", choices=tuple(MODELS), default=defaults.model)
    p.add_argument("--method", choices=METHODS, default=defaults.method)
    # None: the model's schedule (cgmq_jax.runs.config.schedule; docs/cli.md)
    p.add_argument("--epochs", type=int, default=None, help="QAT epochs (default: the model's)")
    p.add_argument(
        "--pretrain_epochs",
        type=int,
        default=None,
        help="float epochs before QAT (default: the model's)",
    )
    p.add_argument("--batch_size", type=int, default=None, help="batch size (default: the model's)")
    p.add_argument(
        "--lr", type=float, default=None, help="weight learning rate (Adam; default: the model's)"
    )
    p.add_argument(
        "--quantizer_lr",
        type=float,
        default=defaults.quantizer_lr,
        help="quantizer learning rate (Adam, log2 units)",
    )
    p.add_argument(
        "--quantizer_lr_decay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cosine-decay the quantizer learning rate over QAT, as the weights' "
        "(bits settle before training ends); default: constant, and with --prune the "
        "model's (lenet5_bb: decayed)",
    )
    p.add_argument(
        "--budget_warmup_epochs",
        type=float,
        default=None,
        help="cgmq with --budget_bops alone: lower the budget geometrically from the "
        "network's cost at its initial bits over this many first QAT epochs (default: the "
        "model's: dscnn 2 below twice its minimum BOPs, without --prune; else off)",
    )
    p.add_argument("--rescale", type=float, default=defaults.rescale, help="CGGD's R (> 1)")
    p.add_argument(
        "--admission",
        choices=("gain", "all_or_nothing", "within_bits"),
        default=None,
        help="cgmq: what the guard admits when the whole proposal would cross a limit "
        "(default: the model's, gain for dscnn, and for lenet5 with --prune, else all_or_nothing)",
    )
    p.add_argument(
        "--trades",
        action=argparse.BooleanOptionalAction,
        default=defaults.trades,
        help="cgmq: after each QAT epoch, move bits between quantizers where the measured "
        "loss says they pay (cgmq_jax.trades)",
    )
    p.add_argument(
        "--refit_ranges",
        action=argparse.BooleanOptionalAction,
        default=defaults.refit_ranges,
        help="cgmq: a quantizer that loses bits gets the least-squares range at its new "
        "bit-width (weights: its kernel; inputs: 512 calibration images); default on, "
        "with --prune the model's (on for LeNet-5 and the DS-CNN)",
    )
    p.add_argument(
        "--move_at_floor",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cgmq, all_or_nothing: a quantizer at its minimum bit-width moves where it "
        "stays there, instead of its step only rising on a guarded step (default: the "
        "model's, off with --prune)",
    )
    p.add_argument(
        "--prune",
        action=argparse.BooleanOptionalAction,
        default=defaults.prune,
        help="cgmq: per-channel weight quantizers that may go to 0 bits, removing the "
        "channel (structured pruning under the same certified limits)",
    )
    p.add_argument("--lam", type=float, default=defaults.lam, help="dq penalty weight")
    p.add_argument("--lam_weight", type=float, default=None, help="dq: weight-memory term")
    p.add_argument("--lam_activation", type=float, default=None, help="dq: activation term")
    p.add_argument("--bits_w", type=int, default=defaults.bits_w, help="fixed: weight bits")
    p.add_argument("--bits_a", type=int, default=defaults.bits_a, help="fixed: input bits")
    p.add_argument(
        "--input_bits",
        type=int,
        default=None,
        help="pin the network input at N bits, counted at N (8: Bayesian Bits' convention; "
        "default: learned)",
    )
    p.add_argument(
        "--fill_epochs",
        type=int,
        default=defaults.fill_epochs,
        help="cgmq: epochs of weight training after the bits that still fit are added; ptq: "
        "passes of 100 steps over 12,800 training images after the bits are allocated "
        "(0: none)",
    )
    p.add_argument(
        "--float_checkpoint",
        default=None,
        help="start from the float network of a finished --method float run (its directory) "
        "instead of training one (--pretrain_epochs is then not used)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--dataset", choices=tuple(DATASETS), default=None, help="default mnist")
    p.add_argument("--data", choices=SOURCES, default="auto", help="the dataset's source")
    p.add_argument("--data_dir", default=None, help="tfds data dir, IDX directory, or tarball")
    p.add_argument("--download", action="store_true", help="let tfds download the dataset")
    p.add_argument(
        "--train_examples",
        type=int,
        default=None,
        help="use only the first N training examples (quick checks)",
    )
    p.add_argument(
        "--min_eval_examples",
        type=int,
        default=MIN_EVAL_EXAMPLES,
        help="refuse validation or test splits smaller than this (an accuracy on a handful "
        f"of images means nothing; default {MIN_EVAL_EXAMPLES})",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="data parallel over N devices (default 1; all of them with --coordinator; "
        "a CPU is split into N devices, up to one per core)",
    )
    p.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help="take each train step's batch in N equal parts, one after another, and "
        "average their gradients (the same up to float rounding; on a CPU each part's "
        "activations stay in the caches; default: the model's, 8 for dscnn, else 1)",
    )
    p.add_argument(
        "--coordinator",
        default=None,
        help="HOST:PORT of process 0: train over several processes (jax.distributed)",
    )
    p.add_argument("--num_processes", type=int, default=1, help="with --coordinator")
    p.add_argument("--process_id", type=int, default=0, help="with --coordinator")
    p.add_argument("--out", default="runs/mnist", help="results directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out from its last checkpoint (same flags)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace whatever run --out holds")
    args = p.parse_args(argv)
    if (
        args.budget_bops is None
        and args.budget_weight_kib is None
        and (args.budget_activation_kib is None)
    ):
        args.budget_bops = defaults.budget_bops  # no limit given: the headline BOP budget
    return args


def _resume_command(argv: list[str]) -> str:
    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["python", "experiments/mnist.py", *kept, "--resume"])


def _error(message: object, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from cgmq_jax import data
    from cgmq_jax.runs import parallel, rundir, train

    parallel.use_compilation_cache()  # a run after the first skips compiling its steps
    if args.coordinator is not None:  # before anything computes: jax.distributed
        if args.resume:
            return _error("--resume is not available with --coordinator (no checkpoints)", 2)
        try:
            parallel.start_processes(args.coordinator, args.num_processes, args.process_id)
        except (ValueError, RuntimeError) as error:
            return _error(error, 2)
    elif args.devices is not None and 1 < args.devices <= parallel.usable_cpus():
        parallel.split_cpu(args.devices)  # a CPU: one device per core (an accelerator: no-op)
    default_warmup = args.budget_warmup_epochs is None
    flags = run_flags(args)
    if args.devices is None:
        import jax

        args.devices = jax.device_count() if args.coordinator is not None else 1
    config = train.TrainConfig(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(train.TrainConfig)
            if hasattr(args, f.name)
        }
    )
    # 1. Everything that can be checked before data loading or training.
    try:
        train.check_config(config, data.DATASETS[args.dataset or "mnist"].image_shape)
        if args.train_examples is not None and args.train_examples < config.batch_size:
            raise ValueError(
                f"--train_examples {args.train_examples} is fewer than one batch "
                f"(--batch_size {config.batch_size}): no step would be trained"
            )
        if args.min_eval_examples < 1:
            raise ValueError(
                f"--min_eval_examples must be at least 1, not {args.min_eval_examples}"
            )
        if args.process_id != 0:  # several processes: process 0 writes the run
            return _train_only(args, config)
        run = rundir.RunDir.open(
            args.out, flags=flags, resume=args.resume, overwrite=args.overwrite
        )
    except (ValueError, TypeError) as error:  # InfeasibleBudgetError and RunDirError too
        return _error(error, 2)
    except KeyboardInterrupt:
        return _error("interrupted before training started; nothing was written", 130)
    if default_warmup and args.budget_warmup_epochs:
        epochs = args.budget_warmup_epochs
        print(
            "the budget is lowered from the network's cost at its initial bits to "
            f"{args.budget_bops:,.0f} BOPs over the first {epochs:g} QAT "
            f"epoch{'s' * (epochs != 1)} ({args.model}'s default for a budget this close to "
            "its minimum; --budget_warmup_epochs 0 keeps the limit from the first step)",
            flush=True,
        )
    with run:
        return _train_and_publish(args, argv, config, flags, run)


def _load(args, config):
    from cgmq_jax import data
    from cgmq_jax.runs import train

    dataset = data.load(
        args.dataset or "mnist", args.data, data_dir=args.data_dir, download=args.download
    )
    if args.train_examples is not None:
        dataset = dataclasses.replace(
            dataset, train=tuple(a[: args.train_examples] for a in dataset.train)
        )
    train.check_dataset(config, dataset)
    data.check_eval_splits(dataset, args.min_eval_examples)
    return dataset


def _float_params(args, config):
    """The float network of ``--float_checkpoint`` (None without it); ``ValueError`` if the
    directory holds no finished float run of ``--model`` (``RunDirError`` is one)."""
    if args.float_checkpoint is None:
        return None
    from cgmq_jax.runs import rundir

    results, params = rundir.load_run(args.float_checkpoint, restore=True)
    trained = results.get("config") or {}
    if trained.get("method") != "float" or trained.get("model") != config.model:
        raise ValueError(
            f"--float_checkpoint {args.float_checkpoint}: not a --method float run of "
            f"--model {config.model} (it is --method {trained.get('method')} of --model "
            f"{trained.get('model')})"
        )
    return params


def _train_only(args, config) -> int:
    """A process other than 0 of a multi-process run: it trains its share, writes nothing."""
    from cgmq_jax import data
    from cgmq_jax.runs import train

    try:
        dataset = _load(args, config)
    except (ValueError, data.DataError) as error:
        return _error(error, 2)
    result = train.fit(config, dataset, float_params=_float_params(args, config))
    print(f"process {args.process_id}: test accuracy {100 * result.test_accuracy:.2f}%")
    return 0


def _train_and_publish(args, argv, config, flags, run) -> int:
    from cgmq_jax import data
    from cgmq_jax.runs import report, rundir, train

    try:
        # 2. The data, checked before any training.
        try:
            dataset = _load(args, config)
            float_params = _float_params(args, config)
        except (ValueError, data.DataError) as error:
            return _error(error, 2)
        # 3. Training, checkpointed after every epoch (and at Ctrl-C).
        try:
            with train.stop_on_sigint() as stop:
                result = train.fit(
                    config,
                    dataset,
                    # Orbax's saves wait for every process: several processes run without.
                    checkpointer=run.checkpointer if args.coordinator is None else None,
                    resume=args.resume,
                    checkpoint_meta={"flags": flags},
                    should_stop=stop,
                    float_params=float_params,
                )
        except train.Interrupted as stopped:
            saved = "checkpoint saved" if stopped.saved else "nothing saved"
            return _error(
                f"interrupted at {stopped.where} ({saved}); resume with: {_resume_command(argv)}",
                130,
            )
        except rundir.RunDirError as error:  # a checkpoint that fails its digests
            return _error(error, 2)
        except OSError as error:  # a checkpoint could not be written (a full disk, say)
            return _error(
                f"{error}; fix that, then run {_resume_command(argv)} (it continues from the "
                "last complete checkpoint, if any)",
                1,
            )
        except train.TrainingDiverged as error:
            return _error(
                f"{error} The last finite epoch stays checkpointed in {run.path}; "
                "rerun with --overwrite.",
                1,
            )
        # 4. Publish: params and plot, then results.json (the commit record) last.
        try:
            report.write_results(result, run, flags=vars(args))
        except OSError as error:
            return _error(
                f"cannot write the results into {run.path} ({error.strerror or error}); the "
                f"trained state is checkpointed there: fix that, then run "
                f"{_resume_command(argv)}",
                1,
            )
    except KeyboardInterrupt:
        return _error(
            f"interrupted; the last complete epoch is checkpointed in {run.path} (if any): "
            f"resume with: {_resume_command(argv)}",
            130,
        )
    print()
    print(report.layer_table_text(result.certificate["layers"], config.budget_bops))
    print(report.limits_text(result.certificate))
    relative, input8 = (
        result.certificate["relative_bops_percent"],
        result.certificate["relative_bops_percent_input8"],
    )
    print(
        f"test accuracy {100 * result.test_accuracy:.2f}%  "
        f"BOPs {result.certificate['bops']:,} ({relative:.3f}% of 32-bit"
        f"{'' if input8 == relative else f'; {input8:.3f}% with the input counted at 8 bits'})  "
        f"wall {result.wall_seconds:.0f} s  data {result.data_source}"
    )
    if "ptq" in result.certificate:
        print(_ptq_times(result))
    elif result.timings:
        print(report.timings_text(result.timings))
    if result.collapsed:
        print(f"WARNING: {result.certificate['collapse']['message']}", file=sys.stderr)
    print(f"wrote {run.path}/results.json, params.msgpack, training.png")
    return 0


def _ptq_times(result) -> str:
    """One line: the run's wall time split into the float phase and PTQ's parts."""
    record = result.certificate["ptq"]
    before, parts = record["float_seconds"], record["timings"]
    epochs = sum(row.get("phase") == "float" for row in result.history)
    trained = f"{epochs} float epoch(s)" if epochs else "the float network given"
    return (
        f"float phase {before:.0f} s (setup, {trained}), PTQ {result.wall_seconds - before:.0f} s: "
        "calibrate "
        f"{parts['calibrate']:.1f} s, allocate {parts['allocate']:.1f} s "
        f"({record['loss_evaluations']} loss evaluations), weight training {parts['tune']:.1f} s"
        f", certify and test {result.wall_seconds - before - sum(parts.values()):.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
