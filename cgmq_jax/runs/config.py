"""What goes into a run and what comes out: :class:`TrainConfig` (and the checking of its
flags), :class:`FitResult`, and the two ways a run stops early.

Imports only the library core, so that code that reads a result (:mod:`cgmq_jax.runs.report`)
need not load the trainer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from cgmq_jax import admission, constraint, cost, models
from cgmq_jax.limits import LIMIT_FLAGS, limits_from_flags

METHODS = ("cgmq", "dq", "fixed", "float", "ptq")
MAX_BITS = 16
#: The methods that work under the limits (the others are only measured against them).
LIMITED_METHODS = ("cgmq", "dq", "ptq")

@dataclasses.dataclass(frozen=True)
class Schedule:
    """A model's default training schedule: float epochs, QAT epochs, weight learning rate,
    batch size, what the guard admits (:mod:`cgmq_jax.admission`) when the whole proposal
    would cross a limit, without and with ``prune``, whether ranges are refitted under
    ``prune`` (they are without it), whether the quantizers' learning rate decays under
    ``prune`` (it is constant without it), and over how many first QAT epochs the BOP
    budget is lowered to the limit (``cgmq`` with ``budget_bops`` alone, below
    ``budget_warmup_below`` times the network's minimum BOPs, and no ``prune``; at most
    half the QAT epochs; 0: the limit from the first step), whether a quantizer at its
    minimum bit-width moves freely within it under the all-or-nothing guard (without
    ``prune``; :func:`cgmq_jax.admission.floor_moves`), the XLA options its train
    steps compile with on a CPU (``(name, value)`` pairs; :attr:`TrainConfig.compiler_options`),
    and into how many microbatches its train steps split a batch
    (:func:`cgmq_jax.runs.steps.microbatched`)."""

    pretrain_epochs: int
    epochs: int
    lr: float
    batch_size: int = 128
    admission: str = "all_or_nothing"
    refit_with_prune: bool = False
    admission_with_prune: str = "all_or_nothing"
    quantizer_lr_decay_with_prune: bool = False
    budget_warmup_epochs: float = 0
    budget_warmup_below: float = 0.0
    move_at_floor: bool = False
    compiler_options: tuple[tuple[str, str], ...] = ()
    microbatches: int = 1


#: XLA:CPU hands reductions alone to the YNNPACK library, its convolutions to Eigen: the
#: option of ``lenet5_bb``'s schedule (XLA's default gives YNNPACK its convolutions too,
#: which run there on one thread at about half the speed; docs/performance.md).
YNNPACK_REDUCTIONS_ONLY = (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_REDUCE"),)


#: The schedule of a model not in :data:`SCHEDULES` (and of every model before LeNet-5's
#: short one): 5 float + 25 QAT epochs at 1e-3.
DEFAULT_SCHEDULE = Schedule(pretrain_epochs=5, epochs=25, lr=1e-3)
#: Per model, the schedule measured for it where it differs from :data:`DEFAULT_SCHEDULE`:
#: LeNet-5 at 2e6, 3 seeds, median 98.96% with 2 + 8 epochs at 2e-3 against 98.92% with
#: 5 + 25 at 1e-3, in a third of the time (docs/method.md section 5); at batch 64 instead of
#: 128, ten seeds, median 98.995% (seeds 0-2: 99.02%) against 98.915%, 7 seeds better, 2
#: worse (section 5). The DS-CNN at 4e6 fell from 80.73% to 74.30% with LeNet-5's epochs
#: and rate (section 10); the others were not measured with them.
#: The DS-CNN admits by gain per BOP: on Fashion-MNIST at 4e6, 3 seeds, median 80.70%
#: against 77.51% with the all-or-nothing guard (LeNet-5 at 2e6: 0.33 points worse with it).
#: Below twice its minimum BOPs it lowers the budget over its first 2 QAT epochs: at 4e6
#: (1.66x), 3 seeds, median 80.60% against 79.56%; at 8e6 84.79% against 85.00% and at
#: 1.6e7 86.65% against 87.84% (seed 0), so not there.
#: With ``prune`` it refits ranges: at 4e6 its validation accuracy after the first QAT epoch
#: was 9.7-10.5% without (3 seeds: collapsed) and 54.4-56.9% with. So does LeNet-5: at 1e6
#: with its schedule, 3 seeds, median 98.21% with against 97.89% without (with the previous
#: 5 + 25 epochs, seed 0: 98.14% with, 98.42% without). Pruned, both admit by gain: LeNet-5
#: at 1e6, 3 seeds, median 98.57% against 98.21% with the all-or-nothing guard; the DS-CNN
#: at 4e6, 80.90% against 76.70% (every seed better). ``lenet5_bb`` (the default schedule)
#: does not: at 0.36% with the image at 8 bits, 99.10% with gain against 99.25%. Pruned, it
#: decays the quantizers' learning rate with the weights': there, 3 seeds, median 99.33%
#: against 99.25% with a constant rate (every seed better or equal). Unpruned, its quantizers
#: at their minimum bit-width move within it (``move_at_floor``): with the image at 8 bits
#: the all-or-nothing guard's ratchet had collapsed validation late in training (80.62% at
#: QAT epoch 22 of seed 0); with it no epoch fell below 98.88%, medians 99.29% (image at 8
#: bits) and 99.31% (learned) against 99.31% and 99.32%, every run at 99.6-99.9% of the
#: budget (one at 81.5% before). LeNet-5 trained worse with it (2e6: 98.94% against
#: 99.02%; 1e6: 98.49% against 98.71%), so not there (docs/method.md section 3).
#: The DS-CNN takes each batch in 8 parts (``microbatches``): its cgmq step 1.75x as fast
#: (2.16x PyTorch's QAT step, 1.24x with the batch whole; docs/performance.md); at 4e6, 3
#: seeds, median 80.43% (seed 0 80.43% against 80.78% with the batch whole, the same day;
#: 8e6 84.01% against 85.43%, 1.6e7 87.10% against 87.13%). XLA's own convolutions ran
#: several times slower inside the parts' loop, so LeNet-5 and ``lenet5_bb`` keep 1.
SCHEDULES = {
    "lenet5": Schedule(
        pretrain_epochs=2,
        epochs=8,
        lr=2e-3,
        batch_size=64,
        refit_with_prune=True,
        admission_with_prune="gain",
    ),
    "dscnn": dataclasses.replace(
        DEFAULT_SCHEDULE,
        admission="gain",
        refit_with_prune=True,
        admission_with_prune="gain",
        budget_warmup_epochs=2,
        budget_warmup_below=2.0,
        microbatches=8,
    ),
    "lenet5_bb": dataclasses.replace(
        DEFAULT_SCHEDULE,
        quantizer_lr_decay_with_prune=True,
        move_at_floor=True,
        compiler_options=YNNPACK_REDUCTIONS_ONLY,
    ),
}


def schedule(model: str) -> Schedule:
    """``model``'s default :class:`Schedule`."""
    return SCHEDULES.get(model, DEFAULT_SCHEDULE)


#: Bits per KiB of memory (the CLI's memory limits are in KiB; see
#: :data:`cgmq_jax.limits.LIMIT_FLAGS`).
KIB = 8192


class TrainingDiverged(RuntimeError):
    """A non-finite loss or parameter: the run stops, and nothing is certified."""


class Interrupted(Exception):
    """Training was asked to stop (Ctrl-C); ``saved`` says whether a checkpoint was written."""

    def __init__(self, where: str, saved: bool):
        super().__init__(where)
        self.where = where
        self.saved = saved


def _positive_finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


#: ``field: (smallest, largest)`` allowed integer.
INTEGER_RANGES = {
    "epochs": (1, 10_000),
    "pretrain_epochs": (0, 10_000),
    "fill_epochs": (0, 10_000),
    "batch_size": (1, 1 << 20),
    "init_bits": (2, MAX_BITS),
    "bits_w": (2, MAX_BITS),
    "bits_a": (1, MAX_BITS),
    "calibration_size": (1, 1 << 20),
    "seed": (0, 2**32 - 1),
    "devices": (1, 1 << 16),
    "microbatches": (1, 1 << 20),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; the defaults are the README's headline run.

    ``epochs``, ``pretrain_epochs``, ``lr``, ``batch_size``, ``admission`` and
    ``microbatches`` left at ``None`` take the model's :func:`schedule` when the config is
    made (``microbatches``: where the batch splits into them, else 1)
    (``dataclasses.replace`` with another ``model`` keeps the values already set: pass them
    as ``None`` to take its schedule).
    """

    budget_bops: float | None = 2e6
    budget_weight_kib: float | None = None  # weight memory limit, KiB (8,192 bits)
    budget_activation_kib: float | None = None  # largest activation limit, KiB
    model: str = "lenet5"
    method: str = "cgmq"
    # None: the model's schedule (schedule(model): LeNet-5 2 float + 8 QAT epochs at
    # lr 2e-3, batch 64, every other model 5 + 25 at 1e-3, batch 128); set when the config
    # is made.
    epochs: int | None = None
    pretrain_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None  # weights (Adam, cosine-decayed over QAT)
    quantizer_lr: float = 1e-2  # quantizer latents (Adam), in log2 units
    # the quantizer latents' lr cosine-decayed over QAT like the weights' (False: constant);
    # None: constant, and with prune the model's schedule's
    quantizer_lr_decay: bool | None = None
    # cgmq, a BOP limit alone: the budget lowered geometrically from the network's cost at
    # its initial bits to the limit over the first this many QAT epochs (0: off; None: the
    # model's schedule's, see budget_warmup)
    budget_warmup_epochs: float | None = None
    rescale: float = constraint.DEFAULT_RESCALE
    # cgmq only: what the guard admits (cgmq_jax.admission); None: the model's schedule's
    # (with prune: its admission_with_prune)
    admission: str | None = None
    trades: bool = False  # cgmq only: bits moved by measured loss after each QAT epoch
    # cgmq (others ignore it): bits lost get least-squares ranges; None: on, and with prune
    # the model's schedule's
    refit_ranges: bool | None = None
    # cgmq, all_or_nothing: a quantizer at its minimum bit-width moves where it stays there
    # (cgmq_jax.admission.floor_moves); None: the model's schedule's, off with prune
    move_at_floor: bool | None = None
    prune: bool = False  # cgmq only: weight quantizers may go to 0 bits, removing channels
    init_bits: int = 8
    lam: float = 1.0  # dq only: the weight of the BOP term (and of the others by default)
    lam_weight: float | None = None  # dq only: the weight-memory term's (default: lam)
    lam_activation: float | None = None  # dq only: the activation term's (default: lam)
    bits_w: int = 4  # fixed only
    bits_a: int = 4  # fixed only
    input_bits: int | None = None  # the network input pinned at these bits (None: learned)
    fill_epochs: int = 1  # cgmq, ptq: epochs of weight training with the bits frozen
    calibration_size: int = 2048
    seed: int = 0
    devices: int = 1  # data parallel over this many devices (of all processes' devices)
    # each train step's batch taken in this many parts, one after another (the gradient is
    # their mean; cgmq_jax.runs.steps.microbatched); None: the model's schedule's
    microbatches: int | None = None

    def __post_init__(self):
        defaults = schedule(self.model)
        if self.admission is None and self.prune:
            object.__setattr__(self, "admission", defaults.admission_with_prune)
        if self.quantizer_lr_decay is None:
            decay = self.prune and defaults.quantizer_lr_decay_with_prune
            object.__setattr__(self, "quantizer_lr_decay", decay)
        for name in ("pretrain_epochs", "epochs", "lr", "batch_size", "admission"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(defaults, name))
        if self.move_at_floor is None:
            floor = defaults.move_at_floor and self.admission == "all_or_nothing"
            object.__setattr__(self, "move_at_floor", floor and not self.prune)
        if self.microbatches is None:  # the schedule's where the batch splits so, else 1
            parts = defaults.microbatches
            splits = isinstance(self.batch_size, int) and isinstance(self.devices, int)
            splits = splits and self.devices > 0 and self.batch_size % (parts * self.devices) == 0
            object.__setattr__(self, "microbatches", parts if splits else 1)

    @property
    def compiler_options(self) -> dict[str, str] | None:
        """The XLA options of the run's train steps (``jax.jit``'s ``compiler_options``):
        the model's schedule's on a CPU, else ``None`` (XLA's defaults). They change
        which library sums a convolution, so a run's last bits; ``results.json`` records
        them under ``versions``."""
        options = schedule(self.model).compiler_options
        return dict(options) if options and jax.default_backend() == "cpu" else None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its valid range."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.admission not in admission.ADMISSIONS:
            raise ValueError(
                f"unknown admission {self.admission!r}; choose one of {admission.ADMISSIONS}"
            )
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(models.MODELS)}")
        chosen = [flag for flag in ("trades", "prune") if getattr(self, flag)]
        if chosen and self.method != "cgmq":
            raise ValueError(
                f"--{chosen[0]} changes the constrained update's bits, so it applies to "
                f"--method cgmq only, not {self.method!r}: drop it or use --method cgmq"
            )
        if self.move_at_floor and self.admission != "all_or_nothing":
            raise ValueError(
                f"--move_at_floor changes the all-or-nothing guard only (--admission "
                f"{self.admission} already lets a quantizer move where it gains no bit): "
                "drop it or use --admission all_or_nothing"
            )
        if self.prune and (self.trades or self.admission == "within_bits"):
            raise ValueError(
                "--prune works with --admission all_or_nothing or gain only: "
                "drop --trades and --admission within_bits (they assume every weight "
                "quantizer keeps a level)"
            )
        if self.prune and not hasattr(models.MODELS[self.model], "prune"):
            raise ValueError(
                f"--prune: model {self.model!r} has no pruning option; use one of "
                f"{sorted(n for n, m in models.MODELS.items() if hasattr(m, 'prune'))}"
            )
        _check_limits(self)
        _check_integers(self)
        _check_numbers(self)
        _check_warmup(self)

    @property
    def refits(self) -> bool:
        """Whether ranges are refitted where bits fall: ``refit_ranges``, or by default on
        (with ``prune``: the model schedule's ``refit_with_prune``, docs/method.md section 12)."""
        if self.refit_ranges is not None:
            return bool(self.refit_ranges)
        return not self.prune or schedule(self.model).refit_with_prune

    def budget_warmup(self, min_bops: int) -> float:
        """Over how many first QAT epochs the BOP budget is lowered to the limit:
        ``budget_warmup_epochs``, or by default the model schedule's where it applies
        (``cgmq``, ``budget_bops`` alone and below the schedule's ``budget_warmup_below``
        times ``min_bops``, the network's minimum cost; no ``prune``), at most half the QAT
        epochs; 0: off."""
        if self.budget_warmup_epochs is not None:
            return self.budget_warmup_epochs
        defaults = schedule(self.model)
        applies = (
            self.method == "cgmq"
            and not self.prune
            and list(self.limits) == ["bops"]
            and self.budget_bops < defaults.budget_warmup_below * min_bops
            and isinstance(self.epochs, int)
            and self.epochs > 0
        )
        return min(defaults.budget_warmup_epochs, self.epochs / 2) if applies else 0

    @property
    def limits(self) -> dict:
        """``{cost name: limit}`` (BOPs; memory in bits) of the limits that are set
        (:func:`cgmq_jax.limits.limits_from_flags`, the one mapping from the flags)."""
        return limits_from_flags(vars(self))

    @property
    def guarded_limits(self) -> dict:
        """The limits the method works under: :attr:`limits` for ``cgmq``, ``dq`` and
        ``ptq``, else ``{}`` (``fixed`` and ``float`` are only measured against them)."""
        return self.limits if self.method in LIMITED_METHODS else {}


def _check_limits(config: TrainConfig) -> None:
    for flag, _, _ in LIMIT_FLAGS.values():
        value = getattr(config, flag.removeprefix("--"))
        if value is not None and not _positive_finite(value):
            raise ValueError(f"{flag} must be a positive finite number, got {value!r}")
    if config.method in LIMITED_METHODS and not config.limits:
        raise ValueError(
            f"method {config.method!r} needs a limit: --budget_bops, --budget_weight_kib "
            "and / or --budget_activation_kib"
        )


def _check_integers(config: TrainConfig) -> None:
    for name, (low, high) in INTEGER_RANGES.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"--{name} must be an integer in [{low}, {high}], got {value!r}")
    bits = config.input_bits
    if bits is not None and (
        isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS
    ):
        raise ValueError(
            f"--input_bits must be an integer in [1, {MAX_BITS}] (8: Bayesian Bits' "
            f"convention), or unset to learn the input's bits; got {bits!r}"
        )
    if config.batch_size % config.devices:
        raise ValueError(
            f"--batch_size {config.batch_size} does not split over --devices {config.devices}: "
            "choose a batch size that is a multiple of the number of devices"
        )
    parts = config.microbatches * config.devices
    if config.batch_size % parts:
        raise ValueError(
            f"--batch_size {config.batch_size} does not split into --microbatches "
            f"{config.microbatches} equal parts over --devices {config.devices}: choose a "
            f"batch size that is a multiple of {parts}, or fewer microbatches "
            "(--microbatches 1 takes the whole batch at once)"
        )


def _check_warmup(config: TrainConfig) -> None:
    warmup = config.budget_warmup_epochs
    if warmup is None:
        return
    if isinstance(warmup, bool) or not (
        isinstance(warmup, int | float) and math.isfinite(warmup) and 0 <= warmup <= config.epochs
    ):
        raise ValueError(
            f"--budget_warmup_epochs must be a number in [0, --epochs {config.epochs}], "
            f"got {warmup!r}"
        )
    if warmup and (config.method != "cgmq" or list(config.limits) != ["bops"]):
        raise ValueError(
            "--budget_warmup_epochs lowers the BOP budget of --method cgmq step by step: it "
            "needs --method cgmq and --budget_bops alone (no memory limits); drop it or them"
        )


def _check_numbers(config: TrainConfig) -> None:
    for name in ("lr", "quantizer_lr"):
        if not _positive_finite(getattr(config, name)):
            raise ValueError(
                f"--{name} must be a positive finite number, got {getattr(config, name)!r}"
            )
    if not (_positive_finite(config.rescale) and config.rescale > 1):
        raise ValueError(
            f"--rescale (CGGD's R) must be a finite number > 1, got {config.rescale!r}; "
            f"the default is {constraint.DEFAULT_RESCALE}"
        )
    for name in ("lam", "lam_weight", "lam_activation"):
        value = getattr(config, name)
        if name != "lam" and value is None:
            continue
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")


@dataclasses.dataclass
class FitResult:
    """What :func:`cgmq_jax.runs.fit.fit` returns: the certified model and everything
    measured on the way."""

    config: TrainConfig
    params: Any
    history: list[dict]
    test_accuracy: float
    certificate: dict
    wall_seconds: float
    data_source: str
    specs: tuple[cost.LayerSpec, ...] = ()
    #: Wall seconds by part: ``compile`` (the train steps), ``train``, ``evaluate``
    #: (validation after each epoch), ``other`` (setup, checkpoints, the fill and its
    #: weight training, certificate, test).
    timings: dict = dataclasses.field(default_factory=dict)
    #: The returned model's validation accuracy, and its float network's (quantized runs).
    val_accuracy: float | None = None
    float_val_accuracy: float | None = None

    @property
    def collapsed(self) -> bool:
        """Whether the returned model collapsed (:func:`cgmq_jax.certify.collapse_check`):
        certified, but more than 5 points below its float network on validation."""
        return bool(self.certificate.get("collapsed", False))
