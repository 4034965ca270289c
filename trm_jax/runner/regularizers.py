"""Regularisation baselines for continual learning, as loss terms of the train step.

- LwF (Li & Hoiem, 2016): distil the previous model's predictions on the old classes
  into the current model, on the current task's images:
  ``L_lwf = T^2 * KL(softmax(z_prev[C_old]/T) || softmax(z[C_old]/T))`` (weight 0.3).
- EWC (Kirkpatrick et al., 2017): a quadratic pull toward the previous task's
  parameters, weighted by the diagonal Fisher information:
  ``L_ewc = 1/2 * sum_i F_i (theta_i - theta*_i)^2`` (weight 1e6; the Fisher here is the
  mean of squared per-batch gradients, accumulated over the tasks seen so far).

The method plug-ins that use them are ``runner/methods/lwf.py`` and ``ewc.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from trm_jax import losses
from trm_jax.tree_util import PyTree


def lwf_loss(
    logits: jax.Array, teacher_logits: jax.Array, old_mask: jax.Array, temperature: float = 2.0
) -> jax.Array:
    """``T^2 * KL(p_teacher || p_student)`` over the classes in ``old_mask`` (mean over
    the batch). Zero when no class is old (the first task)."""
    return losses.tempered_kl(teacher_logits, logits, temperature, old_mask)


def ewc_penalty(params: PyTree, anchor: PyTree, fisher: PyTree) -> jax.Array:
    """``1/2 * sum F * (params - anchor)^2`` over every leaf."""
    terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p - a)), params, anchor, fisher)
    return 0.5 * sum(jax.tree.leaves(terms))


def fisher_diagonal(
    loss_fn: Callable[[PyTree, dict], jax.Array], params: PyTree, batches: Iterable[dict]
) -> PyTree:
    """Empirical diagonal Fisher: mean over ``batches`` of the squared gradient of
    ``loss_fn(params, batch)`` (the batch-mean loss)."""
    grad = jax.jit(jax.grad(loss_fn))
    total, n = None, 0
    for batch in batches:
        g = jax.tree.map(jnp.square, grad(params, batch))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        n += 1
    if total is None:
        return jax.tree.map(jnp.zeros_like, params)
    return jax.tree.map(lambda v: v / n, total)
