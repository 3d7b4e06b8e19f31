"""The Qwix peer of ``benchmarks/train_step.py``: Qwix's int8 QAT step on a plain linen
LeNet-5, on the same jax, jaxlib and flax as cgmq_jax.

Not a dependency of cgmq-jax: run with a Python that has ``qwix`` (``make setup-peers``
builds ``.venv-peers``, with the very jax and flax of ``requirements.txt``)::

    .venv-peers/bin/python benchmarks/qwix_peer.py --mode int8 --steps 300

``int8``: ``qwix.quantize_model(model, qwix.QtProvider([qwix.QtRule(weight_qtype=int8,
act_qtype=int8)]))`` on every layer (fixed 8 bits: weights and activations, absmax
calibrated, Qwix's defaults for XLA); ``float``: the same linen model unquantized. The
model is ``flax.linen.Conv`` / ``Dense`` / ``max_pool``, as a JAX user writes LeNet-5: conv
6@5x5 -> pool -> conv 16@5x5 -> pool -> 120 -> 84 -> 10. Adam, batch 128, cross-entropy,
the step jitted with the state donated, as ours; random images of MNIST's shape. Qwix's
int4 does not run here: XLA:CPU's convolution rejects int4 operands ("does not support
custom element sizes on non-sub-byte types"). With ``--serve`` it answers
``benchmarks/peer_serve.py``'s requests; otherwise it prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import qwix
from peer_serve import serve


class LeNet5(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(10)(x)


def build(mode: str) -> nn.Module:
    if mode == "float":
        return LeNet5()
    rule = qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)
    return qwix.quantize_model(LeNet5(), qwix.QtProvider([rule]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("float", "int8"), default="int8")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--serve", action="store_true", help="time steps per stdin line")
    args = parser.parse_args()
    model = build(args.mode)
    key_images, key_labels, key_init = jax.random.split(jax.random.key(0), 3)
    images = jax.random.uniform(key_images, (20, args.batch_size, 28, 28, 1))
    labels = jax.random.randint(key_labels, (20, args.batch_size), 0, 10)
    params = model.init(key_init, images[0])["params"]
    tx = optax.adam(1e-3)
    state = {"params": params, "opt": tx.init(params)}

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        def loss_fn(params):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

    batches = [(images[i], labels[i]) for i in range(20)]
    holder = [state]

    def step(i):
        holder[0], loss = train_step(holder[0], *batches[i % 20])
        return loss

    for i in range(args.warmup):
        step(i)
    jax.block_until_ready(holder[0])
    info = {
        "mode": args.mode,
        "model": "lenet5",
        "batch_size": args.batch_size,
        "qwix": qwix.__version__ if hasattr(qwix, "__version__") else "?",
        "jax": jax.__version__,
        "flax": flax.__version__,
    }
    serve(
        step, jax.block_until_ready, args.batch_size, info, once=None if args.serve else args.steps
    )


if __name__ == "__main__":
    main()
