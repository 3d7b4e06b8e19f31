"""The trainer's public face: every name of :func:`fit` and its protocol, in one module.

The code lives in :mod:`cgmq_jax.runs.config` (``TrainConfig``, ``FitResult``),
:mod:`~cgmq_jax.runs.steps` (steps, batches, epochs, evaluation), :mod:`~cgmq_jax.runs.setup`
(models, first states, optimizers, the guard's limits), :mod:`~cgmq_jax.runs.fill`,
:mod:`~cgmq_jax.runs.ptq` (post-training quantization), :mod:`~cgmq_jax.runs.resume`
(first or restored state, checkpoints, ``stop_on_sigint``), :mod:`~cgmq_jax.runs.finish`
(select, repair, fill, certify, test) and :mod:`~cgmq_jax.runs.fit` (``fit`` and its
training phases); this module re-exports them, and is the module behind the old name
``cgmq_jax.train``.

Setting one of its names (``monkeypatch.setattr(train, "make_train_step", ...)``, or
``train.fit = ...``) sets it in every module of :mod:`cgmq_jax.runs` that holds the same
object, so that the substitute is the one that ``fit`` calls, as it was when all of this
was one module.
"""

from __future__ import annotations

import sys
import types

from cgmq_jax.runs.config import (
    KIB,
    LIMITED_METHODS,
    MAX_BITS,
    METHODS,
    FitResult,
    Interrupted,
    TrainConfig,
    TrainingDiverged,
)
from cgmq_jax.runs.fill import FILL_LR_SCALE, _fill, _tune_weights
from cgmq_jax.runs.finish import _finish_float, _finish_ptq, _finish_qat
from cgmq_jax.runs.fit import fit
from cgmq_jax.runs.ptq import calibration_split, post_train
from cgmq_jax.runs.resume import (
    StopFlag,
    _checkpoint_arrays,
    _restore,
    _stop_never,
    stop_on_sigint,
)
from cgmq_jax.runs.setup import (
    _calibration_batch,
    _float_state,
    _float_variables_of,
    _lams,
    _make_setup,
    _qat_loss,
    _qat_state,
    _Setup,
    check_config,
    check_dataset,
    guard_constraints,
    initial_step,
)
from cgmq_jax.runs.steps import (
    BatchNormTrainState,
    _check_finite,
    _constraint_state,
    _cross_entropy,
    _epoch_name,
    _evaluate_float,
    _evaluate_qat,
    _float_variables,
    _Progress,
    _train_epoch,
    batches,
    dq_penalty,
    make_accuracy,
    make_train_step,
)

__all__ = [
    "KIB",
    "LIMITED_METHODS",
    "MAX_BITS",
    "METHODS",
    "BatchNormTrainState",
    "FILL_LR_SCALE",
    "FitResult",
    "Interrupted",
    "StopFlag",
    "TrainConfig",
    "TrainingDiverged",
    "batches",
    "calibration_split",
    "check_config",
    "check_dataset",
    "dq_penalty",
    "fit",
    "guard_constraints",
    "initial_step",
    "make_accuracy",
    "make_train_step",
    "post_train",
    "stop_on_sigint",
]
_PRIVATE = (  # reached by tests and tools through ``cgmq_jax.train``
    _calibration_batch,
    _check_finite,
    _checkpoint_arrays,
    _constraint_state,
    _cross_entropy,
    _epoch_name,
    _evaluate_float,
    _evaluate_qat,
    _fill,
    _finish_float,
    _finish_ptq,
    _finish_qat,
    _float_state,
    _float_variables,
    _float_variables_of,
    _lams,
    _make_setup,
    _Progress,
    _qat_loss,
    _qat_state,
    _restore,
    _Setup,
    _stop_never,
    _train_epoch,
    _tune_weights,
)


class _Forwarding(types.ModuleType):
    """A module whose attribute assignments reach the modules that define the names."""

    def __setattr__(self, name: str, value) -> None:
        old = self.__dict__.get(name)
        if old is not None and not isinstance(old, types.ModuleType):
            for module_name, module in list(sys.modules.items()):
                if (
                    module is not self
                    and module_name.startswith("cgmq_jax.runs.")
                    and getattr(module, name, None) is old
                ):
                    setattr(module, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Forwarding
