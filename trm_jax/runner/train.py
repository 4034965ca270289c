"""Fine-tuning: the optimiser, one jitted pure train step, and the task's trajectory.

The step is built once per (model, head, loss terms) by ``make_train_step`` and then
called as ``step(state, batch, key, ctx)``:

- ``state`` is a ``TrainState`` NamedTuple (step counter, trainable params, optax state);
- ``batch`` is ``{'image': uint8 [B,h,w,c], 'label': int32 [B]}`` straight from
  ``data.pipeline.batches``; preprocessing (``data.pipeline.make_preprocess``) runs inside
  the jitted step;
- ``key`` is the task's key; the step derives its own with ``jax.random.fold_in(key, step)``
  so a replay from a checkpoint sees exactly the same randomness;
- ``ctx`` holds the frozen arrays the loss needs (head rows, the mask of classes the loss
  is computed over, the LwF teacher, the EWC anchor and Fisher). Passing them as
  arguments, not closures, keeps one compiled step for every task of the stream.

``finetune`` runs a task's steps, keeps ``K`` evenly spaced snapshots of the trajectory
(the last one is the end point), measures the mean gradient norm over the first ``S``
steps (the "onset" gradient norm, docs/method.md), and raises ``TrainingError``
naming the task and step on a non-finite loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from trm_jax import losses
from trm_jax.errors import ConfigError, TrainingError
from trm_jax.runner import regularizers
from trm_jax.tree_util import DTYPES, PyTree, batched_apply


def default_config() -> ml_collections.ConfigDict:
    """Fine-tuning hyper-parameters (MagMax defaults: AdamW 1e-5, wd 0.1, batch 128,
    cosine schedule with 500 warm-up steps, grad-clip 1.0)."""
    c = ml_collections.ConfigDict()
    c.optimizer = "adamw"  # adamw | sgd
    c.lr = 1e-5
    c.weight_decay = 0.1
    c.momentum = 0.9  # sgd only
    c.batch_size = 128
    c.epochs = 10
    c.steps = 0  # > 0 overrides epochs: exactly this many steps per task
    c.warmup_steps = 500  # lr * (step + 1) / warmup, not clipped to the task (MagMax)
    c.grad_clip = 1.0  # 0 = off
    c.grad_accum = 1  # micro-batches per step (batch_size must divide)
    c.dtype = "float32"  # compute dtype of the forward pass: float32 | bfloat16
    c.augment = False  # random-resized-crop + flip inside the step
    c.snapshots = 5  # K: trajectory snapshots kept per task (last = end point)
    c.onset_steps = 10  # S: steps averaged for the onset gradient norm
    c.label_smoothing = 0.0
    return c


class TrainState(NamedTuple):
    """Everything that changes during fine-tuning (a pytree; checkpointable)."""

    step: jax.Array  # int32 scalar: steps taken
    params: PyTree  # {'backbone': ..., 'head': ...} (head empty for frozen heads)
    opt_state: optax.OptState
    total_steps: jax.Array  # int32 scalar: length of the learning-rate schedule


def steps_per_task(num_examples: int, cfg: ml_collections.ConfigDict) -> int:
    """Number of optimiser steps for a task of ``num_examples`` training examples."""
    if cfg.steps > 0:
        return int(cfg.steps)
    per_epoch = num_examples // cfg.batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} exceeds the task's {num_examples} training "
            "examples; lower train.batch_size"
        )
    return int(cfg.epochs * per_epoch)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The update direction: clip -> Adam + decoupled weight decay (AdamW), or SGD with
    momentum + weight decay. The learning rate is applied by the step (``lr_at``), so
    one compiled step serves schedules of every length (tasks of different sizes,
    the joint baseline, the onset probe)."""
    if cfg.optimizer == "adamw":
        opt = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(cfg.weight_decay))
    elif cfg.optimizer == "sgd":
        opt = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay), optax.trace(decay=cfg.momentum)
        )
    else:
        raise ConfigError(f"unknown train.optimizer '{cfg.optimizer}'; choices: adamw, sgd")
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def lr_at(step: jax.Array, total_steps: jax.Array, peak: float, warmup_steps: int) -> jax.Array:
    """MagMax's schedule (the one its published code trains with): ``peak * (step + 1) /
    warmup_steps`` for ``step < warmup_steps``, then cosine decay from ``peak`` at
    ``warmup_steps`` to 0 at ``total_steps``.

    The warm-up is not clipped to the task's length: with fewer steps than
    ``warmup_steps`` the rate only ramps (MagMax's CIFAR-100/10 tasks end at 0.78 of the
    peak). The first step trains (``peak / warmup_steps``, never 0), so even a task of one
    step moves the model."""
    step = jnp.asarray(step, jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    warm = jnp.float32(warmup_steps)
    up = peak * (step + 1.0) / jnp.maximum(warm, 1.0)
    frac = (step - warm) / jnp.maximum(total - warm, 1.0)
    down = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warm, up, down)


def init_state(
    params: PyTree, optimizer: optax.GradientTransformation, total_steps: int
) -> TrainState:
    """Step 0 of a schedule of ``total_steps`` steps from ``params``."""
    return TrainState(
        jnp.zeros((), jnp.int32),
        params,
        optimizer.init(params),
        jnp.asarray(total_steps, jnp.int32),
    )


# ----------------------------------------------------------------------------- the step


def make_loss_fn(
    logits_fn: Callable,
    *,
    lwf_lambda: float = 0.0,
    lwf_temperature: float = 2.0,
    ewc_lambda: float = 0.0,
    label_smoothing: float = 0.0,
    dtype: str = "float32",
) -> Callable:
    """``loss_fn(params, images, labels, ctx) -> (loss, aux)``: cross-entropy over the
    classes in ``ctx['train_mask']``, plus LwF / EWC terms when their weight is > 0
    (their inputs come from ``ctx``: ``teacher``, ``old_mask``, ``anchor``, ``fisher``)."""
    compute_dtype = DTYPES[dtype]

    def loss_fn(params, images, labels, ctx):
        fwd = params
        if compute_dtype != jnp.float32:
            fwd = jax.tree.map(lambda p: p.astype(compute_dtype), params)
            images = images.astype(compute_dtype)
        logits = logits_fn(fwd, images, ctx).astype(jnp.float32)
        ce = losses.cross_entropy(logits, labels, ctx["train_mask"], label_smoothing)
        loss = ce
        aux = {"ce": ce}
        if lwf_lambda > 0:
            teacher_logits = jax.lax.stop_gradient(logits_fn(ctx["teacher"], images, ctx))
            lwf = regularizers.lwf_loss(
                logits.astype(jnp.float32),
                teacher_logits.astype(jnp.float32),
                ctx["old_mask"],
                lwf_temperature,
            )
            loss = loss + lwf_lambda * lwf
            aux["lwf"] = lwf
        if ewc_lambda > 0:
            ewc = regularizers.ewc_penalty(params["backbone"], ctx["anchor"], ctx["fisher"])
            loss = loss + ewc_lambda * ewc
            aux["ewc"] = ewc
        return loss, aux

    return loss_fn


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    preprocess: Callable,
    *,
    lr: float,
    warmup_steps: int = 0,
    augment: bool = False,
    grad_accum: int = 1,
) -> Callable:
    """A jitted pure ``step(state, batch, key, ctx) -> (state, metrics)``.

    The update is ``-lr_at(state.step, state.total_steps, lr, warmup_steps) *
    optimizer_direction``. ``metrics``: ``loss``, ``lr``, ``grad_norm`` (global L2 norm
    of the gradient of the full loss, before clipping), plus the loss terms. With
    ``grad_accum > 1`` the batch is split into that many micro-batches whose gradients
    are averaged (same result as one big batch up to float rounding, less activation
    memory). If ``ctx`` holds
    ``update_mask`` (a pytree of bool arrays like ``params``, e.g. the linear-head rows
    of the current task), entries outside it keep their old values.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch, key, ctx):
        k = jax.random.fold_in(key, state.step)
        images = preprocess(batch["image"], k, train=augment)
        labels = batch["label"]
        if grad_accum > 1:
            b = labels.shape[0]
            if b % grad_accum:
                raise ConfigError(f"batch {b} is not divisible by train.grad_accum={grad_accum}")
            xs = images.reshape(grad_accum, b // grad_accum, *images.shape[1:])
            ys = labels.reshape(grad_accum, b // grad_accum)

            def body(carry, xy):
                (loss, aux), g = grad_fn(state.params, xy[0], xy[1], ctx)
                return jax.tree.map(jnp.add, carry, (loss, aux, g)), None

            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(lambda: grad_fn(state.params, xs[0], ys[0], ctx)),
            )
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, aux, grads), _ = jax.lax.scan(body, zeros, (xs, ys))
            loss, aux, grads = jax.tree.map(lambda v: v / grad_accum, (loss, aux, grads))
        else:
            (loss, aux), grads = grad_fn(state.params, images, labels, ctx)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        rate = lr_at(state.step, state.total_steps, lr, warmup_steps)
        params = jax.tree.map(lambda p, u: (p - rate * u).astype(p.dtype), state.params, updates)
        if "update_mask" in ctx:
            params = jax.tree.map(
                lambda new, old, m: jnp.where(m, new, old), params, state.params, ctx["update_mask"]
            )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": rate, **aux}
        return TrainState(state.step + 1, params, opt_state, state.total_steps), metrics

    # No donation (big_vision donates the state): ``finetune`` keeps snapshots of
    # ``state.params``, and a donated state would delete them.
    return jax.jit(step, donate_argnums=())


# ----------------------------------------------------------------------------- trajectory


def snapshot_steps(num_steps: int, k: int) -> list[int]:
    """Step counts after which the K snapshots are taken: evenly spaced, last = num_steps.

    ``round(num_steps * i / K)`` for i = 1..K, de-duplicated (fewer than K when the task
    has fewer than K steps).
    """
    if num_steps <= 0 or k <= 0:
        return []
    steps = sorted({max(1, int(round(num_steps * i / k))) for i in range(1, k + 1)})
    return steps


class FinetuneResult(NamedTuple):
    """What ``finetune`` returns: the end state, the trajectory and what was measured."""

    state: TrainState
    snapshots: list  # K backbone param trees, last = end point
    onset_grad_norm: float  # mean grad norm over the first S steps (nan if S == 0)
    losses: np.ndarray  # per-step loss
    seconds: float


def finetune(
    step_fn: Callable,
    state: TrainState,
    batch_iter: Iterable[dict],
    num_steps: int,
    *,
    key: jax.Array,
    ctx: PyTree,
    num_snapshots: int = 0,
    onset_steps: int = 0,
    task: int | str = 0,
    desc: str = "fine-tune",
    progress: bool = True,
    log: Callable[[int, dict], None] | None = None,
) -> FinetuneResult:
    """Run ``num_steps`` steps over ``batch_iter`` (which must yield at least that many
    batches), keeping snapshots of ``state.params['backbone']`` at ``snapshot_steps``.
    ``log(step, metrics)``, when given, receives every step's metrics (loss, lr,
    grad_norm and the loss terms), e.g. for TensorBoard.

    Raises ``TrainingError`` naming ``task`` and the step on a non-finite loss
    (``task='pretrain'``: pre-training, whose rate is ``pretrain.train.lr``).
    """
    where = "pre-training" if task == "pretrain" else f"task {task}"
    lr_field = "pretrain.train.lr" if task == "pretrain" else "train.lr"
    t0 = time.perf_counter()
    snap_at = set(snapshot_steps(num_steps, num_snapshots))
    snapshots, losses, norms = [], [], []
    it: Iterator[dict] = iter(batch_iter)
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for i in range(num_steps):
        try:
            batch = next(it)
        except StopIteration as e:
            raise TrainingError(f"{where}: batch iterator ran out at step {i}") from e
        state, metrics = step_fn(state, batch, key, ctx)
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({loss}) in {where} at step {i + 1}; lower {lr_field} "
                "or check the data (checkpoints are intact)"
            )
        losses.append(loss)
        if log is not None:
            log(i, metrics)
        if i < onset_steps:
            norms.append(float(metrics["grad_norm"]))
        if (i + 1) in snap_at:
            snapshots.append(state.params["backbone"])
        bar.update(1)
        if i % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    onset = float(np.mean(norms)) if norms else float("nan")
    return FinetuneResult(
        state, snapshots, onset, np.asarray(losses, np.float32), time.perf_counter() - t0
    )


def onset_grad_norm(
    loss_fn: Callable,
    params: PyTree,
    batches: Iterable[dict],
    preprocess: Callable,
    *,
    key: jax.Array,
    ctx: PyTree,
    augment: bool = False,
) -> float:
    """Mean ``||grad_theta L||`` at fixed ``params`` over ``batches`` (no update).

    A direct reference for the onset norm that ``finetune`` measures along the real
    first steps (those move ``params``; this does not). Step ``i`` uses
    ``fold_in(key, i)`` like the train step.
    """
    g = _grad_norm_jit(loss_fn, preprocess, augment)
    norms = [float(g(params, b, jax.random.fold_in(key, i), ctx)) for i, b in enumerate(batches)]
    return float(np.mean(norms)) if norms else float("nan")


def _grad_norm_jit(loss_fn, preprocess, augment):
    def gn(params, batch, k, ctx):
        images = preprocess(batch["image"], k, train=augment)
        grads = jax.grad(lambda p: loss_fn(p, images, batch["label"], ctx)[0])(params)
        return optax.global_norm(grads)

    return jax.jit(gn)


# ----------------------------------------------------------------------------- evaluation


def make_predict_fn(logits_fn: Callable, preprocess: Callable) -> Callable:
    """Jitted ``predict(params, images_uint8, ctx) -> logits [B, C]`` (no augmentation)."""

    def predict(params, images, ctx):
        return logits_fn(params, preprocess(images, None, train=False), ctx)

    return jax.jit(predict)


def predict_all(
    predict, params, ctx, images: np.ndarray, batch_size: int, place: Callable | None = None
) -> np.ndarray:
    """Logits for every image, in fixed-size batches (``tree_util.batched_apply``: the last
    one zero-padded, so one compiled shape serves every call). ``place`` puts a batch of
    images on devices (e.g. split over a mesh); default: as is."""
    return batched_apply(lambda x: predict(params, x, ctx), images, batch_size, place=place)
