"""The PyTorch peer of ``benchmarks/train_step.py``: train steps, eager, on the CPU.

Not a dependency of cgmq-jax: run with a Python that has ``torch`` (``make setup-peers``
builds ``.venv-peers``)::

    .venv-peers/bin/python benchmarks/torch_peer.py --model dscnn --mode qat --steps 50
    .venv-peers/bin/python benchmarks/torch_peer.py --describe   # parameters and MACs

The networks are cgmq_jax's, layer for layer (``--describe`` prints their parameter and
MAC counts, which ``train_step.py --describe`` prints beside ours): ``lenet5``,
``lenet5_bb`` (Bayesian Bits' wider LeNet-5) and ``dscnn`` (depthwise-separable, residual
blocks 3 and 4). ``float`` is the float network (DS-CNN with BatchNorm in training mode,
convolutions without bias, as our float DS-CNN); ``qat`` is the quantized network as ours
trains it (DS-CNN without BatchNorm, convolutions with bias: ours folds BatchNorm before
QAT) with a learnable fake quantizer (per tensor, scale and zero point learned:
``torch._fake_quantize_learnable_per_tensor_affine``, the op behind
``torch.ao.quantization._LearnableFakeQuantize``, 8 bits) on every layer's input and
weight. The stride-2 3x3 convolutions pad 1 on every side (PyTorch's idiom; XLA's 'SAME'
pads 0 before and 1 after): the same output shapes and MACs. Adam, batch 128,
cross-entropy; the batches are random images of MNIST's shape (the step's cost does not
depend on the values). With ``--serve`` it answers ``benchmarks/peer_serve.py``'s requests;
otherwise it prints one JSON line: ``{"samples_per_second", "steps", "mode", "model",
"batch_size", "torch", "threads"}``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from peer_serve import serve
from torch import nn

MODELS = ("lenet5", "lenet5_bb", "dscnn")


class FakeQuant(nn.Module):
    """Learnable per-tensor fake quantization (LSQ+-style scale and zero point)."""

    def __init__(self, bits: int = 8, signed: bool = False):
        super().__init__()
        self.quant_min, self.quant_max = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        )
        self.scale = nn.Parameter(torch.tensor([0.02]))
        self.zero_point = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x):
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max, 1.0
        )


class QuantLayer(nn.Module):
    """A Conv2d or Linear, with fake quantizers on its input and weight when ``quantize``."""

    def __init__(self, layer: nn.Module, quantize: bool):
        super().__init__()
        self.layer = layer
        self.quantize = quantize
        if quantize:
            self.input_fq, self.weight_fq = FakeQuant(signed=False), FakeQuant(signed=True)

    def forward(self, x):
        if not self.quantize:
            return self.layer(x)
        weight = self.weight_fq(self.layer.weight)
        x = self.input_fq(x)
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(
                x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
            )
        return F.linear(x, weight, layer.bias)


class LeNet5(nn.Module):
    """conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> 120 -> 84 -> 10 (cgmq_jax's lenet5);
    ``channels=(32, 64), hidden=(512,)``: cgmq_jax's lenet5_bb."""

    def __init__(self, quantize: bool, channels=(6, 16), hidden=(120, 84)):
        super().__init__()
        q = quantize
        self.conv1 = QuantLayer(nn.Conv2d(1, channels[0], 5), q)
        self.conv2 = QuantLayer(nn.Conv2d(channels[0], channels[1], 5), q)
        widths = (4 * 4 * channels[1], *hidden, 10)
        self.fcs = nn.ModuleList(
            QuantLayer(nn.Linear(a, b), q) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        for fc in self.fcs[:-1]:
            x = F.relu(fc(x))
        return self.fcs[-1](x)


class ConvBN(nn.Module):
    """A convolution and, in the float network, its BatchNorm (cgmq_jax's ``_conv_bn``)."""

    def __init__(self, cin, cout, kernel, *, quantize, stride=1, groups=1):
        super().__init__()
        conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=quantize)
        self.conv = QuantLayer(conv, quantize)
        self.bn = None if quantize else nn.BatchNorm2d(cout, momentum=0.1)

    def forward(self, x):
        x = self.conv(x)
        return x if self.bn is None else self.bn(x)


class DSCNN(nn.Module):
    """stem conv 32@3x3/2 -> 4 separable blocks (dw 3x3, pw 1x1 64; block 2 stride 2;
    blocks 3, 4 residual) -> global average pool -> dense 10 (cgmq_jax's dscnn)."""

    def __init__(self, quantize: bool, stem=32, channels=64):
        super().__init__()
        q = quantize
        self.stem = ConvBN(1, stem, 3, quantize=q, stride=2)
        blocks, cin = [], stem
        for stride in (1, 2, 1, 1):
            dw = ConvBN(cin, cin, 3, quantize=q, stride=stride, groups=cin)
            blocks.append(nn.ModuleList([dw, ConvBN(cin, channels, 1, quantize=q)]))
            cin = channels
        self.blocks = nn.ModuleList(blocks)
        self.fc = QuantLayer(nn.Linear(channels, 10), q)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for i, (dw, pw) in enumerate(self.blocks):
            y = pw(F.relu(dw(x)))
            x = F.relu(x + y if i >= 2 else y)
        return self.fc(x.mean(dim=(2, 3)))


def build(model: str, quantize: bool) -> nn.Module:
    if model == "lenet5":
        return LeNet5(quantize)
    if model == "lenet5_bb":
        return LeNet5(quantize, channels=(32, 64), hidden=(512,))
    if model == "dscnn":
        return DSCNN(quantize)
    raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")


def describe(model: nn.Module) -> dict:
    """Weights, biases and BatchNorm's affine parameters (no quantizers), and the MACs of
    one example (every Conv2d and Linear, padded positions included, as cgmq_jax counts)."""
    params = sum(
        p.numel()
        for name, p in model.named_parameters()
        if not name.endswith((".scale", ".zero_point"))
    )
    macs = []

    def count(module, inputs, out):
        layer = module.layer
        if isinstance(layer, nn.Conv2d):
            window = layer.kernel_size[0] * layer.kernel_size[1]
            macs.append(out[0].numel() * window * layer.in_channels // layer.groups)
        else:
            macs.append(layer.in_features * layer.out_features)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, QuantLayer)]
    with torch.no_grad():
        model.eval()
        model(torch.zeros(1, 1, 28, 28))
        model.train()
    for hook in hooks:
        hook.remove()
    return {"params": params, "macs": sum(macs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="lenet5")
    parser.add_argument("--mode", choices=("float", "qat"), default="qat")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--serve", action="store_true", help="time steps per stdin line")
    parser.add_argument("--describe", action="store_true", help="parameters and MACs, JSON")
    args = parser.parse_args()
    if args.describe:
        counts = {
            f"{m}:{mode}": describe(build(m, mode == "qat"))
            for m in MODELS
            for mode in ("float", "qat")
        }
        print(json.dumps(counts))
        return
    torch.manual_seed(0)
    model = build(args.model, quantize=args.mode == "qat")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(20, args.batch_size, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (20, args.batch_size), generator=generator)

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[i % 20]), labels[i % 20])
        loss.backward()
        optimizer.step()
        return loss

    for i in range(args.warmup):
        step(i)
    info = {
        "mode": args.mode,
        "model": args.model,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    serve(
        step,
        lambda loss: loss.item(),
        args.batch_size,
        info,
        once=None if args.serve else args.steps,
    )


if __name__ == "__main__":
    main()
