"""The PyTorch peer of ``benchmarks/train_step.py``: LeNet-5 train steps, eager, on the CPU.

Not a dependency of cgmq-jax: run with a Python that has ``torch`` (a separate venv)::

    /path/to/torch-venv/bin/python benchmarks/torch_peer.py --mode qat --steps 300

``float`` is plain LeNet-5; ``qat`` puts a learnable fake quantizer (per tensor, scale and
zero point learned: ``torch._fake_quantize_learnable_per_tensor_affine``, the op behind
``torch.ao.quantization._LearnableFakeQuantize``, 8 bits) on every layer's input and
weight. Adam, batch 128, cross-entropy; the batches are random images of MNIST's shape
(the step's cost does not depend on the values). Prints one JSON line:
``{"mode", "samples_per_second", "steps", "batch_size", "torch", "threads"}``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn


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
        if isinstance(self.layer, nn.Conv2d):
            return F.conv2d(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


class LeNet5(nn.Module):
    """conv 6@5x5 -> pool -> conv 16@5x5 -> pool -> 120 -> 84 -> 10 (cgmq_jax's lenet5)."""

    def __init__(self, quantize: bool):
        super().__init__()
        q = quantize
        self.conv1 = QuantLayer(nn.Conv2d(1, 6, 5), q)
        self.conv2 = QuantLayer(nn.Conv2d(6, 16, 5), q)
        self.fc1 = QuantLayer(nn.Linear(256, 120), q)
        self.fc2 = QuantLayer(nn.Linear(120, 84), q)
        self.fc3 = QuantLayer(nn.Linear(84, 10), q)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("float", "qat"), required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LeNet5(quantize=args.mode == "qat")
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
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    loss.item()
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "mode": args.mode,
                "samples_per_second": args.steps * args.batch_size / seconds,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
