"""Quantized Flax NNX layers, their calibration and their cost: the NNX room of ``cgmq_jax``.

:class:`QuantLinear` and :class:`QuantConv` subclass ``flax.nnx.Linear`` and
``flax.nnx.Conv`` (same constructor, same ``kernel`` / ``bias``) and quantize their input
and kernel with the functions the linen layers use (:mod:`cgmq_jax.nn`,
:mod:`cgmq_jax.quantizer`). Their options are those of :class:`cgmq_jax.nn.QuantOptions`
(all of them: ``quantize``, ``input_signed``, ``calibration_percentile``, ``per_channel``,
``input_bits``, ``weight_bits``). Their extra state:

* ``input_quantizer`` and ``weight_quantizer``: :class:`Quantizer` variables, each
  ``[log2 d, log2 q_max]``. ``Quantizer`` subclasses ``nnx.Param``, so the quantizers train
  with the weights (``nnx.grad``, ``nnx.Optimizer(..., wrt=nnx.Param)``) and can still be
  told apart by type (``nnx.All(nnx.Param, nnx.Not(Quantizer))`` is the weights alone).
  Their names end in ``_quantizer``: :func:`cgmq_jax.quantizer.param_labels` labels them
  in any ``nnx.State``, including the pure one ``nnx.Optimizer`` hands to optax.
* ``input_signedness``: an :class:`InputSignedness` variable, +1 signed, -1 unsigned, 0
  not calibrated. It is not a ``Param``: no gradient reaches it and no optimizer holds it.

An NNX layer is built without data, so its input quantizer is set by :func:`calibrate`:
the float forward pass on a batch, then every quantizer at exactly the given bit-width
(and each data-decided signedness). A quantized forward pass before that raises. For float
pretraining, ``model.set_attributes(quantize=False)`` (the layers then compute exactly
``nnx.Linear`` / ``nnx.Conv``), then ``quantize=True`` and :func:`calibrate`.

The costing side is :mod:`cgmq_jax.nnx_specs`'s, kept apart from the layers:
:func:`layer_specs` (the quantized layers and their MACs from an abstract forward pass, so
:func:`cgmq_jax.cost.bops` and :func:`cgmq_jax.constraint.constrained_update` work on NNX
models unchanged), :func:`linen_params` and :func:`with_state`. Those names resolve here
too (on first use: that module imports this one).

One name for linen and NNX: :func:`cgmq_jax.cost.layer_specs` and
:func:`cgmq_jax.calibration.init_quantizers` take an NNX module too and call :func:`layer_specs` /
:func:`calibrate` here; :func:`cgmq_jax.rules.quantize_model` turns the plain
``nnx.Linear`` / ``nnx.Conv`` layers of an unmodified NNX model into these layers; and
:func:`cgmq_jax.graph.trace` (so :func:`cgmq_jax.lowering.export`) traces an NNX model, its
layers reporting their paths (:func:`reporting_paths`) and its parameters read as the
linen tree (:func:`linen_params`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cgmq_jax import _deprecated, conv, operands, quantizer
from cgmq_jax import nn as qnn

DEFAULT_PERCENTILE = qnn.DEFAULT_PERCENTILE
NOT_CALIBRATED = 0.0  # the value of ``input_signedness`` before calibrate()


class Quantizer(nnx.Param):
    """A quantizer's latents ``[log2 d, log2 q_max]``: a trainable ``Param`` of its own type."""


class InputSignedness(nnx.Variable):
    """A layer's input signedness as calibrated: +1.0 signed, -1.0 unsigned, 0.0 not yet.

    Not a ``Param``: ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` leave it alone.
    """


@dataclasses.dataclass
class _Observation:
    """What calibration needs from the calls of a layer (concrete arrays: eager)."""

    input_range: jax.Array
    signed: bool | jax.Array  # the explicit setting, or the data's decision
    negative: jax.Array  # whether any input value was negative

    def merge(self, other: _Observation) -> _Observation:
        """Two calls of one layer: signed if either is, the larger range.

        A call decided unsigned had no negative input, so its range is also its signed one.
        """
        return _Observation(
            input_range=jnp.maximum(self.input_range, other.input_range),
            signed=self.signed | other.signed,
            negative=self.negative | other.negative,
        )


@dataclasses.dataclass
class _Recorder:
    """Collects the calls of quantized layers during one forward pass."""

    calibrating: bool  # observe inputs and compute in float
    # (layer, input shape, output shape) of each call
    calls: list[tuple[Any, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list
    )
    observed: dict[int, tuple[Any, _Observation]] = dataclasses.field(default_factory=dict)


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "cgmq_nnx_recorder", default=None
)


@contextlib.contextmanager
def _recording(*, calibrating: bool) -> Iterator[_Recorder]:
    recorder = _Recorder(calibrating)
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def _not_calibrated_error(layer) -> ValueError:
    return ValueError(
        f"{type(layer).__name__}(in_features={layer.in_features}, "
        f"out_features={layer.out_features}) has no calibrated input quantizer: call "
        "cgmq_jax.nnx.calibrate(model, batch) before the quantized forward pass (or compute "
        "in float: model.set_attributes(quantize=False))"
    )


def _check_calibrated(layer, stored: jax.Array) -> None:
    """Raise :func:`_not_calibrated_error` now, or when a traced computation runs."""
    missing = stored == NOT_CALIBRATED
    try:
        if bool(missing):
            raise _not_calibrated_error(layer)
        return
    except jax.errors.ConcretizationTypeError:
        pass
    message = str(_not_calibrated_error(layer))  # made now: the callback keeps no module

    def check(missing):
        if missing:
            raise ValueError(message)

    jax.debug.callback(check, missing)


_OPTION_NAMES = tuple(field.name for field in dataclasses.fields(qnn.QuantOptions))
_PATHS: contextvars.ContextVar[dict[int, tuple] | None] = contextvars.ContextVar(
    "cgmq_nnx_paths", default=None
)


@contextlib.contextmanager
def reporting_paths(model: nnx.Module) -> Iterator[None]:
    """While open, the quantized layers of ``model`` report their paths in ``model`` to
    :func:`cgmq_jax.nn.record_layers` (an NNX layer does not know its own path), as
    strings, the keys of :func:`linen_params`."""
    paths = {id(module): tuple(map(str, path)) for path, module in nnx.iter_modules(model)}
    token = _PATHS.set(paths)
    try:
        yield
    finally:
        _PATHS.reset(token)


def _pop_options(kwargs: dict) -> qnn.QuantOptions:
    """The quantizer options among a layer's keyword arguments (removed from them)."""
    return qnn.QuantOptions(**{name: kwargs.pop(name) for name in _OPTION_NAMES if name in kwargs})


class _QuantizedLayer:
    """What :class:`QuantLinear` and :class:`QuantConv` share (put before the Flax class)."""

    def _add_quantizers(self, options: qnn.QuantOptions, *, keep_float: bool = False) -> None:
        for name in _OPTION_NAMES:
            setattr(self, name, getattr(options, name))
        # A layer a rule keeps in float (quantize_model): no quantizers, counted at 32 bits.
        self.keep_float = keep_float
        if keep_float:
            self.quantize = False
            return
        self.weight_quantizer = Quantizer(self._weight_quantizer_at(8))
        # A placeholder: calibrate() sets the range from data (the forward refuses until then).
        self.input_quantizer = Quantizer(operands.initial_quantizer(1.0, signed=True))
        self.input_signedness = InputSignedness(jnp.float32(NOT_CALIBRATED))

    @property
    def options(self) -> qnn.QuantOptions:
        """The layer's quantizer options, as :class:`cgmq_jax.nn.QuantOptions`."""
        return qnn.options_of(self)

    @property
    def quantized(self) -> bool:
        """Whether the forward pass quantizes (``quantize``, unless a rule keeps it float)."""
        return bool(self.quantize) and not self.keep_float

    def _kernel(self) -> jax.Array:
        return self.kernel[...]

    def _weight_quantizer_at(self, bits: int) -> jax.Array:
        """The weight quantizer at ``bits`` (or the pinned ``weight_bits``) from ``max|W|``."""
        return operands.initial_quantizer(
            operands.weight_range(self._kernel(), self.per_channel),
            signed=True,
            bits=self.weight_bits or bits,
        )

    def _input_signed(self):
        """A Python bool (explicit ``input_signed``) or a traced one (decided by the data)."""
        stored = self.input_signedness[...]
        _check_calibrated(self, stored)
        if self.input_signed is not None:
            return bool(self.input_signed)
        return quantizer.is_signed_leaf(stored)

    def _quantized_operands(self, inputs: jax.Array, kernel: jax.Array):
        signed = self._input_signed()
        x = jnp.asarray(inputs, jnp.float32)
        kernel = jnp.asarray(kernel, jnp.float32)
        input_theta = operands.effective_quantizer(
            self.input_quantizer[...], self.input_bits, signed=signed
        )
        weight_theta = operands.effective_quantizer(
            self.weight_quantizer[...], self.weight_bits, signed=True
        )
        return (
            operands.quantize_tensor(input_theta, x, signed=signed),
            operands.quantize_tensor(weight_theta, kernel, signed=True, prune=self.prune),
        )

    def _masked_bias(self):
        """The bias, with a removed channel's entry 0 when the layer prunes (as in linen)."""
        bias = self.bias[...] if self.bias is not None else None
        if bias is None or not self.prune:
            return bias
        return bias * operands.live_channels(self.weight_quantizer[...])

    def _observe(self, inputs: jax.Array) -> _Observation:
        x = jnp.asarray(inputs, jnp.float32)
        signed = self.input_signed
        signed = operands.decided_signedness(x) if signed is None else bool(signed)
        return _Observation(
            input_range=operands.input_range(
                x, signed=signed, percentile=self.calibration_percentile
            ),
            signed=signed,
            negative=jnp.any(x < 0),
        )

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        recorder = _RECORDER.get()
        calibrating = recorder is not None and recorder.calibrating
        if calibrating and not self.keep_float:
            observation = self._observe(inputs)
            if id(self) in recorder.observed:
                observation = recorder.observed[id(self)][1].merge(observation)
            recorder.observed[id(self)] = (self, observation)
        x = inputs if calibrating else qnn._mark(inputs, "in")  # for cgmq_jax.graph.trace
        quantized_input = None
        if self.quantized and not calibrating:
            y, quantized_input = self._quantized_call(x, out_sharding)
        else:
            y = super().__call__(x, out_sharding)  # Flax's own float layer
        if recorder is not None:
            recorder.calls.append((self, tuple(inputs.shape), tuple(y.shape)))
        if not calibrating:
            y = qnn._mark(y, "out")
            path = (_PATHS.get() or {}).get(id(self), ())
            options = dataclasses.replace(self.options, quantize=self.quantized)
            qnn._report(self, options, inputs, self.kernel, y, quantized_input, path=path)
        return y


def _product_kwargs(layer, out_sharding) -> dict:
    """Flax's optional keyword arguments of ``dot_general`` / ``conv_general_dilated``."""
    kwargs = {"out_sharding": out_sharding}
    if layer.preferred_element_type is not None:
        kwargs["preferred_element_type"] = layer.preferred_element_type
    return kwargs


class QuantLinear(_QuantizedLayer, nnx.Linear):
    """``y = Q(x) @ Q(W) + b``: :class:`flax.nnx.Linear` with quantizers.

    Takes ``flax.nnx.Linear``'s arguments (``in_features, out_features, *, use_bias, dtype,
    param_dtype, ..., rngs``) and, keyword-only, the quantizer options of the linen layers.
    With ``quantize=False`` it computes exactly ``flax.nnx.Linear``.

    Args:
      in_features: the number of input features.
      out_features: the number of output features.
      **kwargs: ``flax.nnx.Linear``'s keyword arguments (``rngs`` required) and the options
        quantize, input_signed, calibration_percentile, per_channel, input_bits,
        weight_bits of :class:`cgmq_jax.nn.QuantOptions` (``per_channel=True``: a weight
        quantizer of shape ``(out_features, 2)``; ``input_bits=8``: the input pinned at 8
        bits). ``input_signed=False`` with negative calibration inputs makes
        :func:`calibrate` raise.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from cgmq_jax.nnx import QuantLinear, calibrate
      >>> layer = QuantLinear(8, 10, per_channel=True, input_bits=8, rngs=nnx.Rngs(0))
      >>> x = jnp.linspace(-1.0, 1.0, 8)[None]
      >>> calibrate(layer, x)
      >>> layer(x).shape, layer.weight_quantizer.shape, float(layer.input_signedness[...])
      ((1, 10), (10, 2), 1.0)
    """

    def __init__(self, in_features: int, out_features: int, **kwargs):
        options = _pop_options(kwargs)
        super().__init__(in_features, out_features, **kwargs)
        self._add_quantizers(options)

    def _quantized_call(self, inputs: jax.Array, out_sharding):
        x, kernel = self._quantized_operands(inputs, self._kernel())
        quantized_input = x
        bias = self._masked_bias()
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = self.dot_general(
            x,
            kernel,
            (((x.ndim - 1,), (0,)), ((), ())),
            precision=self.precision,
            **_product_kwargs(self, out_sharding),
        )
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y, quantized_input


class QuantConv(_QuantizedLayer, nnx.Conv):
    """``y = conv(Q(x), Q(W)) + b``: :class:`flax.nnx.Conv` with quantizers.

    Takes ``flax.nnx.Conv``'s arguments (``in_features, out_features, kernel_size,
    strides=1, *, padding, input_dilation, kernel_dilation, feature_group_count, use_bias,
    mask, dtype, param_dtype, ..., rngs``; any number of spatial axes, channels last, every
    padding form Flax accepts) and, keyword-only, the quantizer options of
    :class:`QuantLinear`. With ``quantize=False`` it computes exactly ``flax.nnx.Conv``. The
    input is quantized before any padding (padded zeros are the code 0); a ``mask`` is
    applied to the kernel before it is quantized. The convolution itself is chosen by the
    linen layer's rule (:func:`cgmq_jax.nn.convolution`), so both compute the same program.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from cgmq_jax.nnx import QuantConv, calibrate
      >>> layer = QuantConv(1, 8, (3, 3), strides=2, padding=1, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 28, 28, 1))
      >>> calibrate(layer, x, input_bits=4)
      >>> layer(x).shape, float(layer.input_signedness[...])
      ((2, 14, 14, 8), -1.0)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, ...],
        strides: int | tuple[int, ...] | None = 1,
        **kwargs,
    ):
        options = _pop_options(kwargs)
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        self._add_quantizers(options)

    def _kernel(self) -> jax.Array:
        kernel = self.kernel[...]
        return kernel if self.mask is None else kernel * self.mask

    def _quantized_call(self, inputs: jax.Array, out_sharding):
        geometry = conv.conv_geometry(self)  # Flax's rules: nnx.Conv has the fields
        # Flax's batch handling: any number of leading batch axes, or none.
        batch_shape = inputs.shape[: inputs.ndim - (len(geometry["kernel_size"]) + 1)]
        if len(batch_shape) != 1:
            inputs = jnp.reshape(inputs, (-1, *inputs.shape[len(batch_shape) :]))
        if self.mask is not None and self.mask.shape != self.kernel_shape:
            raise ValueError(
                "Mask needs to have the same shape as weights. "
                f"Shapes are: {self.mask.shape}, {self.kernel_shape}"
            )
        if self.prune and self.feature_group_count != 1:
            raise ValueError(
                "prune=True needs feature_group_count=1 (a grouped or depthwise "
                "convolution's channels follow its input's; prune the layer before it)"
            )
        x, kernel = self._quantized_operands(inputs, self._kernel())
        quantized_input = x
        bias = self._masked_bias()
        if geometry["pre_padding"] is not None:
            pads = [(0, 0), *geometry["pre_padding"], (0, 0)]
            x = jnp.pad(x, pads, mode=geometry["pad_mode"])
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        convolve = qnn.convolution(self, self.options, x, geometry)
        extra = {} if convolve is qnn.patch_conv else _product_kwargs(self, out_sharding)
        y = convolve(
            x,
            kernel,
            geometry["strides"],
            geometry["padding"],
            lhs_dilation=geometry["input_dilation"],
            rhs_dilation=geometry["kernel_dilation"],
            dimension_numbers=conv.conv_dimension_numbers(x.shape),
            feature_group_count=self.feature_group_count,
            precision=self.precision,
            **extra,
        )
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if len(batch_shape) != 1:
            y = jnp.reshape(y, (*batch_shape, *y.shape[1:]))
        return y, quantized_input


QUANTIZED_LAYERS = (QuantLinear, QuantConv)


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def calibrate(model: nnx.Module, *args, input_bits: int = 8, weight_bits: int = 8, **kwargs):
    """Set every quantizer of ``model`` at an exact bit-width from a batch (in place).

    Runs ``model(*args, **kwargs)`` eagerly in float (whatever each layer's ``quantize``),
    then, for each quantized layer that ran: its input quantizer takes its range from a high
    percentile of the layer's inputs (``calibration_percentile``), at ``input_bits``; its
    weight quantizer from ``max|W|``, at ``weight_bits``; a layer with ``input_signed=None``
    becomes signed iff its inputs have a negative value. A layer called several times is
    calibrated for all its calls: signed if any call's inputs are, the largest range. Nothing
    changes if a layer with ``input_signed=False`` sees a negative input: that raises a
    ``ValueError`` naming it.

    Args:
      model: an NNX module holding :class:`QuantLinear` / :class:`QuantConv` layers.
      *args: the model's call arguments: a calibration batch (and any other inputs).
      input_bits: the bit-width of every input quantizer (a layer's pinned ``input_bits``
        wins).
      weight_bits: the bit-width of every weight quantizer (a layer's pinned
        ``weight_bits`` wins; a ``per_channel`` layer's range is per output channel).
      **kwargs: the model's keyword call arguments (e.g. ``train=False``).
    """
    with _recording(calibrating=True) as recorder:
        model(*args, **kwargs)
    if not recorder.observed:
        raise ValueError(
            f"{type(model).__name__} called no QuantLinear / QuantConv layer: nothing to calibrate"
        )
    paths = {id(module): path for path, module in nnx.iter_modules(model)}
    for layer, observation in recorder.observed.values():
        if layer.input_signed is False and bool(observation.negative):
            raise operands.unsigned_error(_name(paths[id(layer)]))
    for layer, observation in recorder.observed.values():
        layer.input_quantizer[...] = operands.initial_quantizer(
            observation.input_range, signed=observation.signed, bits=layer.input_bits or input_bits
        )
        layer.input_signedness[...] = quantizer.signedness_leaf(observation.signed)
        layer.weight_quantizer[...] = layer._weight_quantizer_at(weight_bits)


#: The costing side, moved to :mod:`cgmq_jax.nnx_specs` and still importable from here
#: (lazily: that module imports this one).
_SPECS = ("layer_specs", "linen_params", "with_state", "_MAC_LAYERS", "_calibrated_signedness",
          "_is_array", "_refuse_plain_layers", "_spec")  # fmt: skip


__getattr__ = _deprecated.moved(
    __name__, dict.fromkeys(_SPECS, "cgmq_jax.nnx_specs"), warn=False, namespace=globals()
)


def __dir__():
    return sorted((*globals(), *_SPECS))


#: The public names, in the API reference's order (the costing side's resolved on first use).
__all__ = [
    "DEFAULT_PERCENTILE",
    "NOT_CALIBRATED",
    "Quantizer",
    "InputSignedness",
    "reporting_paths",
    "QuantLinear",
    "QuantConv",
    "QUANTIZED_LAYERS",
    "calibrate",
    "layer_specs",  # noqa: F822  (resolved by __getattr__, as the two below)
    "with_state",  # noqa: F822
    "linen_params",  # noqa: F822
]
