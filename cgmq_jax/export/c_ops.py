"""The C emitter's per-op code: one loop nest per op of the graph, every constant baked in,
bit-identical to :func:`cgmq_jax.export.engine.run_integer`.

Part of :mod:`cgmq_jax.export.c`; the buffers and ranges are :mod:`cgmq_jax.export.c_memory`'s.
"""

from __future__ import annotations

import math

import numpy as np

from cgmq_jax.export.c_memory import _CTYPES, _ctype_for, _Memory
from cgmq_jax.export.c_text import INT64_MAX, INT64_MIN, _Code, _comment, _index, _lit, _mul


class _Emitter(_Memory):
    """The body of ``<prefix>_logits``: :meth:`emit_body`, one ``_op_<kind>`` per op."""

    # -- the graph

    def emit_body(self) -> list[str]:
        """The statements of ``<prefix>_logits``: every needed op in order, then the copy
        into ``logits``; buffers are freed as their tensors die."""
        code = _Code()
        for j, op in enumerate(self.ops):
            kind = op["op"]
            t = j + 1
            if not self.needed[t]:
                code(f"/* op {j} ({kind}): its result is never used; skipped */")
                continue
            ins = op["inputs"]
            shape = self.facts[t].shape
            divisor = self.facts[t].divisor
            code(
                f"/* op {j}: {kind} of tensor{'s' if len(ins) > 1 else ''} "
                f"{', '.join(map(str, ins))} -> tensor {t} {list(shape)} at "
                f"2^{self.facts[t].exponent}{'' if divisor == 1 else f' / {divisor}'} */"
            )
            if kind in ("div", "reshape"):
                getattr(self, f"_op_{kind}")(code, j, op, t)
            else:
                code.open("")
                getattr(self, f"_op_{kind}")(code, j, op, t)
                code.close()
            # free what dies here
            for s in {self.storage_of[i] for i in ins} | {self.storage_of[t]}:
                storage = self.storages[s]
                if storage.slot is not None and self._storage_last(s) <= j:
                    self.slots[storage.slot].free = True
        out = self.header["output"]["tensor"]
        n_out = math.prod(self.facts[out].shape)
        code(f"/* the logits: tensor {out} */")
        code(f"for (int32_t i = 0; i < {n_out}; i++) logits[i] = {self._read(out, 'i')};")
        return code.lines

    def _requantize(self, code: _Code, layer: dict, x: int) -> tuple[int, int]:
        """Emit ``v = requantize(v)`` for an int64 ``v``; returns the code range."""
        levels, signed = int(layer["input_levels"]), bool(layer["input_signed"])
        lo = -levels if signed else 0
        facts = self.facts[x]
        shift, k = facts.exponent - int(layer["input_exponent"]), facts.divisor
        if k == 1 and (shift <= -64 or (levels + 1) << max(shift, 0) > INT64_MAX):
            self.warnings.append(
                f"layer {layer['name']!r} requantizes by 2**{shift}: numpy's shifts of 64 bits or "
                "more make engine.run_integer inexact here; this code is exact"
            )
        clip = f"v = v < {_lit(lo)} ? {_lit(lo)} : (v > {_lit(levels)} ? {_lit(levels)} : v);"
        if k == 1 and shift > 0:  # v * 2**shift, clipped; exact without overflow
            top = levels >> shift
            low = _lit(lo)
            if top == 0:
                code(f"v = v > 0 ? {_lit(levels)} : (v < 0 ? {low} : 0);")
            else:
                code(f"if (v > {_lit(top)}) v = {_lit(levels)};")
                code(f"else if (v < {_lit(-top if signed else 0)}) v = {low};")
                code(f"else v = v * {_lit(1 << shift)};")
        elif k == 1 and shift == 0:
            code(clip)
        else:
            if shift > 0:
                bound = (levels + 1) * k
                if bound << shift > INT64_MAX:
                    raise ValueError(
                        f"{self.model.path}: layer {layer['name']!r}: requantizing a tensor with "
                        f"divisor {k} by 2**{shift} overflows int64 (so does the engine)"
                    )
                up, down = _lit(bound), _lit(-bound)
                code(f"v = v > {up} ? {up} : (v < {down} ? {down} : v);")
                code(f"v = {self.p}_rdiv(v * {_lit(1 << shift)}, UINT64_C({k}));")
            else:
                denominator = k << -shift
                if denominator >= 1 << 64:
                    code("v = 0; /* |v| / divisor < 1/2 */")
                else:
                    code(f"v = {self.p}_rdiv(v, UINT64_C({denominator}));")
            self.helpers.add("rdiv")
            code(clip)
        return lo, levels

    def _layer_common(self, code: _Code, j: int, op: dict, t: int):
        """The input codes of a layer op (emitted), its output storage and what the
        accumulation loop needs: ``(layer, codes, cout, wbase, width, shift_expr, bias)``."""
        index = op["layer"]
        layer = self.model.layers[index]
        codes, own = self._layer_codes(code, j, op["inputs"][0], index)
        shifts = self._layer_output(t, index)
        if own is not None:
            self.slots[own].free = True  # after this op; the output slot is already taken
        wbase, width, shift_expr, bias = self._weight_access(index, shifts)
        return layer, codes, len(shifts), wbase, width, shift_expr, bias

    def _layer_codes(self, code: _Code, j: int, x: int, index: int) -> tuple[str, int | None]:
        """Emit the requantization of tensor ``x`` into layer ``index``'s input codes;
        returns the codes' C array and the slot to free after the op (``None``: in place)."""
        layer = self.model.layers[index]
        n_in = math.prod(self.facts[x].shape)
        levels, signed = int(layer["input_levels"]), bool(layer["input_signed"])
        code_ctype = _ctype_for(-levels if signed else 0, levels)
        # the codes: in place when the input dies here (same type, or int8: a character type)
        s = self.storage_of[x]
        if self._dies_at(x, j) and (code_ctype == 0 or code_ctype == self.storages[s].ctype):
            codes_slot, own = self.storages[s].slot, None
            self.slots[codes_slot].members.add(code_ctype)
        else:
            codes_slot = own = self._alloc(n_in * _CTYPES[code_ctype][2], code_ctype)
        codes = f"{self.p}_buf{codes_slot}.{_CTYPES[code_ctype][1]}"
        code(
            f"/* layer {index} ({_comment(layer['name'])}): requantize to "
            f"{layer['input_bits']}-bit {'signed' if signed else 'unsigned'} codes at "
            f"2^{layer['input_exponent']} */"
        )
        code.open(f"for (int32_t n = 0; n < {n_in}; n++)")
        code(f"int64_t v = {self._read(x, 'n')};")
        self._requantize(code, layer, x)
        code(f"{codes}[n] = ({_CTYPES[code_ctype][0]})v;")
        code.close()
        return codes, own

    def _layer_output(self, t: int, index: int) -> list[int]:
        """Give layer ``index``'s output tensor ``t`` its range (from the actual weights and
        biases) and storage; returns each output channel's accumulator-to-bias shift."""
        layer = self.model.layers[index]
        levels, signed = int(layer["input_levels"]), bool(layer["input_signed"])
        kernel = np.asarray(self.model.weight(index), np.int64)
        cout = kernel.shape[-1]
        flat = kernel.reshape(-1, cout)
        pos = [int(v) for v in np.where(flat > 0, flat, 0).astype(object).sum(axis=0)]
        neg = [int(v) for v in np.where(flat < 0, flat, 0).astype(object).sum(axis=0)]
        lo_code = -levels if signed else 0
        acc = np.broadcast_to(np.asarray(layer["accumulator_exponent"]), (cout,))
        shifts = [int(a) - int(layer["bias_exponent"]) for a in acc]
        bias = [int(b) for b in self.model.bias(index)]
        terms = list(zip(pos, neg, shifts, bias, strict=True))
        his = [(p * levels + q * lo_code) * (1 << sh) + b for p, q, sh, b in terms]
        los = [(p * lo_code + q * levels) * (1 << sh) + b for p, q, sh, b in terms]
        self._new_storage(t, self._set_range(t, min(los), max(his)))
        return shifts

    def _weight_access(self, index: int, shifts: list[int]) -> tuple[str, str, str, str]:
        """C expressions of layer ``index``'s weights and bias in the packed stream:
        ``(first weight bit of channel co, bits per weight, shift to the bias, bias)``;
        per-channel widths and shifts get tables."""
        pack, cout = self.packing[index], len(shifts)
        per_channel = len(set(pack["widths"])) > 1  # else one width: no tables needed
        prefix = f"{self.p}_L{index}"
        if per_channel:
            offsets = ", ".join(f"{o}u" for o in pack["offsets"])
            widths = ", ".join(map(str, pack["widths"]))
            self.tables.append(f"static const uint32_t {prefix}_woff[{cout}] = {{{offsets}}};")
            self.tables.append(f"static const uint8_t {prefix}_wbits[{cout}] = {{{widths}}};")
        if len(set(shifts)) > 1:
            table = ", ".join(map(str, shifts))
            self.tables.append(f"static const uint8_t {prefix}_shift[{cout}] = {{{table}}};")
            shift_expr = f" * ((int64_t)1 << {prefix}_shift[co])"
        else:
            shift_expr = f" * {_lit(1 << shifts[0])}" if shifts[0] else ""
        if per_channel:
            wbase, width = f"{prefix}_woff[co]", f"(unsigned){prefix}_wbits[co]"
        else:
            w = pack["widths"][0]
            start = f"{pack['offsets'][0]}u + " if pack["offsets"][0] else ""
            wbase, width = f"{start}(uint32_t)co * {pack['fan_in'] * w}u", f"{w}u"
        bias_bits = self.model.facts.rows[index].bias_bits
        bias = f"{self.p}_code({pack['bias_offset']}u + (uint32_t)co * {bias_bits}u, {bias_bits}u)"
        self.helpers.add("code")
        return wbase, width, shift_expr, bias

    def _op_dense(self, code: _Code, j: int, op: dict, t: int) -> None:
        layer, codes, cout, wbase, width, shift_expr, bias = self._layer_common(code, j, op, t)
        x_shape = self.facts[op["inputs"][0]].shape
        n = x_shape[-1]
        positions = math.prod(x_shape[:-1])
        code(f"/* dense {n} -> {cout}, at {positions} position(s) */")
        code.open(f"for (int32_t p = 0; p < {positions}; p++)")
        code.open(f"for (int32_t co = 0; co < {cout}; co++)")
        code(f"const uint32_t wb = {wbase};")
        code(f"const int32_t xb = p * {n};")
        code("int64_t acc = 0;")
        weight = f"{self.p}_code(wb + (uint32_t)i * {width}, {width})"
        code(f"for (int32_t i = 0; i < {n}; i++) acc += (int64_t){codes}[xb + i] * {weight};")
        code(self._write(t, f"p * {cout} + co", f"acc{shift_expr} + {bias}"))
        code.close(2)

    def _op_conv(self, code: _Code, j: int, op: dict, t: int) -> None:
        layer, codes, cout, wbase, width, shift_expr, bias = self._layer_common(code, j, op, t)
        x_shape = self.facts[op["inputs"][0]].shape
        out_shape = self.facts[t].shape
        kernel_shape = self.model.weight(op["layer"]).shape
        rank = len(kernel_shape) - 2
        window, cin_g = kernel_shape[:rank], kernel_shape[-2]
        groups = int(layer["groups"])
        strides = layer["strides"]
        rhs, lhs = layer["kernel_dilation"], layer["input_dilation"]
        code(
            f"/* conv window {list(window)}, strides {strides}, padding {layer['padding']}, "
            f"kernel dilation {rhs}, input dilation {lhs}, groups {groups} */"
        )
        outs = [f"o{a}" for a in range(rank)]
        for a in range(rank):
            code.open(f"for (int32_t o{a} = 0; o{a} < {out_shape[a]}; o{a}++)")
        code.open(f"for (int32_t co = 0; co < {cout}; co++)")
        code(f"const uint32_t wb = {wbase};")
        group_base = ""
        if groups > 1:
            code(f"const int32_t cb = (co / {cout // groups}) * {cin_g};")
            group_base = " + cb"
        code("int64_t acc = 0;")
        for a in range(rank):
            self._conv_tap(code, a, layer, x_shape[a], out_shape[a], window[a])
        xs = [f"x{a}" for a in range(rank)]
        ks = [f"k{a}" for a in range(rank)]
        code(f"const int32_t xb = {_mul(_index(xs, x_shape[:-1]), x_shape[-1])}{group_base};")
        code(f"const uint32_t kb = wb + (uint32_t)({_mul(_index(ks, window), cin_g)}) * {width};")
        weight = f"{self.p}_code(kb + (uint32_t)ci * {width}, {width})"
        code(
            f"for (int32_t ci = 0; ci < {cin_g}; ci++) acc += (int64_t){codes}[xb + ci] * {weight};"
        )
        code.close(rank)
        out_index = f"{_mul(_index(outs, out_shape[:-1]), cout)} + co"
        code(self._write(t, out_index, f"acc{shift_expr} + {bias}"))
        code.close(rank + 1)

    def _conv_tap(self, code: _Code, a: int, layer: dict, size: int, out: int, k: int) -> None:
        """Open the kernel loop of spatial axis ``a`` and emit ``x<a>``, the input position
        it reads (skipping padding and the holes of input dilation)."""
        stride, rhs, lhs = (
            layer["strides"][a],
            layer["kernel_dilation"][a],
            layer["input_dilation"][a],
        )
        pad = layer["padding"][a][0]
        code.open(f"for (int32_t k{a} = 0; k{a} < {k}; k{a}++)")
        position = f"{_mul(f'o{a}', stride)} + {_mul(f'k{a}', rhs)}" + (f" - {pad}" if pad else "")
        code(f"const int32_t q{a} = {position};")
        checks = []
        if pad > 0:
            checks.append(f"q{a} < 0")
        top = (size - 1) * lhs
        if (out - 1) * stride + (k - 1) * rhs - pad > top:
            checks.append(f"q{a} > {top}")
        if lhs > 1:
            checks.append(f"q{a} % {lhs} != 0")
        if checks:
            code(f"if ({' || '.join(checks)}) continue;")
        code(f"const int32_t x{a} = q{a}{f' / {lhs}' if lhs > 1 else ''};")

    # -- elementwise

    def _unary(
        self, code: _Code, j: int, op: dict, t: int, lo: int, hi: int, body: list[str]
    ) -> None:
        x = op["inputs"][0]
        ctype = self._set_range(t, lo, hi)
        if not self._elementwise_inplace(j, t, [x], ctype):
            self._new_storage(t, ctype)
        code.open(f"for (int32_t i = 0; i < {math.prod(self.facts[t].shape)}; i++)")
        code(f"int64_t v = {self._read(x, 'i')};")
        for line in body:
            code(line)
        code(self._write(t, "i", "v"))
        code.close()

    def _op_relu(self, code: _Code, j: int, op: dict, t: int) -> None:
        lo, hi = self.ranges[op["inputs"][0]]
        self._unary(code, j, op, t, max(lo, 0), max(hi, 0), ["if (v < 0) v = 0;"])

    def _op_clip(self, code: _Code, j: int, op: dict, t: int) -> None:
        x = op["inputs"][0]
        facts = self.facts[x]
        lo, hi = self.ranges[x]
        bounds = []
        for bound in (op["min"], op["max"]):
            if bound is None:
                bounds.append(None)
                continue
            m, e = int(bound[0]), int(bound[1])
            scaled, shift = m * facts.divisor, e - facts.exponent
            bounds.append(scaled << shift if shift >= 0 else scaled >> -shift)
        body = []

        def f(v: int) -> int:  # numpy's clip: min(max(v, lo), hi)
            if bounds[0] is not None:
                v = max(v, bounds[0])
            if bounds[1] is not None:
                v = min(v, bounds[1])
            return v

        for b, cmp in zip(bounds, ("<", ">"), strict=True):
            if b is not None:
                c = _lit(min(max(b, INT64_MIN), INT64_MAX))
                body.append(f"if (v {cmp} {c}) v = {c};")
        self._unary(code, j, op, t, f(lo), f(hi), body)

    def _op_add(self, code: _Code, j: int, op: dict, t: int) -> None:
        a, b = op["inputs"]
        e = self.facts[t].exponent
        (alo, ahi), (blo, bhi) = self.ranges[a], self.ranges[b]
        ma, mb = 1 << (self.facts[a].exponent - e), 1 << (self.facts[b].exponent - e)
        ctype = self._set_range(t, alo * ma + blo * mb, ahi * ma + bhi * mb)
        if not self._elementwise_inplace(j, t, [a, b], ctype):
            self._new_storage(t, ctype)
        terms = [
            self._read(a, "i") + (f" * {_lit(ma)}" if ma > 1 else ""),
            self._read(b, "i") + (f" * {_lit(mb)}" if mb > 1 else ""),
        ]
        code(
            f"for (int32_t i = 0; i < {math.prod(self.facts[t].shape)}; i++) "
            + self._write(t, "i", " + ".join(terms))
        )

    def _op_concat(self, code: _Code, j: int, op: dict, t: int) -> None:
        axis = int(op["axis"])
        e = self.facts[t].exponent
        out_shape = self.facts[t].shape
        muls = [1 << (self.facts[i].exponent - e) for i in op["inputs"]]
        lo = min(self.ranges[i][0] * m for i, m in zip(op["inputs"], muls, strict=True))
        hi = max(self.ranges[i][1] * m for i, m in zip(op["inputs"], muls, strict=True))
        self._new_storage(t, self._set_range(t, lo, hi))
        outer = math.prod(out_shape[:axis])
        row = math.prod(out_shape[axis:])
        offset = 0
        for i, m in zip(op["inputs"], muls, strict=True):
            inner = math.prod(self.facts[i].shape[axis:])
            value = self._read(i, f"a * {inner} + b") + (f" * {_lit(m)}" if m > 1 else "")
            code(
                f"for (int32_t a = 0; a < {outer}; a++) for (int32_t b = 0; b < {inner}; b++) "
                + self._write(t, f"a * {row} + {offset} + b", value)
            )
            offset += inner

    # -- pools and sums

    def _pool(self, code: _Code, j: int, op: dict, t: int, is_max: bool) -> None:
        x = op["inputs"][0]
        x_shape, out_shape = self.facts[x].shape, self.facts[t].shape
        window, strides, pads = op["window"], op["strides"], [p[0] for p in op["padding"]]
        lo, hi = self.ranges[x]
        if is_max:
            ctype = self._set_range(t, lo, hi)
        else:
            count = math.prod(window)
            ctype = self._set_range(t, count * min(lo, 0), count * max(hi, 0))
        self._new_storage(t, ctype)
        rank = len(x_shape)
        outs = [f"o{a}" for a in range(rank)]
        for a in range(rank):
            code.open(f"for (int32_t o{a} = 0; o{a} < {out_shape[a]}; o{a}++)")
        code("int64_t m = INT64_MIN;" if is_max else "int64_t m = 0;")
        loops = 0
        for a in range(rank):
            start = _mul(f"o{a}", strides[a]) + (f" - {pads[a]}" if pads[a] else "")
            if window[a] == 1 and pads[a] == 0:
                code(f"const int32_t x{a} = {start};")
                continue
            code.open(f"for (int32_t w{a} = 0; w{a} < {window[a]}; w{a}++)")
            loops += 1
            code(f"const int32_t x{a} = {start} + w{a};")
            if pads[a] > 0 or op["padding"][a][1] > 0:
                code(f"if (x{a} < 0 || x{a} >= {x_shape[a]}) continue;")
        value = self._read(x, _index([f"x{a}" for a in range(rank)], x_shape))
        if is_max:
            code(f"const int64_t v = {value};")
            code("if (v > m) m = v;")
        else:
            code(f"m += {value};")
        code.close(loops)
        code(self._write(t, _index(outs, out_shape), "m"))
        code.close(rank)

    def _op_maxpool(self, code: _Code, j: int, op: dict, t: int) -> None:
        self._pool(code, j, op, t, True)

    def _op_sumpool(self, code: _Code, j: int, op: dict, t: int) -> None:
        self._pool(code, j, op, t, False)

    def _op_sum(self, code: _Code, j: int, op: dict, t: int) -> None:
        x = op["inputs"][0]
        x_shape = self.facts[x].shape
        axes = set(op["axes"])
        count = math.prod(x_shape[a] for a in axes)
        lo, hi = self.ranges[x]
        self._new_storage(t, self._set_range(t, lo * count, hi * count))
        kept = [a for a in range(len(x_shape)) if a not in axes]
        for a in kept:
            code.open(f"for (int32_t i{a} = 0; i{a} < {x_shape[a]}; i{a}++)")
        code("int64_t s = 0;")
        for a in sorted(axes):
            code.open(f"for (int32_t i{a} = 0; i{a} < {x_shape[a]}; i{a}++)")
        code(f"s += {self._read(x, _index([f'i{a}' for a in range(len(x_shape))], x_shape))};")
        code.close(len(axes))
        out_index = _index([f"i{a}" for a in kept], [x_shape[a] for a in kept]) if kept else "0"
        code(self._write(t, out_index, "s"))
        code.close(len(kept))

    # -- bookkeeping only

    def _op_div(self, code: _Code, j: int, op: dict, t: int) -> None:
        x = op["inputs"][0]
        self.ranges[t] = self.ranges[x]
        self._join(t, self.storage_of[x])
        code(f"/* the divisor becomes {self.facts[t].divisor}: no code */")

    def _op_reshape(self, code: _Code, j: int, op: dict, t: int) -> None:
        x = op["inputs"][0]
        self.ranges[t] = self.ranges[x]
        self._join(t, self.storage_of[x])
        code("/* C order: the same buffer, no code */")
