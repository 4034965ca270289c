"""Aligned model merging for continual learning (Sokar et al. 2025, "PAM").

"Continual Learning in Vision-Language Models via Aligned Model Merging" (arXiv 2506.03189,
Google DeepMind). Instead of fine-tuning one set of weights in place, every task fine-tunes a
temporary copy of the global (merged) weights, which is merged back by element-wise averaging
when the task ends. To keep the copy mergeable, training is periodically *aligned*: entries
of the copy whose sign conflicts with the global weights' largest-magnitude entries (the top
``p`` fraction, ``p = 0.5`` by default) are re-initialised, to zero or to the global value.
The paper applies this to LoRA factors of a VLM (PaliGemma, rank 32); here the "weights" are
the runner's trainable deltas ``tau = theta - theta0`` (for full fine-tuning, task vectors),
so the global weights are the merged task vector ``tau_bar`` and the copy starts at it (the
task is fine-tuned from theta_bar_{t-1}).

    conflict(tau) = top_p(|tau_bar|) & (tau * tau_bar < 0)        (per leaf)
    align:  tau <- where(conflict, 0 or tau_bar, tau)             every ``align_every`` steps
    merge:  tau_bar_t = ((t-1) tau_bar_{t-1} + tau_t) / t         (the running average)

Sources. No public code was found and the stored copy of the paper gave only its abstract
and introduction; the mechanism (sign conflicts with the top-p% global weights, reset to zero
or to the global values, p = 50%, element-wise averaging, LoRA rank 32) is as described in a
third-party summary of the paper. Guessed, and marked so in ``default_config``: the top-p
scope (per leaf), how ties at the threshold count, the reset target default, the alignment
period, and whether "averaging" is the running mean over tasks (default) or a fixed-weight
average of global and copy. ``alignment_penalty`` is *not* from the paper: a differentiable
surrogate of the reset for runners that can only add a loss (off by default).

Runner integration: needs theta0; theta_bar_{t-1} as the start of task t; inside task t's
training, every ``align_every`` steps, ``align(params, theta_bar_prev, theta0)`` (pure and
jit-able; ``importance_mask`` can be computed once per task); theta_t at the end of the task.
No data, snapshots or optimiser state for the merge itself. Keeps between tasks one float32
parameter-sized tree (``tau_bar``) and a task counter; ``merge_step(theta0, state, theta_t)``
returns the merged model and the new state.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from trm_jax.errors import ConfigError
from trm_jax.merging.task_vectors import check_finite, check_like
from trm_jax.tree_util import PyTree, f32, is_traced

RESETS = ("zero", "global")


def default_config() -> ml_collections.ConfigDict:
    """PAM's hyper-parameters (the paper's where known, else marked as our guesses).

    * ``align_fraction`` (0.5, the paper's default ``p``): fraction of each leaf's
      largest-magnitude global entries whose signs are enforced.
    * ``reset`` (``'zero'``; guessed, the paper offers ``'zero'`` and ``'global'``).
    * ``align_every`` (100 steps; guessed, "periodically" in the paper).
    * ``merge_weight`` (0.0 = the running mean over tasks; guessed. A value in (0, 1] is a
      fixed weight of the new task, ``(1 - w) tau_bar + w tau_t``).
    * ``penalty_weight`` (0.0): weight of ``alignment_penalty`` (not in the paper).
    """
    config = ml_collections.ConfigDict()
    config.align_fraction = 0.5
    config.reset = "zero"
    config.align_every = 100
    config.merge_weight = 0.0
    config.penalty_weight = 0.0
    return config


def _check_fraction(p) -> None:
    if not isinstance(p, jax.core.Tracer) and not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"aligned: align_fraction={float(p)} is outside [0, 1]")


def _top_fraction(x: jax.Array, p: jax.Array) -> jax.Array:
    """True on the ``floor(p * n)`` largest ``|x|`` of a leaf (entries tied with the last one
    kept are kept too; ``floor(p * n) = 0`` keeps nothing)."""
    a = jnp.abs(f32(x)).reshape(-1)
    n = a.shape[0]
    k = jnp.floor(p * n).astype(jnp.int32)
    ordered = jnp.sort(a)[::-1]
    threshold = ordered[jnp.clip(k - 1, 0, n - 1)]
    return ((a >= threshold) & (k > 0)).reshape(jnp.shape(x))


@jax.jit
def _mask_leaf(g: jax.Array, p: jax.Array) -> jax.Array:
    return _top_fraction(g, p)


def importance_mask(global_delta: PyTree, p: float | jax.Array = 0.5) -> PyTree:
    """The entries whose signs alignment enforces: per leaf, the top ``p`` fraction of
    ``|tau_bar|``. Fixed for a whole task; compute it once.

    Args:
        global_delta: ``tau_bar = theta_bar_{t-1} - theta0``.
        p: the fraction, in [0, 1] (may be traced).

    Returns:
        A bool tree: the ``floor(p n)`` largest magnitudes of each leaf (entries tied with the
        last one kept are kept too; ``floor(p n) = 0`` keeps nothing).
    """
    _check_fraction(p)
    p = jnp.asarray(p, jnp.float32)
    return jax.tree.map(lambda g: _mask_leaf(g, p), global_delta)


@functools.partial(jax.jit, static_argnames=("reset",))
def _align_leaf(x, g, b, important, *, reset: str):
    tau = f32(x) - f32(b)
    gd = f32(g) - f32(b)
    conflict = important & (tau * gd < 0)
    target = f32(b) if reset == "zero" else f32(g)
    return jnp.where(conflict, target, f32(x)).astype(jnp.result_type(x)), jnp.sum(conflict)


def align(
    params: PyTree,
    global_params: PyTree,
    base: PyTree,
    *,
    p: float | jax.Array = 0.5,
    reset: str = "zero",
    mask: PyTree | None = None,
    return_count: bool = False,
):
    """PAM's alignment: reset the entries of the task copy that fight the global weights.

    Args:
        params: the task copy being trained (theta).
        global_params: the global merged model theta_bar_{t-1}.
        base: theta0 (deltas are taken against it).
        p: fraction of each leaf's largest global entries checked.
        reset: ``'zero'`` (the delta is set to 0: theta <- theta0) or ``'global'``
            (theta <- theta_bar_{t-1}).
        mask: a precomputed ``importance_mask(global_params - base, p)``.
        return_count: also return how many entries were reset (int32 scalar).

    Returns:
        The aligned parameters (each leaf's dtype), and the count if asked.
    """
    if reset not in RESETS:
        raise ConfigError(f"aligned: reset={reset!r}; choices: {RESETS}")
    check_like(params, global_params, base, names=["global_params", "base"])
    if mask is None:
        gdelta = jax.tree.map(lambda g, b: f32(g) - f32(b), global_params, base)
        mask = importance_mask(gdelta, p)
    check_like(params, mask, names=["mask"])
    pairs = jax.tree.map(
        lambda x, g, b, m: _align_leaf(x, g, b, m, reset=reset), params, global_params, base, mask
    )
    outer = jax.tree.structure(params)
    out, counts = jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
    if return_count:
        return out, sum(jax.tree.leaves(counts), jnp.zeros((), jnp.int32))
    return out


def alignment_penalty(
    params: PyTree,
    global_params: PyTree,
    base: PyTree,
    *,
    p: float | jax.Array = 0.5,
    mask: PyTree | None = None,
) -> jax.Array:
    """A differentiable surrogate of the reset (our addition, not in the paper).

    Args:
        params: the task copy being trained.
        global_params: theta_bar_{t-1}.
        base: theta0.
        p: fraction of each leaf's largest global entries checked.
        mask: a precomputed ``importance_mask`` (gradients never flow into it).

    Returns:
        ``sum over checked entries of relu(-sign(tau_bar) * tau)^2`` (float32): zero when every
        checked entry agrees in sign or is zero; its gradient pulls only conflicting entries
        back towards zero.
    """
    check_like(params, global_params, base, names=["global_params", "base"])
    if mask is None:
        gdelta = jax.tree.map(lambda g, b: f32(g) - f32(b), global_params, base)
        mask = importance_mask(jax.lax.stop_gradient(gdelta), p)

    def leaf(x, g, b, m):
        tau = f32(x) - f32(b)
        s = jnp.sign(jax.lax.stop_gradient(f32(g) - f32(b)))
        return jnp.sum(jnp.where(m, jnp.square(jax.nn.relu(-s * tau)), 0.0))

    terms = jax.tree.leaves(jax.tree.map(leaf, params, global_params, base, mask))
    return sum(terms, jnp.zeros((), jnp.float32))


# ----------------------------------------------------------------------- merging


class AlignedState(NamedTuple):
    """The global merged delta ``tau_bar`` (float32) and how many tasks it averages."""

    delta: PyTree
    count: jax.Array


def init(like: PyTree) -> AlignedState:
    """Empty state (no task merged).

    Args:
        like: a tree shaped like the parameters.

    Returns:
        ``AlignedState`` with a zero float32 ``delta`` and count 0.
    """
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), like)
    return AlignedState(zeros, jnp.zeros((), jnp.int32))


@jax.jit
def _average_leaf(d, t, count, weight):
    c = count.astype(jnp.float32)
    running = (c * d + f32(t)) / (c + 1.0)
    fixed = (1.0 - weight) * d + weight * f32(t)
    return jnp.where(count == 0, f32(t), jnp.where(weight > 0, fixed, running))


def update(state: AlignedState, tau: PyTree, *, weight: float | jax.Array = 0.0) -> AlignedState:
    """Average the task's delta into the global one.

    Args:
        state: the state after task t-1.
        tau: ``theta_t - theta0``.
        weight: 0 for the running mean ``((t-1) tau_bar + tau_t) / t``; in (0, 1] a fixed
            weight of the new task. Task 1 always gives ``tau_bar = tau_1``.

    Returns:
        The state after task t.
    """
    check_like(state.delta, tau, names=["task vector"])
    if not isinstance(weight, jax.core.Tracer) and not 0.0 <= float(weight) <= 1.0:
        raise ConfigError(f"aligned: merge_weight={float(weight)} is outside [0, 1]")
    w = jnp.asarray(weight, jnp.float32)
    delta = jax.tree.map(lambda d, t: _average_leaf(d, t, state.count, w), state.delta, tau)
    if not is_traced(delta):
        check_finite(delta, "aligned: merged delta")
    return AlignedState(delta, state.count + 1)


@jax.jit
def _apply_leaf(b: jax.Array, d: jax.Array) -> jax.Array:
    return (f32(b) + d).astype(b.dtype)


def result(base: PyTree, state: AlignedState) -> PyTree:
    """The global merged model ``theta0 + tau_bar``.

    Args:
        base: theta0.
        state: a state after at least one ``update``.

    Returns:
        theta_bar_t in each base leaf's dtype.
    """
    if not isinstance(state.count, jax.core.Tracer) and int(state.count) == 0:
        raise ValueError("aligned: no task merged yet: call update() first")
    check_like(base, state.delta, names=["aligned state"])
    return jax.tree.map(_apply_leaf, base, state.delta)


def merge_step(
    base: PyTree, state: AlignedState, finetuned: PyTree, *, weight: float | jax.Array = 0.0
) -> tuple[PyTree, AlignedState]:
    """One runner step: average ``finetuned - base`` into the global delta.

    Args:
        base: theta0.
        state: the state after task t-1 (``init(base)`` before task 1).
        finetuned: theta_t.
        weight: see ``update``.

    Returns:
        ``(theta_bar_t, new_state)``.
    """
    check_like(base, finetuned, names=["finetuned"])
    tau = jax.tree.map(lambda f, b: f32(f) - f32(b), finetuned, base)
    new = update(state, tau, weight=weight)
    return result(base, new), new
