"""Regularisation baselines for continual learning, as loss terms of the train step.

- LwF (Li & Hoiem, 2016): distil the previous model's predictions on the old classes
  into the current model, on the current task's images:
  ``L_lwf = T^2 * KL(softmax(z_prev[C_old]/T) || softmax(z[C_old]/T))`` (weight 0.3).
- EWC (Kirkpatrick et al., 2017): a quadratic pull toward the previous task's
  parameters, weighted by the diagonal Fisher information:
  ``L_ewc = 1/2 * sum_i F_i (theta_i - theta*_i)^2`` (weight 1e6; the Fisher here is the
  mean of squared per-batch gradients, accumulated over the tasks seen so far).

The methods ``seq_ft``, ``joint`` and ``zeroshot`` need no loss term; ``continual.py``
implements them (``METHODS`` below lists every non-merge method it knows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

# Non-merge methods of the runner: name -> one-line description (the merge rules come
# from ``merging.MERGERS`` plus ``trm``).
METHODS = {
    "seq_ft": "sequential fine-tuning, no merge (theta_bar_t = theta_t)",
    "lwf": "sequential fine-tuning + LwF distillation on old-class logits",
    "ewc": "sequential fine-tuning + EWC diagonal-Fisher penalty",
    "joint": "upper bound: after task t, fine-tune theta_0 on the data of tasks 1..t at once",
    "zeroshot": "theta_0 with the frozen head, no fine-tuning",
}


def lwf_loss(
    logits: jax.Array, teacher_logits: jax.Array, old_mask: jax.Array, temperature: float = 2.0
) -> jax.Array:
    """``T^2 * KL(p_teacher || p_student)`` over the classes in ``old_mask`` (mean over
    the batch). Zero when no class is old (the first task)."""
    big_neg = -1e9
    zt = jnp.where(old_mask[None], teacher_logits / temperature, big_neg)
    zs = jnp.where(old_mask[None], logits / temperature, big_neg)
    pt = jax.nn.softmax(zt)
    kl = jnp.where(old_mask[None], pt * (jax.nn.log_softmax(zt) - jax.nn.log_softmax(zs)), 0.0)
    kl = kl.sum(-1).mean()
    return jnp.where(old_mask.any(), temperature**2 * kl, 0.0)


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
