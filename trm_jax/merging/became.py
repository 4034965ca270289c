"""BECAME: Bayesian continual learning with an adaptive, closed-form merging coefficient.

Li et al., ICML 2025 (arXiv 2504.02666). After task t the old model ``theta_old`` and the
model trained further on task t, ``theta_new``, are merged on the segment between them,
``theta_bar_t = (1 - c) theta_old + c theta_new``. With Laplace (diagonal-Fisher Gaussian)
approximations of the old tasks' posterior around ``theta_old`` (precision ``F_old``) and of
the new task's likelihood around ``theta_new`` (precision ``F_new``), the point on the segment
with the largest approximate posterior is

    c* = sum(F_new * Delta^2) / sum((F_new + F_old) * Delta^2),   Delta = theta_new - theta_old,

one scalar for the whole model (the sums run over every parameter). After merging, the Fisher
of the merged model on task t's data is added to the old one,
``F_old <- F(theta_bar_t) + gamma * F_old`` (``gamma = 1``), so the state stays O(1).

Written from ``GPM-based/fisher.py`` and ``GPM-based/train_util.py`` (the authors' code, first
published as commit 859a267 "Code init"; read in the ankur-bohra/BECAME fork, whose history
holds that commit; the copy of limei0818/BECAME we could read has only its README).

Their Fisher is the squared gradient of each *batch's* mean cross-entropy, times the batch
size, summed over the task's training set and divided by its size, with the labels set to the
model's own predictions (``fisher_comp='true'``, the default) or to the data's labels
(``'empirical'``): ``fisher_batch`` / ``fisher_diag``.

Left out: BECAME's first stage, gradient-projection training (GPM/SGP/GPCNS), which constrains
the *optimiser* of task t and is not a merge; without it ``theta_old`` is theta_bar_{t-1} (the
runner's start point) and ``theta_new`` is theta_t, the Bayesian formulation's previous and
new models. With it, pass the projected-training model as ``theta_old`` and the model trained
on from it without constraints as ``theta_new``.

Runner integration: needs after task t theta_bar_{t-1} (or the stage-1 model), theta_t, and
task t's training batches twice (the Fisher at theta_t for the coefficient, then at
theta_bar_t for the state), with ``apply_fn(params, images) -> logits`` and the task's class
mask. No snapshots or optimiser state. Keeps between tasks one float32 parameter-sized tree
(the accumulated diagonal Fisher) and a task counter. ``merge_task`` does one task's Fisher
passes, merge and state update.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trm_jax.errors import ConfigError
from trm_jax.losses import cross_entropy
from trm_jax.merging.task_vectors import check_finite, check_like
from trm_jax.tree_util import PyTree, f32, is_traced, leaf_names

LABEL_MODES = ("true", "empirical")


def default_config() -> ml_collections.ConfigDict:
    """BECAME's merge hyper-parameters with the authors' defaults (``main_cifar100.py``).

    * ``fisher_gamma`` (1.0): decay of the accumulated Fisher, ``F <- F_merged + gamma F``.
    * ``fisher_labels`` (``'true'``): labels of the Fisher loss, the model's argmax
      predictions (``'true'``) or the data's labels (``'empirical'``).
    * ``exclude`` (``''``: none): regex of leaves left out of the coefficient's sums (the
      NSCL-based variant leaves out the heads, ``'^last'``; the GPM-based one sums all).
    """
    config = ml_collections.ConfigDict()
    config.fisher_gamma = 1.0
    config.fisher_labels = "true"
    config.exclude = ""
    return config


class BecameState(NamedTuple):
    """The accumulated diagonal Fisher (float32, shaped like the parameters) and how many
    tasks have been merged."""

    fisher: PyTree
    count: jax.Array


def init(like: PyTree) -> BecameState:
    """Empty state (no task merged).

    Args:
        like: a tree shaped like the parameters.

    Returns:
        ``BecameState`` with a zero float32 Fisher and count 0.
    """
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), like)
    return BecameState(zeros, jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("apply_fn", "label_mode"))
def fisher_batch(
    apply_fn: Callable,
    params: PyTree,
    batch: dict,
    class_mask: jax.Array | None = None,
    *,
    label_mode: str = "true",
) -> PyTree:
    """One batch's Fisher term ``B * (grad of the batch-mean cross-entropy)^2`` (float32).

    Args:
        apply_fn: ``apply_fn(params, images) -> logits``.
        params: where the Fisher is taken.
        batch: ``{'image': [B, ...], 'label': [B]}``.
        class_mask: optional bool ``[C]``; the softmax runs over these classes only.
        label_mode: ``'true'`` (labels = argmax of the masked logits) or ``'empirical'``.

    Returns:
        A tree shaped like ``params``; sum it over batches and divide by the number of
        examples (``fisher_diag``) for the authors' Fisher.
    """
    images = batch["image"]

    def loss(p):
        logits = apply_fn(p, images)
        if label_mode == "true":
            masked = logits if class_mask is None else jnp.where(class_mask, logits, -jnp.inf)
            labels = jax.lax.stop_gradient(jnp.argmax(masked, axis=-1))
        else:
            labels = batch["label"]
        return cross_entropy(logits, labels, class_mask)

    grads = jax.grad(loss)(params)
    n = jnp.float32(images.shape[0])
    return jax.tree.map(lambda g: n * jnp.square(f32(g)).astype(jnp.float32), grads)


@jax.jit
def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def fisher_diag(
    apply_fn: Callable,
    params: PyTree,
    batches: Iterable[dict],
    class_mask: jax.Array | None = None,
    *,
    label_mode: str = "true",
) -> PyTree:
    """The authors' diagonal Fisher over a task's data: ``sum_b B_b g_b^2 / sum_b B_b``.

    Args:
        apply_fn: ``apply_fn(params, images) -> logits`` (hashable: a static argument).
        params: where the Fisher is taken.
        batches: the task's batches, ``{'image', 'label'}`` each.
        class_mask: optional bool ``[C]`` of the task's classes.
        label_mode: see ``fisher_batch``.

    Returns:
        A float32 tree shaped like ``params``.
    """
    if label_mode not in LABEL_MODES:
        raise ConfigError(f"became: fisher_labels={label_mode!r}; choices: {LABEL_MODES}")
    total, count = None, 0
    for batch in batches:
        term = fisher_batch(apply_fn, params, batch, class_mask, label_mode=label_mode)
        total = term if total is None else _add(total, term)
        count += int(np.shape(batch["image"])[0])
    if total is None:
        raise ValueError("became: fisher_diag needs at least one batch")
    return jax.tree.map(lambda x: x / count, total)


@functools.partial(jax.jit, static_argnums=4)
def _coefficient_sums(old, new, f_new, f_old, include):
    num = jnp.zeros((), jnp.float32)
    den = jnp.zeros((), jnp.float32)
    for o, n, fn, fo, keep in zip(old, new, f_new, f_old, include, strict=True):
        if not keep:
            continue
        d2 = jnp.square(f32(n) - f32(o))
        num = num + jnp.sum(f32(fn) * d2)
        den = den + jnp.sum((f32(fn) + f32(fo)) * d2)
    return num, den


def coefficient(
    theta_old: PyTree,
    theta_new: PyTree,
    fisher_new: PyTree,
    fisher_old: PyTree,
    *,
    fallback: float | jax.Array = 0.5,
    include: PyTree | None = None,
) -> jax.Array:
    """BECAME's merging coefficient ``c*`` (float32 scalar in [0, 1] for Fishers >= 0).

    Args:
        theta_old: the old model (theta_bar_{t-1}, or BECAME's stage-1 model).
        theta_new: the new model (theta_t).
        fisher_new: diagonal Fisher of the new task at ``theta_new``.
        fisher_old: accumulated Fisher of the old tasks (``BecameState.fisher``).
        fallback: the coefficient when the denominator is 0 (no movement, or no curvature
            where the models differ); ``merge`` passes the authors' Fisher-free rule 1/t.
        include: optional tree of Python bools: leaves that enter the sums (default all).

    Returns:
        ``sum F_new D^2 / sum (F_new + F_old) D^2`` with ``D = theta_new - theta_old``.
    """
    check_like(
        theta_old,
        theta_new,
        fisher_new,
        fisher_old,
        names=["theta_new", "fisher_new", "fisher_old"],
    )
    flags = (
        [True] * len(jax.tree.leaves(theta_old))
        if include is None
        else [bool(x) for x in jax.tree.leaves(include)]
    )
    num, den = _coefficient_sums(
        jax.tree.leaves(theta_old),
        jax.tree.leaves(theta_new),
        jax.tree.leaves(fisher_new),
        jax.tree.leaves(fisher_old),
        tuple(flags),
    )
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, jnp.asarray(fallback, jnp.float32))


@jax.jit
def _interp_leaf(o: jax.Array, n: jax.Array, c: jax.Array) -> jax.Array:
    return ((1.0 - c) * f32(o) + c * f32(n)).astype(jnp.result_type(o))


def interpolate(theta_old: PyTree, theta_new: PyTree, coef: float | jax.Array) -> PyTree:
    """The point ``(1 - coef) theta_old + coef theta_new`` on the segment between two models.

    Args:
        theta_old: the old model.
        theta_new: the new model (same structure).
        coef: the merging coefficient (may be traced).

    Returns:
        The interpolated parameters, float32 arithmetic, each old leaf's dtype.
    """
    check_like(theta_old, theta_new, names=["theta_new"])
    c = jnp.asarray(coef, jnp.float32)
    return jax.tree.map(lambda o, n: _interp_leaf(o, n, c), theta_old, theta_new)


def merge(
    state: BecameState,
    theta_old: PyTree,
    theta_new: PyTree,
    fisher_new: PyTree,
    *,
    include: PyTree | None = None,
) -> tuple[PyTree, jax.Array]:
    """theta_bar_t and the coefficient used. The first task returns ``theta_new`` (c = 1).

    Args:
        state: the state after task t-1.
        theta_old: theta_bar_{t-1} (or the stage-1 model).
        theta_new: theta_t.
        fisher_new: ``fisher_diag`` at ``theta_new`` on task t's data.
        include: leaves entering the coefficient's sums (default all).

    Returns:
        ``(merged_params, coef)``; a denominator of 0 falls back to ``1 / t``.
    """
    first = state.count == 0
    fallback = 1.0 / (state.count.astype(jnp.float32) + 1.0)
    coef = coefficient(
        theta_old, theta_new, fisher_new, state.fisher, fallback=fallback, include=include
    )
    coef = jnp.where(first, 1.0, coef)
    merged = interpolate(theta_old, theta_new, coef)
    if not is_traced(merged):
        check_finite(merged, "became: merged parameters")
    return merged, coef


def update(
    state: BecameState, fisher_merged: PyTree, *, gamma: float | jax.Array = 1.0
) -> BecameState:
    """Fold the merged model's Fisher into the state: ``F <- fisher_merged + gamma F``.

    Args:
        state: the state after task t-1.
        fisher_merged: ``fisher_diag`` at theta_bar_t on task t's data (for task 1, at
            theta_1).
        gamma: decay of the old Fisher (authors: 1).

    Returns:
        The state after task t.
    """
    check_like(state.fisher, fisher_merged, names=["fisher_merged"])
    g = jnp.asarray(gamma, jnp.float32)
    fisher = jax.tree.map(lambda fm, fo: f32(fm) + g * fo, fisher_merged, state.fisher)
    if not is_traced(fisher):
        check_finite(fisher, "became: accumulated Fisher")
    return BecameState(fisher, state.count + 1)


def merge_task(
    state: BecameState,
    theta_old: PyTree,
    theta_new: PyTree,
    apply_fn: Callable,
    batches: Callable[[], Iterable[dict]] | Sequence[dict],
    class_mask: jax.Array | None = None,
    *,
    config: ml_collections.ConfigDict | None = None,
) -> tuple[PyTree, BecameState, jax.Array]:
    """Everything BECAME does after task t: Fisher at theta_t, merge, Fisher at the merge.

    Args:
        state: the state after task t-1.
        theta_old: theta_bar_{t-1} (or the stage-1 model).
        theta_new: theta_t.
        apply_fn: ``apply_fn(params, images) -> logits`` (hashable).
        batches: task t's batches, read twice: a sequence, or a zero-argument callable
            returning a fresh iterable each time.
        class_mask: optional bool ``[C]`` of task t's classes.
        config: ``default_config()``-like.

    Returns:
        ``(theta_bar_t, new_state, coef)``. Task 1 skips the first Fisher pass.
    """
    config = default_config() if config is None else config
    data = batches if callable(batches) else (lambda: batches)
    include = None
    if config.exclude:
        names = leaf_names(theta_new)
        flags = [not re.search(config.exclude, n) for n in names]
        include = jax.tree.unflatten(jax.tree.structure(theta_new), flags)
    mode = config.fisher_labels
    first = not isinstance(state.count, jax.core.Tracer) and int(state.count) == 0
    if first:
        merged, coef = theta_new, jnp.ones((), jnp.float32)
    else:
        f_new = fisher_diag(apply_fn, theta_new, data(), class_mask, label_mode=mode)
        merged, coef = merge(state, theta_old, theta_new, f_new, include=include)
    f_merged = fisher_diag(apply_fn, merged, data(), class_mask, label_mode=mode)
    return merged, update(state, f_merged, gamma=config.fisher_gamma), coef
