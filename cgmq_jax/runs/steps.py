"""One training step, one epoch, one evaluation: the pieces :func:`cgmq_jax.runs.fit.fit`
repeats.

:func:`make_train_step` (jitted; data parallel with a ``Placement``; the batch in parts with
:func:`microbatched`), :func:`make_accuracy`,
the seeded :func:`batches`, an epoch (:func:`_train_epoch`: interruptible, timed) and the
row that each epoch adds to the history (:func:`_evaluate_float`, :func:`_evaluate_qat`).
The loss of DQ's baseline, :func:`dq_penalty`, is here too.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from cgmq_jax import constraint, cost
from cgmq_jax.runs import parallel
from cgmq_jax.runs.config import Interrupted, TrainingDiverged

if TYPE_CHECKING:
    from cgmq_jax.runs.setup import _Setup


def _cross_entropy(model, params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def dq_penalty(params, specs, budget, lam: float) -> jax.Array:
    """DQ-style penalty ``lam * max(0, C / budget - 1) ** 2`` on the surrogate cost.

    ``budget``: the BOP budget, or ``{cost name: limit}``; with several limits the penalty
    is the sum of one such term per limit (``lam`` a number, or ``{cost name: lam}``). A lone
    BOP limit is the BOP budget (the same expression as 0.1.0's, bit for bit).
    """
    if isinstance(budget, dict) and list(budget) == ["bops"]:
        budget, lam = budget["bops"], lam["bops"] if isinstance(lam, dict) else lam
    if not isinstance(budget, dict):
        return lam * jnp.square(jnp.maximum(cost.bops(params, specs) / budget - 1.0, 0.0))
    functions = cost.cost_functions(specs)
    total = jnp.float32(0.0)
    for name, limit in budget.items():
        weight = lam[name] if isinstance(lam, dict) else lam
        total = total + weight * jnp.square(jnp.maximum(functions[name](params) / limit - 1.0, 0.0))
    return total


class BatchNormTrainState(train_state.TrainState):
    """A ``TrainState`` with the BatchNorm statistics of a float network (Flax's ImageNet
    example's): ``batch_stats`` are updated by each step, not by the optimizer."""

    batch_stats: Any = None


def _float_variables(state) -> dict:
    """The float network's variables: ``params``, with ``batch_stats`` if it has BatchNorm."""
    if isinstance(state, BatchNormTrainState):
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params}


def make_train_step(
    model,
    loss_fn=None,
    *,
    placement: parallel.Placement | None = None,
    donate: bool = False,
    compiler_options: dict | None = None,
    microbatches: int = 1,
):
    """A jitted step ``(state, images, labels) -> (state, loss)`` for a ``TrainState``.

    For a :class:`BatchNormTrainState` (and no ``loss_fn``) the model is called with
    ``train=True``: BatchNorm normalises with the batch's statistics and the step stores
    the updated running averages in ``state.batch_stats``.

    With a ``placement`` the step is data parallel: the batch split over its mesh, the state
    and the loss replicated (the loss and the gradients are means over the global batch).
    With ``donate`` the step reuses the input state's buffers (``fit`` does; on a CPU the
    effect was within the benchmark's noise); the state passed in is then unusable.
    ``compiler_options`` are XLA's, for ``jax.jit`` (:attr:`TrainConfig.compiler_options`).
    With ``microbatches`` > 1 the loss and its gradient are the means of the batch's
    microbatches' (:func:`microbatched`; the same up to float rounding); a
    :class:`BatchNormTrainState`'s step computes the whole batch at once (its statistics are
    the batch's).
    """
    loss_fn = loss_fn or functools.partial(_cross_entropy, model)
    loss_and_grad = microbatched(jax.value_and_grad(loss_fn), microbatches)

    def batch_norm_loss(params, batch_stats, images, labels):
        variables = {"params": params, "batch_stats": batch_stats}
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    def train_step(state, images, labels):
        if isinstance(state, BatchNormTrainState):
            (loss, batch_stats), grads = jax.value_and_grad(batch_norm_loss, has_aux=True)(
                state.params, state.batch_stats, images, labels
            )
            return _apply_gradients(state, grads).replace(batch_stats=batch_stats), loss
        loss, grads = loss_and_grad(state.params, images, labels)
        return _apply_gradients(state, grads), loss

    jit = functools.partial(
        jax.jit, donate_argnums=(0,) if donate else (), compiler_options=compiler_options
    )
    if placement is None:
        return jit(train_step)
    replicated, batch = placement.replicated, placement.batch
    return jit(train_step, in_shardings=(replicated, batch, batch), out_shardings=replicated)


def microbatched(loss_and_grad, microbatches: int):
    """``loss_and_grad(params, images, labels)`` (a ``jax.value_and_grad`` of a mean loss)
    as the mean over ``microbatches`` equal parts of the batch, one after another in a
    ``lax.scan``; the identity for 1.

    Microbatch ``j`` holds rows ``j, j + m, j + 2m, ...`` (``m = microbatches``), so each one
    spans the whole batch and a batch split over devices stays split the same way. The
    result equals the whole batch's up to float rounding (the sums are taken in another
    order), so a run's trajectory changes in its last bits. What it buys on a CPU: each
    part's activations stay in the caches. The DS-CNN's cgmq step at batch 128 ran 1.8x
    as fast with 8 (docs/performance.md); networks with XLA's own convolutions (LeNet-5,
    ``lenet5_bb``) ran many times slower inside the loop, so their schedules keep 1.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
      >>> x, y, w = jnp.arange(8.0).reshape(4, 2), jnp.arange(4.0), jnp.ones(2)
      >>> whole = jax.value_and_grad(loss)(w, x, y)
      >>> parts = microbatched(jax.value_and_grad(loss), 2)(w, x, y)
      >>> bool(jnp.allclose(whole[0], parts[0]) and jnp.allclose(whole[1], parts[1]))
      True
    """
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
    if microbatches == 1:
        return loss_and_grad

    def mean_over_parts(params, images, labels):
        if images.shape[0] % microbatches:
            raise ValueError(
                f"a batch of {images.shape[0]} does not split into {microbatches} equal "
                "microbatches: choose a batch size that is a multiple of it"
            )

        def parts(batch):
            rows = jnp.reshape(batch, (-1, microbatches, *batch.shape[1:]))
            return jnp.swapaxes(rows, 0, 1)

        def add(total, part):
            return optax.tree.add(total, loss_and_grad(params, *part)), None

        zero = optax.tree.zeros_like(jax.eval_shape(loss_and_grad, params, images, labels))
        total, _ = jax.lax.scan(add, zero, (parts(images), parts(labels)))
        return optax.tree.scale(1.0 / microbatches, total)

    return mean_over_parts


def _apply_gradients(state, grads):
    """``state.apply_gradients(grads=grads)``, with the loss gradient also passed to the
    optimizer as ``loss_grads`` when it takes extra arguments (the guard of
    :func:`cgmq_jax.constraint.constrained_update` weighs its moves by it)."""
    if not isinstance(state.tx, optax.GradientTransformationExtraArgs):
        return state.apply_gradients(grads=grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, loss_grads=grads)
    return state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )


def _is_right(model, variables, images, labels):
    """Whether ``model`` classifies each of ``images`` right (a boolean per image)."""
    return jnp.argmax(model.apply(variables, images), -1) == labels


@functools.partial(jax.jit, static_argnums=0)
def _correct(model, variables, images, labels):
    """How many of ``images`` ``model`` classifies right; compiled once per (equal) model,
    however many accuracy functions are made for it."""
    return jnp.sum(_is_right(model, variables, images, labels))


_right_each = jax.jit(_is_right, static_argnums=0)


def right_each(model, params, images, labels, batch_size: int = 1000) -> np.ndarray:
    """Whether ``model`` with ``params`` (host arrays, no BatchNorm statistics) classifies
    each of ``images`` right: a boolean array, jitted per batch."""
    return np.concatenate(
        [
            np.asarray(_right_each(model, {"params": params}, images[i : i + batch_size],
                                   labels[i : i + batch_size]))
            for i in range(0, len(labels), batch_size)
        ]
    )  # fmt: skip


def make_accuracy(model, batch_size: int = 1000):
    """``(params, images, labels) -> accuracy`` over a whole split, jitted per batch.

    For a float network with BatchNorm pass its variables, ``{"params": ...,
    "batch_stats": ...}``, as ``batch_stats=``: it is evaluated with the running averages.
    """

    def accuracy(params, images, labels, *, batch_stats=None) -> float:
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        total = 0
        for start in range(0, len(labels), batch_size):
            stop = start + batch_size
            total += int(_correct(model, variables, images[start:stop], labels[start:stop]))
        return total / len(labels)

    return accuracy


@dataclasses.dataclass
class _Progress:
    """Where a run stands; with the arrays, what a checkpoint holds (JSON-serialisable)."""

    phase: str = "float"  # of the state held: "float" or "qat" ("tune": the fill's, never saved)
    epoch: int = 0  # global number of the epoch in progress (or next)
    step: int = 0  # batches of ``epoch`` already trained (non-zero after an interrupt)
    losses: list[float] = dataclasses.field(default_factory=list)  # of those batches
    history: list[dict] = dataclasses.field(default_factory=list)
    best_epoch: int | None = None
    best_val_accuracy: float = -1.0
    seconds: float = 0.0  # training time spent before this process (resumed runs)
    float_val_accuracy: float | None = None  # the float network's, when QAT started


def _epoch_name(setup: _Setup, progress: _Progress) -> str:
    """``float epoch k`` or ``QAT epoch k``, numbered as the per-epoch log lines are."""
    if progress.phase == "float":
        return f"float epoch {progress.epoch + 1}"
    if progress.phase == "tune":
        return "the fill's weight training"
    return f"QAT epoch {progress.epoch + 1 - setup.qat_epochs.start}"


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(images, labels)`` minibatches in a seeded, deterministic order.

    The permutation comes from ``np.random.default_rng((seed, epoch))``, so the same
    ``(seed, epoch)`` always gives the same batches and each epoch gets its own order.

    Args:
        images: Array whose first axis indexes examples.
        labels: Array with the same first-axis length as ``images``.
        batch_size: Examples per batch (positive).
        seed: Non-negative integer seed.
        epoch: Non-negative epoch number, mixed into the seed.
        shuffle: If False, keep the original order (``seed``/``epoch`` are then unused).
        drop_last: Drop the final batch if it is smaller than ``batch_size``.

    Returns:
        An iterator over ``(images_batch, labels_batch)`` pairs (copies, not views).

    Raises:
        ValueError: Bad ``batch_size``, ``seed``, ``epoch`` or mismatched lengths.

    Example:
        >>> x, y = np.arange(10).reshape(10, 1), np.arange(10)
        >>> [b[1].tolist() for b in batches(x, y, 4, seed=0, shuffle=False)]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"images and labels differ in length: {n} vs {len(labels)}")
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(seed) != seed or seed < 0 or int(epoch) != epoch or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got {seed!r}, {epoch!r}")
    batch_size = int(batch_size)
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield images[idx], labels[idx]

    return generate()


def _train_epoch(
    state, train_step, setup, split, progress, *, desc, should_stop, save, timings, first
):
    """Train the rest of ``progress.epoch``; return the state and every loss of the epoch.

    After each step ``should_stop()`` is asked; if true, the state so far is saved with
    ``save(state, progress)`` (mid-epoch) and :class:`Interrupted` is raised. With
    ``first``, the first step (which compiles the step) is timed as ``timings["compile"]``.
    """
    config = setup.config
    order = batches(*split, config.batch_size, seed=config.seed, epoch=progress.epoch)
    order = itertools.islice(order, progress.step, None)
    losses = []
    synchronous = setup.placement.synchronous
    bar = tqdm(
        order,
        total=setup.steps_per_epoch,
        initial=progress.step,
        desc=f"{desc} {progress.epoch + 1}",
        leave=False,
    )
    for i, (x, y) in enumerate(bar, progress.step + 1):
        if first:
            started = time.perf_counter()
            state, loss = jax.block_until_ready(train_step(state, *setup.placement.put_batch(x, y)))
            timings["compile"] += time.perf_counter() - started
            first = False
        else:
            state, loss = train_step(state, *setup.placement.put_batch(x, y))
            if synchronous:  # see parallel.steps_must_not_overlap
                jax.block_until_ready(state)
        losses.append(loss)
        if should_stop() and i < setup.steps_per_epoch:
            bar.close()
            progress.step = i
            progress.losses += [float(v) for v in parallel.local_copy(losses)]
            saved = save(state, progress)
            raise Interrupted(f"{_epoch_name(setup, progress)}, batch {i}", saved)
    return state, progress.losses + [float(v) for v in parallel.local_copy(losses)]


def _check_finite(setup: _Setup, progress: _Progress, losses: list[float], params) -> None:
    """Raise :class:`TrainingDiverged` at a non-finite loss or parameter (names both)."""
    bad_step = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    finite = jax.tree.map(lambda x: np.all(np.isfinite(x)), parallel.local_copy(params))
    bad_leaves = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]
        if not ok
    ]
    if bad_step is None and not bad_leaves:
        return
    where = _epoch_name(setup, progress)
    parts = []
    if bad_step is not None:
        parts.append(f"the loss became {losses[bad_step]} at batch {bad_step + 1} of {where}")
    if bad_leaves:
        shown = ", ".join(bad_leaves[:3]) + (" ..." if len(bad_leaves) > 3 else "")
        parts.append(f"non-finite parameters after {where}: {shown}")
    raise TrainingDiverged(
        "training diverged: " + "; ".join(parts) + "; nothing certified. Lower --lr or "
        "--quantizer_lr."
    )


def _evaluate_float(setup, state, progress, loss, split, accuracy_fn, log) -> dict:
    accuracy = accuracy_fn(state.params, *split, batch_stats=getattr(state, "batch_stats", None))
    log(f"float epoch {progress.epoch + 1}: loss {loss:.4f}  val acc {100 * accuracy:.2f}%")
    return {"epoch": progress.epoch + 1, "phase": "float", "loss": loss, "val_accuracy": accuracy}


def _evaluate_qat(setup, state, progress, loss, split, accuracy_fn, log) -> dict:
    accuracy = accuracy_fn(state.params, *split)
    costs = cost.exact_costs(state.params, setup.specs)
    bops = costs["bops"]
    limits = setup.limits
    feasible = all(costs[name] <= limit for name, limit in limits.items())
    row = {
        "epoch": progress.epoch + 1,
        "phase": "qat",
        "loss": loss,
        "val_accuracy": accuracy,
        "bops": bops,
        "relative_bops_percent": cost.relative_bops(bops, setup.specs),
        "within_budget": feasible,
    }
    if set(limits) - {"bops"}:
        row["weight_memory_bits"] = costs["weight_memory_bits"]
        row["activation_bits"] = costs["activation_bits"]
    constrained = _constraint_state(state.opt_state)
    if constrained is not None:
        steps = constrained.infeasible_steps
        row["infeasible_steps"] = int(sum(jax.tree.leaves(steps)))
        if isinstance(steps, dict):
            row["infeasible_steps_by_limit"] = {k: int(v) for k, v in steps.items()}
        row["guard_steps"] = int(constrained.guard_steps)
    verdict = "" if not limits else ("  within budget" if feasible else "  OVER budget")
    log(
        f"QAT epoch {progress.epoch + 1 - setup.config.pretrain_epochs}: loss {loss:.4f}  "
        f"val acc {100 * accuracy:.2f}%  BOPs {bops:,} "
        f"({row['relative_bops_percent']:.3f}% of 32-bit){verdict}"
    )
    return row


def _constraint_state(opt_state):
    for leaf in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, constraint.ConstrainedUpdateState)
    ):
        if isinstance(leaf, constraint.ConstrainedUpdateState):
            return leaf
    return None
