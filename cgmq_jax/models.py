"""The models of the experiments, float or quantized by one switch, and BatchNorm folding.

* :class:`LeNet5`, the classic LeNet-5 (281,640 MACs), and :class:`LeNet5BB`, Bayesian
  Bits' wider LeNet-5 (4,267,008 MACs);
* :class:`MLP`, 784-300-100-10 (266,200 MACs);
* :class:`DSCNN`, a small depthwise-separable CNN with BatchNorm and residual adds
  (1,201,728 MACs).

Every model has a ``quantized`` field: ``False`` is the float network that is pretrained,
``True`` the network that quantization-aware training trains under the budget. A model
with BatchNorm (``DSCNN``) has it only in its float network; :func:`fold_batchnorm` folds
each BatchNorm into the layer before it, so the quantized network has no BatchNorm and its
quantized weights are the folded ones. :func:`folded` is the float network with BatchNorm
folded away (the model that :func:`cgmq_jax.calibration.init_quantizers` calibrates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cgmq_jax.nn import QuantConv, QuantDense, image_conv, max_pool


def _pruning(model) -> dict:
    """The options of a hidden layer of ``model``: per-channel and pruning with ``prune``
    (in the quantized network; the float one has no quantizers)."""
    return {"per_channel": True, "prune": True} if model.prune and model.quantized else {}


class LeNet5(nn.Module):
    """Classic LeNet-5 for 28x28x1 inputs.

    conv 6@5x5 (valid) -> max-pool 2 -> conv 16@5x5 (valid) -> max-pool 2 -> dense 120 ->
    dense 84 -> dense 10, ReLU. Every layer's input is non-negative (pixels, ReLU outputs),
    so every input quantizer is unsigned, explicitly (``input_signed=False``: a static
    decision, no ``input_signed`` leaf, and a ``ValueError`` if calibration images are
    negative). 281,640 MACs per example.
    """

    num_classes: int = 10
    quantized: bool = True
    channels: tuple[int, int] = (6, 16)  # of conv1, conv2
    hidden: tuple[int, ...] = (120, 84)  # dense layers before the logits
    input_bits: int | None = None  # the network input pinned at this many bits (None: learned)
    prune: bool = False  # per-channel weights that may remove channels (all but the logits)
    # conv1's ``conv_general_dilated`` (None: cgmq_jax.nn's rule, patches or banded)
    first_conv: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        options = {"quantize": self.quantized, "input_signed": False}
        hidden = {**options, **_pruning(self)}
        first, second = self.channels
        x = QuantConv(
            first,
            (5, 5),
            padding="VALID",
            name="conv1",
            input_bits=self.input_bits,
            conv_general_dilated=self.first_conv,
            **hidden,
        )(x)
        x = max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = QuantConv(second, (5, 5), padding="VALID", name="conv2", **hidden)(x)
        x = max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(QuantDense(width, name=f"fc{i + 1}", **hidden)(x))
        name = f"fc{len(self.hidden) + 1}"
        return QuantDense(self.num_classes, name=name, **options)(x)


class LeNet5BB(LeNet5):
    """Bayesian Bits' LeNet-5 (van Baalen et al., 2020) for 28x28x1 inputs.

    conv 32@5x5 -> max-pool 2 -> conv 64@5x5 -> max-pool 2 -> dense 512 -> dense 10, ReLU,
    with PyTorch's default ``padding=0`` of their ``nn.Conv2d`` (``'VALID'``), as
    :class:`LeNet5`; unsigned inputs as there. 4,267,008 MACs per example: conv1 460,800,
    conv2 3,276,800, fc1 524,288, fc2 5,120.

    conv1 computes with :func:`cgmq_jax.nn.image_conv` (XLA's convolution forward, the
    patches' input gradient): with the compiler option of this model's schedule
    (:data:`cgmq_jax.runs.config.SCHEDULES`) its cgmq step ran 1.10x as fast as with
    conv1 over its patches.
    """

    channels: tuple[int, int] = (32, 64)
    hidden: tuple[int, ...] = (512,)
    first_conv: Callable | None = image_conv


class MLP(nn.Module):
    """784-300-100-10 ReLU MLP on flattened inputs, unsigned inputs as in
    :class:`LeNet5`. 266,200 MACs per example."""

    hidden: tuple[int, ...] = (300, 100)
    num_classes: int = 10
    quantized: bool = True
    input_bits: int | None = None  # the network input pinned at this many bits (None: learned)
    prune: bool = False  # per-channel weights that may remove channels (all but the logits)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        options = {"quantize": self.quantized, "input_signed": False}
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            pin = {"input_bits": self.input_bits} if i == 0 else {}
            hidden = {**options, **pin, **_pruning(self)}
            x = nn.relu(QuantDense(width, name=f"fc{i + 1}", **hidden)(x))
        name = f"fc{len(self.hidden) + 1}"
        return QuantDense(self.num_classes, name=name, **options)(x)


class DSCNN(nn.Module):
    """A small depthwise-separable CNN for 28x28x1 inputs (MobileNet / MLPerf-Tiny DS-CNN).

    ======  =====================================  ===========  =========
    layer   operation                              output       MACs
    ======  =====================================  ===========  =========
    stem    conv 32@3x3, stride 2, SAME            14x14x32        56,448
    dw1     depthwise 3x3, SAME                    14x14x32        56,448
    pw1     pointwise 1x1, 64                      14x14x64       401,408
    dw2     depthwise 3x3, stride 2, SAME          7x7x64          28,224
    pw2     pointwise 1x1, 64                      7x7x64         200,704
    dw3     depthwise 3x3, SAME                    7x7x64          28,224
    pw3     pointwise 1x1, 64, + residual          7x7x64         200,704
    dw4     depthwise 3x3, SAME                    7x7x64          28,224
    pw4     pointwise 1x1, 64, + residual          7x7x64         200,704
    fc      global average pool, dense 10          10                 640
    total                                                       1,201,728
    ======  =====================================  ===========  =========

    Every convolution is followed by BatchNorm, then ReLU; blocks 3 and 4 add their input
    after the pointwise BatchNorm and apply ReLU to the sum (ResNet's order). Every layer's
    input is therefore non-negative (pixels, ReLU outputs, their average), so every input
    quantizer is unsigned, explicitly.

    BatchNorm is part of the float network only: with ``quantized=True``, or with
    ``batch_norm=False``, the convolutions have a bias and no BatchNorm follows them
    (:func:`fold_batchnorm` maps the float network's variables to those parameters). Call
    with ``train=True`` (and ``mutable=["batch_stats"]``) to train the float network on
    batch statistics; the default uses the running averages.
    """

    num_classes: int = 10
    quantized: bool = True
    batch_norm: bool = True  # BatchNorm in the float network (folded when quantized)
    stem_channels: int = 32
    channels: int = 64
    momentum: float = 0.9  # of the running averages: short pretraining needs them fast
    input_bits: int | None = None  # the network input pinned at this many bits (None: learned)
    prune: bool = False  # per-channel weights that may remove channels (stem and pw1)

    @property
    def has_batch_norm(self) -> bool:
        """Whether BatchNorm follows the convolutions: ``batch_norm`` and not ``quantized``."""
        return self.batch_norm and not self.quantized

    def _conv_bn(
        self, x, features, kernel_size, *, name, train, strides=1, groups=1, input_bits=None
    ):
        """A convolution and its BatchNorm (none when quantized: folded into its bias)."""
        pruning = _pruning(self) if name in ("stem", "pw1") else {}
        x = QuantConv(
            features,
            kernel_size,
            strides=strides,
            padding="SAME",
            feature_group_count=groups,
            use_bias=not self.has_batch_norm,
            quantize=self.quantized,
            input_signed=False,
            input_bits=input_bits,
            name=name,
            **pruning,
        )(x)
        if self.has_batch_norm:
            x = nn.BatchNorm(
                use_running_average=not train, momentum=self.momentum, name=f"{name}_bn"
            )(x)
        return x

    def _separable(self, x, features, *, block, train, strides=1):
        """Depthwise 3x3 -> BatchNorm -> ReLU -> pointwise 1x1 -> BatchNorm (no ReLU)."""
        channels = x.shape[-1]
        x = self._conv_bn(
            x, channels, (3, 3), strides=strides, groups=channels, name=f"dw{block}", train=train
        )
        return self._conv_bn(nn.relu(x), features, (1, 1), name=f"pw{block}", train=train)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self._conv_bn(
            x,
            self.stem_channels,
            (3, 3),
            strides=2,
            name="stem",
            train=train,
            input_bits=self.input_bits,
        )
        x = nn.relu(x)
        x = nn.relu(self._separable(x, self.channels, block=1, train=train))
        x = nn.relu(self._separable(x, self.channels, block=2, strides=2, train=train))
        for block in (3, 4):
            x = nn.relu(x + self._separable(x, self.channels, block=block, train=train))
        x = jnp.mean(x, axis=(1, 2))
        options = {"quantize": self.quantized, "input_signed": False}
        return QuantDense(self.num_classes, name="fc", **options)(x)


MODELS = {"lenet5": LeNet5, "lenet5_bb": LeNet5BB, "mlp": MLP, "dscnn": DSCNN}


def get_model(
    name: str, *, quantized: bool = True, input_bits: int | None = None, prune: bool = False
) -> nn.Module:
    """A model by name (one of :data:`MODELS`).

    ``input_bits`` pins the network input (the first layer's input quantizer) at that many
    bits, counted at them: 8 is Bayesian Bits' convention (the 8-bit image, exactly
    representable at ``d = 2**-8``). ``None`` (the default) learns it like every other
    quantizer. ``prune`` gives every layer but the logits per-channel weight quantizers
    that may remove channels (docs/method.md section 12; LeNet-5s and the MLP; the
    DS-CNN's stem and pw1 only).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if not prune:
        return MODELS[name](quantized=quantized, input_bits=input_bits)
    if "prune" not in {f.name for f in dataclasses.fields(MODELS[name])}:
        raise ValueError(
            f"model {name!r} has no pruning option; --prune works with "
            f"{sorted(n for n, m in MODELS.items() if hasattr(m, 'prune'))}"
        )
    return MODELS[name](quantized=quantized, input_bits=input_bits, prune=True)


def folded(model: nn.Module) -> nn.Module:
    """``model`` with its BatchNorm folded away: the same model with ``batch_norm=False``
    (whose float network is the one :func:`fold_batchnorm`'s parameters belong to), or
    ``model`` itself if it has no BatchNorm."""
    return model.clone(batch_norm=False) if hasattr(model, "batch_norm") else model


def batchnorm_pairs(model: nn.Module, *inputs, **call_kwargs) -> dict:
    """``{BatchNorm path: (path of the Conv / Dense layer it normalises, epsilon)}``.

    Traced from shapes (``inputs`` may be arrays or ``jax.ShapeDtypeStruct``; the call's
    other arguments, e.g. ``train=False``, as ``call_kwargs``): a BatchNorm is folded into
    the layer whose output it receives (the very array, not a copy).

    Raises:
      ValueError: a BatchNorm that cannot be folded (it does not directly follow a Conv or
        Dense layer, or it normalises another axis than the features), naming its path.
    """
    producers, kept, found = {}, [], {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if isinstance(module, nn.BatchNorm):
            name = "/".join(module.path)
            source = producers.get(id(args[0]) if args else None)
            if source is None:
                raise ValueError(
                    f"BatchNorm {name!r} does not directly follow a Conv or Dense layer, so it "
                    "cannot be folded into one for quantization: put it right after its layer "
                    "(conv -> BatchNorm -> activation), or remove it"
                )
            if module.axis not in (-1, args[0].ndim - 1) or module.axis_name is not None:
                raise ValueError(f"BatchNorm {name!r}: only a feature-axis (-1) BatchNorm folds")
            found[tuple(module.path)] = (source, module.epsilon)
        elif isinstance(module, nn.Conv | nn.Dense):
            producers[id(out)] = tuple(module.path)
            kept.append(out)  # alive, so that no other array reuses its id
        return out

    shapes = [
        jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32) if hasattr(x, "shape") else x
        for x in inputs
    ]
    with nn.intercept_methods(record):
        jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x, **call_kwargs), *shapes)
    return found


def fold_batchnorm(model: nn.Module, variables, *sample_inputs, **call_kwargs) -> dict:
    """The float network's variables with every BatchNorm folded into the layer before it.

    For a BatchNorm with scale ``gamma``, offset ``beta``, running mean and variance
    ``mean``, ``var`` after a layer with kernel ``W`` and bias ``b`` (0 if none), per
    output channel::

        s = gamma / sqrt(var + eps)
        W' = W * s        b' = beta + (b - mean) * s

    so the folded layer computes what the layer and its BatchNorm compute in evaluation
    mode (running averages). A pure function.

    Args:
      model: the float network with BatchNorm (e.g. ``DSCNN(quantized=False)``).
      variables: its variables, ``{"params": ..., "batch_stats": ...}``.
      *sample_inputs: the model's inputs (arrays or ``jax.ShapeDtypeStruct``): the shapes
        to trace which layer each BatchNorm follows.
      **call_kwargs: further call arguments of the model (e.g. ``train=False``).

    Returns:
      The parameters of :func:`folded` ``(model)``: the BatchNorm entries removed, each
      folded layer with its new ``kernel`` and ``bias`` (quantizer leaves, if any, kept).

    Raises:
      ValueError: a BatchNorm that does not directly follow a Conv or Dense layer.

    A user's own model does not need this: :func:`cgmq_jax.init_quantizers` folds the float
    variables it is given (``{"params", "batch_stats"}``) itself.
    """
    params = flax.core.unfreeze(variables["params"])
    stats = flax.core.unfreeze(variables.get("batch_stats", {}))
    pairs = batchnorm_pairs(model, *sample_inputs, **call_kwargs)
    flat = flax.traverse_util.flatten_dict(params)
    flat_stats = flax.traverse_util.flatten_dict(stats)
    for norm, (layer, epsilon) in pairs.items():
        kernel = flat[(*layer, "kernel")]
        features = kernel.shape[-1]
        gamma = flat.pop((*norm, "scale"), jnp.ones(features, kernel.dtype))
        beta = flat.pop((*norm, "bias"), jnp.zeros(features, kernel.dtype))
        mean, var = flat_stats[(*norm, "mean")], flat_stats[(*norm, "var")]
        bias = flat.get((*layer, "bias"), jnp.zeros(features, kernel.dtype))
        flat[(*layer, "kernel")], flat[(*layer, "bias")] = folded_kernel_and_bias(
            kernel, bias, gamma, beta, mean, var, epsilon
        )
    return flax.traverse_util.unflatten_dict(flat)


def folded_kernel_and_bias(kernel, bias, gamma, beta, mean, var, epsilon: float):
    """``(W * s, beta + (b - mean) * s)`` with ``s = gamma / sqrt(var + eps)`` per output
    channel (the last axis of ``kernel``): one BatchNorm folded into the layer before it.
    The arithmetic of :func:`fold_batchnorm`, and of NNX's (:mod:`cgmq_jax.rules_nnx`)."""
    scale = gamma * jax.lax.rsqrt(var + epsilon)
    kernel = kernel * jnp.reshape(scale, (1,) * (kernel.ndim - 1) + (-1,))
    return kernel, beta + (bias - mean) * scale
