"""Hand-built ``cgmq-int-npz`` integer models for the export tests (C, ONNX).

:class:`Builder` writes a model file one op at a time, with random integer weights and
biases (``format.save``; numpy only); :func:`residual_model` is one model that both the C
and the ONNX tests run. Not a test module: the tests import it.
"""

from __future__ import annotations

import math

import numpy as np

from cgmq_jax.export import format


class Builder:
    """Builds a header and arrays for ``format.save``, one layer at a time.

    ``bias_bits``: the stored width of every layer's biases (``None``: the narrowest that
    holds them; the trainer's export stores 32, ``lowering.BIAS_BITS``)."""

    def __init__(self, input_shape, *, input_exponent=-8, bias_bits=None, seed=0):
        self.rng = np.random.default_rng(seed)
        self.bias_bits = bias_bits
        self.input = dict(shape=list(input_shape), exponent=input_exponent)
        self.ops: list[dict] = []
        self.layers: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.shapes = [tuple(input_shape)]

    def op(self, kind, inputs, out_shape, **fields) -> int:
        self.ops.append(dict(op=kind, inputs=list(inputs), **fields))
        self.shapes.append(tuple(out_shape))
        return len(self.ops)  # the new tensor

    def layer(
        self,
        kind,
        x,
        kernel_shape,
        *,
        in_exponent,
        in_levels,
        signed=False,
        w_levels=3,
        w_exponent=-3,
        bias_shift=1,
        bias_max=50,
        bias_bits=None,
        strides=None,
        padding=None,
        groups=1,
        kernel_dilation=None,
        input_dilation=None,
    ) -> int:
        index = len(self.layers)
        shape = self.shapes[x]
        cout = kernel_shape[-1]
        per_channel = isinstance(w_levels, list)
        levels = w_levels if per_channel else [w_levels] * cout
        w_exps = w_exponent if per_channel else [w_exponent] * cout
        kernel = np.stack(
            [self.rng.integers(-n, n + 1, math.prod(kernel_shape[:-1])) for n in levels], axis=-1
        ).reshape(kernel_shape)
        w_bits = [format.bits_for_levels(n, signed=True) for n in levels]
        acc = [e + in_exponent for e in w_exps]
        bias = self.rng.integers(-bias_max, bias_max + 1, cout)
        bias_bits = bias_bits or self.bias_bits or format.signed_bits(int(np.abs(bias).max()))
        if kind == "conv":
            rank = len(kernel_shape) - 2
            strides = strides or [1] * rank
            padding = padding or [[0, 0]] * rank
            kernel_dilation = kernel_dilation or [1] * rank
            input_dilation = input_dilation or [1] * rank
            spatial = []
            for n, k, s, (lo, hi), a, b in zip(
                shape[:-1],
                kernel_shape[:-2],
                strides,
                padding,
                input_dilation,
                kernel_dilation,
                strict=True,
            ):
                padded = (n - 1) * a + 1 + lo + hi
                spatial.append((padded - ((k - 1) * b + 1)) // s + 1)
            out = (*spatial, cout)
            geometry = dict(
                strides=strides,
                padding=padding,
                groups=groups,
                kernel_dilation=kernel_dilation,
                input_dilation=input_dilation,
            )
        else:
            out = (*shape[:-1], cout)
            geometry = {}
        record = dict(
            name=f"{kind}{index}",
            kind=kind,
            per_channel=per_channel,
            input_shape=list(shape),
            output_shape=list(out),
            kernel_shape=list(kernel_shape),
            weight_key=f"L{index}.weight",
            bias_key=f"L{index}.bias",
            weight_bits=w_bits if per_channel else w_bits[0],
            weight_exponent=w_exps if per_channel else w_exps[0],
            weight_levels=levels if per_channel else levels[0],
            input_bits=format.bits_for_levels(in_levels, signed=signed),
            input_exponent=in_exponent,
            input_levels=in_levels,
            input_signed=signed,
            accumulator_exponent=acc if per_channel else acc[0],
            bias_exponent=min(acc) - bias_shift,
            output_bits=48,
            bias_bits=bias_bits,
            macs=math.prod(out) * math.prod(kernel_shape[:-1]),
            **geometry,
        )
        self.layers.append(record)
        self.arrays[record["weight_key"]] = kernel.astype(format.int_dtype_for_bits(max(w_bits)))
        self.arrays[record["bias_key"]] = bias.astype(format.int_dtype_for_bits(bias_bits))
        return self.op(kind, [x], out, layer=index)

    def save(self, path, output=None) -> format.IntegerModel:
        """Write the file and load it. ``output=t``: only the ops up to tensor ``t`` (the
        output is the last op's tensor) and the layers they run."""
        t = len(self.ops) if output is None else output
        ops = self.ops[:t]
        layers = self.layers[: sum(op["op"] in ("conv", "dense") for op in ops)]
        keys = {layer[k] for layer in layers for k in ("weight_key", "bias_key")}
        arrays = {k: v for k, v in self.arrays.items() if k in keys}
        exponents, divisors = [self.input["exponent"]], [1]
        for op in ops:  # follow the exponents and divisors (docs/export.md)
            ins = op["inputs"]
            if op["op"] in ("conv", "dense"):
                exponent, divisor = self.layers[op["layer"]]["bias_exponent"], 1
            else:
                exponent = min(exponents[i] for i in ins)
                divisor = divisors[ins[0]] * op.get("by", 1)
            exponents.append(exponent)
            divisors.append(divisor)
        header = dict(
            model="synthetic",
            input=self.input,
            ops=ops,
            layers=layers,
            output=dict(tensor=t, exponent=exponents[t], divisor=divisors[t]),
            certificate=_certificate(layers),
        )
        format.save(path, header, arrays)
        return format.load(path)


def _certificate(layers) -> dict:
    """A certificate of the layers' BOPs, as the trainer's export writes (the budget twice
    the cost, so within it)."""
    rows = []
    for layer in layers:
        bits = layer["weight_bits"]
        bits = tuple(bits) if isinstance(bits, list) else bits
        row = format.LayerRow("x", layer["macs"], bits, layer["input_bits"])
        rows.append(
            {
                "layer": layer["name"],
                "macs": layer["macs"],
                "weight_bits": layer["weight_bits"],
                "input_bits": layer["input_bits"],
                "bops": row.bops,
            }
        )
    total = sum(row["bops"] for row in rows)
    return dict(bops=total, budget_bops=2 * total, within_budget=True, layers=rows)


def residual_model(path, output=None, *, bias_bits=None):
    """Residual add of tensors at different exponents, concat, dense on a 3-D input (input
    shifted left and saturating), reshape, sum over axes + div into a dense layer (same
    exponent, divisor 36)."""
    b = Builder([6, 6, 2], bias_bits=bias_bits, seed=3)
    t1 = b.layer(
        "conv",
        0,
        [3, 3, 2, 4],
        in_exponent=-8,
        in_levels=255,
        padding=[[1, 1], [1, 1]],
        w_levels=3,
        w_exponent=-3,
        bias_max=400,
    )
    t2 = b.layer(
        "conv",
        t1,
        [1, 1, 4, 4],
        in_exponent=-6,
        in_levels=15,
        signed=True,
        w_levels=3,
        w_exponent=-2,
        bias_shift=6,
        bias_max=300,
    )
    t = b.op("add", [t1, t2], b.shapes[t1])
    t = b.op("relu", [t], b.shapes[t])
    t = b.op("concat", [t1, t], [6, 6, 8], axis=2)
    t = b.layer(
        "dense",
        t,
        [8, 3],
        in_exponent=-16,
        in_levels=511,
        signed=True,
        w_levels=5,
        w_exponent=-2,
        bias_max=1000,
    )
    t = b.op("reshape", [t], [36, 3], shape=[36, 3])
    t = b.op("sum", [t], [3], axes=[0])
    t = b.op("div", [t], [3], by=36)
    exponent = b.layers[-1]["bias_exponent"]
    b.layer(
        "dense",
        t,
        [3, 5],
        in_exponent=exponent,
        in_levels=16383,
        signed=True,
        w_levels=3,
        bias_max=100,
    )
    return b.save(path, output)
