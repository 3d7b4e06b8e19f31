"""The windowed array ops the quantized convolution and the models compute with.

* :func:`conv_geometry`: a ``flax.linen.Conv``'s (or ``flax.nnx.Conv``'s) static geometry
  by Flax's own rules, which the linen and NNX layers and the export share;
* :func:`patch_conv`: ``jax.lax.conv_general_dilated`` computed as patches times the
  kernel (one input channel into few filters: as a banded matrix product), faster on
  XLA:CPU for convolutions with few input channels;
* :func:`image_conv`: XLA's convolution forward, with the patches' input gradient;
* :func:`max_pool`: ``flax.linen.max_pool`` with a cheaper gradient for tiling windows.

Pure functions of arrays and shapes: no module state, no quantizers. The layers that use
them are in :mod:`cgmq_jax.nn` (which also re-exports these names).
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding


def _as_tuple(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
    """Flax's broadcast of an int (or ``None``, meaning 1) to one entry per spatial axis."""
    if value is None:
        value = 1
    return (value,) * rank if isinstance(value, int) else tuple(value)


def conv_geometry(module: nn.Conv) -> dict:
    """The static geometry of a convolution, by ``flax.linen.Conv``'s own rules.

    Returns ``kernel_size``, ``strides``, ``input_dilation``, ``kernel_dilation``, the
    ``pre_padding`` that ``jnp.pad`` applies first (``'CIRCULAR'``, ``'REFLECT'``,
    ``'CAUSAL'``; else ``None``) with its ``pad_mode``, and the ``padding`` passed to
    ``lax.conv_general_dilated`` (a string or ``(low, high)`` pairs).
    """
    kernel_size = _as_tuple(module.kernel_size, 1)
    rank = len(kernel_size)
    kernel_dilation = _as_tuple(module.kernel_dilation, rank)
    padding = canonicalize_padding(module.padding, rank)
    pre_padding, pad_mode = None, "constant"
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
        pre_padding = [((k - 1) // 2, k // 2) for k in dilated]
        pad_mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        padding = "VALID"
    elif padding == "CAUSAL":
        if rank != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        pre_padding = [(kernel_dilation[0] * (kernel_size[0] - 1), 0)]
        padding = "VALID"
    return {
        "kernel_size": kernel_size,
        "strides": _as_tuple(module.strides, rank),
        "input_dilation": _as_tuple(module.input_dilation, rank),
        "kernel_dilation": kernel_dilation,
        "pre_padding": pre_padding,
        "pad_mode": pad_mode,
        "padding": padding,
    }


def patch_conv(
    x,
    kernel,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """``jax.lax.conv_general_dilated`` for channels-last inputs and ``(*spatial, in, out)``
    kernels, computed as patches (one strided slice per kernel offset) times the kernel.

    Any strides, padding and kernel dilation; no input dilation. One input channel into at
    most ``BANDED_MAX_FILTERS`` filters (rows at most ``BANDED_MAX_WIDTH`` wide) runs as a
    banded matrix product over whole input rows instead (:func:`_banded_conv`). Groups only
    as a depthwise convolution with one output channel per input channel
    (``feature_group_count`` equal to both, a ``(*spatial, 1, C)`` kernel): then each
    patch is multiplied by its channel's kernel and summed over the window.
    (``dimension_numbers`` is assumed to be Flax's channels-last one.)

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.arange(2 * 6 * 6 * 1.0).reshape(2, 6, 6, 1)
      >>> k = jnp.ones((3, 3, 1, 4))
      >>> dn = ("NHWC", "HWIO", "NHWC")
      >>> ref = jax.lax.conv_general_dilated(x, k, (2, 1), "SAME", dimension_numbers=dn)
      >>> bool(jnp.all(patch_conv(x, k, (2, 1), "SAME") == ref))
      True
    """
    del dimension_numbers
    spatial = x.ndim - 2
    depthwise = feature_group_count != 1
    if depthwise:
        _require_depthwise(x, kernel, feature_group_count, "patch_conv")
    if any(d != 1 for d in _as_tuple(lhs_dilation, spatial)):
        raise ValueError("patch_conv has no input dilation")
    kernel_size = kernel.shape[:spatial]
    strides, pads, dilation = _window(x, kernel, window_strides, padding, rhs_dilation)
    x = _pad_and_crop(x, pads)
    if depthwise:
        return _depthwise_sum(x, kernel, strides, dilation)
    if _banded_pays(x, kernel):
        return _banded_conv(x, kernel, strides, dilation, precision)
    patches = _patches(x, kernel_size, dilation, strides)
    # One matrix product over the flattened positions: XLA:CPU's dot of a 4-D array was
    # 1.5-2.5x slower forward and backward (a 14x14x32 -> 64 1x1 convolution, batch 128).
    rows = jnp.reshape(patches, (-1, patches.shape[-1]))
    product = jnp.dot(rows, jnp.reshape(kernel, (-1, kernel.shape[-1])), precision=precision)
    return jnp.reshape(product, (*patches.shape[:-1], kernel.shape[-1]))


def _patches(x, kernel_size, dilation, strides) -> jax.Array:
    """The patches of the padded ``x``: ``(batch, *out, offsets * C)``, the kernel's
    offsets in row-major order, channels fastest (the flattened kernel's rows)."""
    columns = _columns(x, kernel_size, dilation, strides)
    if x.shape[-1] == 1:
        # One channel: each column is stacked whole, then the offsets moved last (a copy
        # XLA:CPU does in tiles). Concatenated along the last axis, 25 single-channel
        # columns were written one element in 25 at a time: 12.6 of 109 ms of lenet5_bb's
        # step on one core. The same array, so the same products bit for bit.
        return jnp.moveaxis(jnp.stack([c[..., 0] for c in columns]), 0, -1)
    return jnp.concatenate(columns, axis=-1)


def image_conv(
    x,
    kernel,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """``jax.lax.conv_general_dilated`` (channels last, no groups, no input dilation) whose
    forward pass and kernel gradient are XLA's convolution, and whose input gradient is
    the patches' (:func:`patch_conv`'s: the output gradient times the kernel, added back
    at each offset).

    For a network's first convolution when its input quantizer learns (that needs the
    input gradient, which XLA:CPU computes slowly for few channels) and XLA:CPU's
    convolutions run on Eigen (the compiler option of ``lenet5_bb``'s schedule,
    :class:`cgmq_jax.runs.config.Schedule`): ``lenet5_bb``'s conv1 (one channel into 32
    filters) made its cgmq step 1.10x as fast as :func:`patch_conv` there, and 0.93x
    under XLA's default options (docs/performance.md). With quantized operands (codes
    times powers of two) the forward pass computes the same exact sums as
    :func:`patch_conv`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.arange(2 * 6 * 6 * 1.0).reshape(2, 6, 6, 1)
      >>> k = jnp.ones((3, 3, 1, 4))
      >>> dn = ("NHWC", "HWIO", "NHWC")
      >>> ref = jax.lax.conv_general_dilated(x, k, (2, 1), "SAME", dimension_numbers=dn)
      >>> bool(jnp.all(image_conv(x, k, (2, 1), "SAME") == ref))
      True
    """
    del dimension_numbers
    if feature_group_count != 1:
        raise ValueError("image_conv has no feature groups")
    if any(d != 1 for d in _as_tuple(lhs_dilation, x.ndim - 2)):
        raise ValueError("image_conv has no input dilation")
    strides, pads, dilation = _window(x, kernel, window_strides, padding, rhs_dilation)
    return _xla_forward_conv(_pad_and_crop(x, pads), kernel, strides, dilation, precision)


def _valid_conv(x, kernel, strides, dilation, precision):
    numbers = conv_dimension_numbers(x.shape)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        "VALID",
        rhs_dilation=dilation,
        dimension_numbers=numbers,
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _xla_forward_conv(x, kernel, strides, dilation, precision):
    return _valid_conv(x, kernel, strides, dilation, precision)


def _xla_forward_conv_fwd(x, kernel, strides, dilation, precision):
    return _valid_conv(x, kernel, strides, dilation, precision), (x, kernel)


def _xla_forward_conv_bwd(strides, dilation, precision, saved, g):
    x, kernel = saved
    _, kernel_vjp = jax.vjp(lambda k: _valid_conv(x, k, strides, dilation, precision), kernel)
    patches, spread = jax.vjp(lambda x: _patches(x, kernel.shape[:-2], dilation, strides), x)
    rows = jnp.dot(
        jnp.reshape(g, (-1, g.shape[-1])),
        jnp.reshape(kernel, (-1, kernel.shape[-1])).T,
        precision=precision,
    )
    return (*spread(jnp.reshape(rows, patches.shape)), *kernel_vjp(g))


_xla_forward_conv.defvjp(_xla_forward_conv_fwd, _xla_forward_conv_bwd)


def _require_depthwise(x, kernel, groups: int, name: str) -> None:
    if not (groups == x.shape[-1] == kernel.shape[-1] and kernel.shape[-2] == 1):
        raise ValueError(f"{name}'s only groups are depthwise, one output per channel")


def _window(x, kernel, window_strides, padding, rhs_dilation):
    """The strides, the padding as ``(low, high)`` pairs and the kernel dilation, as tuples."""
    spatial = x.ndim - 2
    dilation = _as_tuple(rhs_dilation, spatial)
    strides = _as_tuple(window_strides, spatial)
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:spatial], dilation, strict=True)]
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
    return strides, tuple((int(low), int(high)) for low, high in padding), dilation


def _pad_and_crop(x, pads):
    """``x`` padded with zeros by the ``(low, high)`` pairs; negative ones crop."""
    lows = [max(-low, 0) for low, _ in pads]
    highs = [max(-high, 0) for _, high in pads]
    x = jnp.pad(x, [(0, 0), *((max(lo, 0), max(hi, 0)) for lo, hi in pads), (0, 0)])
    crop = zip(lows, highs, x.shape[1:-1], strict=True)
    return x[(slice(None), *(slice(lo, size - hi) for lo, hi, size in crop))]


def depthwise_conv(
    x,
    kernel,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """``jax.lax.conv_general_dilated`` of a depthwise convolution (one output channel per
    input channel, channels last, no input dilation): its forward pass is that very call,
    bit for bit; its backward pass is the depthwise running sum's (:func:`_depthwise_bwd`).

    A float depthwise layer (``QuantConv(quantize=False)``) computes with it: XLA:CPU's own
    gradient of a depthwise convolution is slow (DS-CNN's 14x14x64 stride-2 layer: forward
    11 ms, forward and both gradients 95 ms at batch 128; docs/performance.md). The
    gradients are the convolution's, summed in another order (with integer values, equal).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.arange(2 * 5 * 5 * 3.0).reshape(2, 5, 5, 3)
      >>> k = jnp.ones((3, 3, 1, 3))
      >>> args = ((2, 2), "SAME")
      >>> ref = jax.lax.conv_general_dilated(x, k, *args, feature_group_count=3,
      ...                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> bool(jnp.all(depthwise_conv(x, k, *args, feature_group_count=3) == ref))
      True
    """
    del dimension_numbers  # Flax's, channels last
    _require_depthwise(x, kernel, feature_group_count, "depthwise_conv")
    if any(d != 1 for d in _as_tuple(lhs_dilation, x.ndim - 2)):
        raise ValueError("depthwise_conv has no input dilation")
    strides, pads, dilation = _window(x, kernel, window_strides, padding, rhs_dilation)
    numbers = conv_dimension_numbers(x.shape)
    return _xla_depthwise(x, kernel, strides, pads, dilation, numbers, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _xla_depthwise(x, kernel, strides, pads, dilation, numbers, precision):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        pads,
        rhs_dilation=dilation,
        dimension_numbers=numbers,
        feature_group_count=x.shape[-1],
        precision=precision,
    )


def _xla_depthwise_fwd(x, kernel, strides, pads, dilation, numbers, precision):
    return _xla_depthwise(x, kernel, strides, pads, dilation, numbers, precision), (x, kernel)


def _xla_depthwise_bwd(strides, pads, dilation, numbers, precision, saved, g):
    del numbers, precision
    x, kernel = saved
    padded, unpad = jax.vjp(functools.partial(_pad_and_crop, pads=pads), x)
    x_grad, kernel_grad = _running_sum_bwd(strides, dilation, (padded, kernel), g, once=False)
    return (*unpad(x_grad), kernel_grad)


_xla_depthwise.defvjp(_xla_depthwise_fwd, _xla_depthwise_bwd)


#: A convolution of one input channel into at most ``BANDED_MAX_FILTERS`` filters, whose
#: (padded) input rows are at most ``BANDED_MAX_WIDTH`` wide, runs as a banded matrix
#: product (:func:`_banded_conv`) instead of over its patches. Timed alone, forward and
#: both gradients, batch 128, 28 wide, 5x5 kernel unless said: 6 filters 1.52x as fast
#: (LeNet-5's conv1; its whole cgmq step 1.36x), 8 filters (3x3) 1.04x, 16 filters 1.05x,
#: 6 filters 56 wide 1.25x, 112 wide 0.95x; with 32 filters ``lenet5_bb``'s whole step ran
#: 0.95x. The banded product multiplies width / kernel width times as often; with few
#: filters the patches' bytes cost more than that (docs/performance.md).
BANDED_MAX_FILTERS = 8
BANDED_MAX_WIDTH = 64


def _banded_pays(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether :func:`_banded_conv` computes this convolution of the padded ``x`` (see
    above): one input channel, a kernel wider than 1, few filters, narrow rows."""
    *_, width, channels = x.shape
    filters, kernel_width = kernel.shape[-1], kernel.shape[-3]
    return (
        channels == 1
        and kernel_width > 1
        and width <= BANDED_MAX_WIDTH
        and filters <= BANDED_MAX_FILTERS
    )


def _banded_conv(x, kernel, strides, dilation, precision):
    """A convolution of the padded one-channel ``x`` as (input rows) x (banded matrix).

    The last spatial axis goes into the matrix: its row for input position ``i`` and kernel
    offset ``t`` (along the other axes) holds, in the columns of output position ``j``, the
    kernel's tap ``(t, i - j * stride)`` where that lies in the kernel, else 0; the input
    rows are the whole-width slices of ``x`` at each offset ``t``, side by side. The
    matrix's zeros add exact zeros, so quantized operands give the direct convolution's
    sums exactly. More multiplications than patches (width / kernel width times as many),
    far fewer bytes: LeNet-5's conv1 (28 wide, 5x5, 6 filters) forward and backward at
    batch 128 took 3.0 ms against 5.2 ms over its 25 patch columns.
    """
    *_, width, _ = x.shape
    size, step, gap = kernel.shape[-3], strides[-1], dilation[-1]
    out = (width - (size - 1) * gap - 1) // step + 1
    band = np.zeros((size, width, out), np.float32)
    for tap, j in itertools.product(range(size), range(out)):
        band[tap, j * step + tap * gap, j] = 1
    taps = jnp.reshape(kernel, (-1, size, kernel.shape[-1]))  # (other offsets, tap, filter)
    # Each entry is one tap times 1 (plus zeros): exact at the highest precision, on any
    # backend (TPUs and GPUs round f32 operands of a default-precision product).
    highest = jax.lax.Precision.HIGHEST
    matrix = jnp.einsum("osf,siw->oiwf", taps, band.astype(kernel.dtype), precision=highest)
    lead = x.ndim - 3  # the spatial axes before the last
    columns = _columns(
        x, (*kernel.shape[:lead], 1), (*dilation[:lead], 1), (*strides[:lead], 1)
    )
    rows = jnp.concatenate(columns, axis=-2)  # (batch, *out, offsets * width, 1)
    product = jnp.dot(
        jnp.reshape(rows, (-1, taps.shape[0] * width)),
        jnp.reshape(matrix, (taps.shape[0] * width, -1)),
        precision=precision,
    )
    return jnp.reshape(product, (*rows.shape[:-2], out, kernel.shape[-1]))


def _columns(x, kernel_size, dilation, strides) -> list[jax.Array]:
    """The strided slices of ``x`` (channels last, already padded) that meet each kernel
    offset, in the kernel's row-major order: one ``(batch, *out, C)`` array per offset."""
    out = [
        (size - (k - 1) * d - 1) // s + 1
        for size, k, d, s in zip(x.shape[1:-1], kernel_size, dilation, strides, strict=True)
    ]
    columns = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(offset, dilation, out, strides, strict=True)
        )
        columns.append(x[(slice(None), *window, slice(None))])
    return columns


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_sum(x, kernel, strides, dilation):
    """A depthwise convolution of the padded ``x``: the running sum of each column (the
    input at one kernel offset) times its channel's tap.

    XLA:CPU fuses the forward pass into one loop. Its own gradient of that sum was slow
    (the taps' gradient computed together with the input's); the backward pass here
    computes them apart: the taps' gradient as each offset's products summed over batch
    and space (a row of ones times them), the input's as the same running sum over the
    output gradient (spread out by the strides, padded) with the taps mirrored. DS-CNN's
    depthwise layers, forward and every gradient at batch 128: 26 -> 18 ms (14x14x32),
    35 -> 21 ms (14x14x64, stride 2), 14 -> 3.7 ms (7x7x64); docs/performance.md.
    """
    return _depthwise_forward(x, kernel, strides, dilation)


def _depthwise_forward(x, kernel, strides, dilation):
    def running_sum(x, kernel):
        columns = _columns(x, kernel.shape[:-2], dilation, strides)
        taps = jnp.reshape(kernel, (-1, *(1,) * (x.ndim - 1), kernel.shape[-1]))
        terms = (column * tap for column, tap in zip(columns, taps, strict=True))
        return functools.reduce(operator.add, terms)

    return _computed_once(running_sum, x, kernel)


def _computed_once(fn, x, kernel):
    """``fn(x, kernel)`` (a depthwise running sum), computed once for all its consumers.

    XLA:CPU fuses an elementwise computation into each of its consumers and computes it
    again in each: the DS-CNN's forward nine-tap sums were computed three times a step (the
    next layer's quantizer, forward, and its backward masks). A conditional's result is
    written out, and its consumers read it: both branches here are ``fn``, so the
    predicate (whether the kernel's first entry is finite, which XLA cannot know when it
    compiles) chooses nothing. Both running sums of a depthwise layer take it: the forward
    one (its products are exact, quantized operands, so the result is the fused one's bit
    for bit) and, on the quantized layers, the input gradient's (float gradients times
    taps; the DS-CNN and ``lenet5_bb`` runs checked gave the same parameters bit for bit,
    while on the float layers it changed the float start, so those stay fused:
    :func:`_running_sum_bwd`). The DS-CNN's cgmq step 1.09x as fast with the first, about
    1.2x with both (docs/performance.md). An ``optimization_barrier`` does not do this:
    XLA:CPU removes barriers before it fuses.
    """
    if kernel.size == 0:
        return fn(x, kernel)
    same = jnp.isfinite(jnp.reshape(kernel, (-1,))[0])
    return jax.lax.cond(same, fn, fn, x, kernel)


def _depthwise_fwd(x, kernel, strides, dilation):
    return _depthwise_forward(x, kernel, strides, dilation), (x, kernel)


def _depthwise_bwd(strides, dilation, saved, g):
    return _running_sum_bwd(strides, dilation, saved, g, once=True)


def _running_sum_bwd(strides, dilation, saved, g, *, once: bool):
    """The depthwise running sum's gradients; with ``once`` the input's is computed once
    for all its consumers (:func:`_computed_once`). The float layers' (``once=False``,
    :func:`depthwise_conv`) stay fused: under the conditional their float products were
    rounded differently, which changed the float DS-CNN that QAT starts from."""
    x, kernel = saved
    kernel_size = kernel.shape[:-2]
    columns = _columns(x, kernel_size, dilation, strides)
    # Each offset's products summed over batch and space as a row of ones times them: the
    # DS-CNN's whole step 1.16x as fast as one reduction of the stacked products, which was
    # faster than a reduction per offset (docs/performance.md). The barrier keeps XLA from
    # turning the product back into a reduction; HIGHEST keeps it exact on TPUs and GPUs.
    rows = g.size // g.shape[-1]
    ones = jax.lax.optimization_barrier(jnp.ones((1, rows), g.dtype))
    taps_grad = jnp.concatenate([
        jnp.dot(ones, jnp.reshape(column * g, (rows, -1)), precision=jax.lax.Precision.HIGHEST)
        for column in columns
    ])
    # x's gradient at position p is the sum over offsets t of g at (p - t) / stride times
    # tap t: pad g with the strides' gaps and the widest offset, then slide each offset.
    reach = [(k - 1) * d for k, d in zip(kernel_size, dilation, strict=True)]
    spread = [(n - 1) * s + 1 for n, s in zip(g.shape[1:-1], strides, strict=True)]
    config = [
        (r, size - length, s - 1)
        for r, size, length, s in zip(reach, x.shape[1:-1], spread, strides, strict=True)
    ]

    def running_sum(g, kernel):
        padded = jax.lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), *config, (0, 0, 0)])
        taps = jnp.reshape(kernel, (-1, *(1,) * (x.ndim - 1), kernel.shape[-1]))
        terms = []
        offsets = itertools.product(*(range(k) for k in kernel_size))
        for tap, offset in zip(taps, offsets, strict=True):
            start = [r - o * d for r, o, d in zip(reach, offset, dilation, strict=True)]
            window = tuple(
                slice(b, b + size) for b, size in zip(start, x.shape[1:-1], strict=True)
            )
            terms.append(padded[(slice(None), *window, slice(None))] * tap)
        return functools.reduce(operator.add, terms)

    x_grad = _computed_once(running_sum, g, kernel) if once else running_sum(g, kernel)
    return x_grad, jnp.reshape(taps_grad, kernel.shape)


_depthwise_sum.defvjp(_depthwise_fwd, _depthwise_bwd)


def max_pool(x: jax.Array, window_shape: Sequence[int], strides=None, padding="VALID"):
    """``flax.linen.max_pool`` (channels last, one batch axis), with a cheaper gradient
    when the windows tile the input (``strides == window_shape``, ``'VALID'``).

    The forward pass is ``flax.linen.max_pool`` itself (the same ``reduce_window_max``, so
    the export reads it as before). Its gradient routes each output's gradient to the first
    maximum of its window, as JAX's ``select_and_scatter_add`` does, but by an argmax over
    the reshaped tiles: XLA:CPU computes that several times faster (``benchmarks/``).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
      >>> bool(jnp.all(max_pool(x, (2, 2), (2, 2)) == nn.max_pool(x, (2, 2), (2, 2))))
      True
    """
    window = tuple(window_shape)
    strides = window if strides is None else tuple(strides)
    if strides != window or padding != "VALID" or x.ndim != len(window) + 2:
        return nn.max_pool(x, window, strides=strides, padding=padding)
    return _tiled_max_pool(x, window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_pool(x, window):
    return nn.max_pool(x, window, strides=window, padding="VALID")


def _tiled_max_pool_fwd(x, window):
    return _tiled_max_pool(x, window), x


def _tiled_max_pool_bwd(window, x, g):
    rank = len(window)
    out = [size // w for size, w in zip(x.shape[1:-1], window, strict=True)]
    cropped = x[(slice(None), *(slice(0, o * w) for o, w in zip(out, window, strict=True)))]
    split = [d for pair in zip(out, window, strict=True) for d in pair]
    tiles = jnp.reshape(cropped, (x.shape[0], *split, x.shape[-1]))
    # (batch, out..., channels, window...): each window's elements last, in row-major order
    order = (0, *range(1, 2 * rank, 2), 2 * rank + 1, *range(2, 2 * rank + 1, 2))
    tiles = jnp.transpose(tiles, order).reshape((x.shape[0], *out, x.shape[-1], -1))
    first = jax.nn.one_hot(jnp.argmax(tiles, axis=-1), tiles.shape[-1], dtype=g.dtype)
    routed = (first * g[..., None]).reshape((x.shape[0], *out, x.shape[-1], *window))
    inverse = tuple(int(i) for i in np.argsort(order))
    grad = jnp.transpose(routed, inverse).reshape(cropped.shape)
    pads = [
        (0, 0),
        *((0, size - o * w) for size, o, w in zip(x.shape[1:-1], out, window, strict=True)),
        (0, 0),
    ]
    return (jnp.pad(grad, pads),)


_tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


def conv_dimension_numbers(input_shape: Sequence[int]) -> jax.lax.ConvDimensionNumbers:
    """Channels last, kernel ``(*spatial, in, out)``: Flax's convention for any rank."""
    ndim = len(input_shape)
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2, *range(ndim - 2))
    return jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)
