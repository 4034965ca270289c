"""Losses over logits restricted to a class mask: one copy, used by every part.

Class-incremental training restricts softmaxes to a subset of the stream's classes (the
current task's in fine-tuning, the old ones in LwF and TRM's consistency term, the seen
ones in evaluation-like objectives). Masked-out logits are set to ``BIG_NEG`` rather than
``-inf``: ``exp`` of it is exactly 0 in float32, and every value and gradient stays finite,
also when a mask is all False.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trm_jax.tree_util import f32

BIG_NEG = -1e9


def mask_logits(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``logits`` (at least float32) with the classes outside ``mask`` [C] set to
    ``BIG_NEG``: softmaxes over the result range over the masked classes only."""
    logits = f32(logits)
    return logits if mask is None else jnp.where(mask, logits, BIG_NEG)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, smoothing: float = 0.0
) -> jax.Array:
    """Mean softmax cross-entropy of ``labels`` over the classes in ``mask`` (all when
    ``None``). With ``smoothing`` the target puts that mass uniformly over the mask."""
    z = mask_logits(logits, mask)
    logp = jax.nn.log_softmax(z, axis=-1)
    if not smoothing:
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
    keep = jnp.ones(z.shape[-1], bool) if mask is None else mask
    n = jnp.maximum(keep.sum(), 1)
    target = (1 - smoothing) * jax.nn.one_hot(labels, z.shape[-1]) + smoothing * keep[None] / n
    return -(jnp.where(keep[None], target * logp, 0.0)).sum(-1).mean()


def tempered_kl(
    teacher: jax.Array, student: jax.Array, temperature, mask: jax.Array | None = None
) -> jax.Array:
    """``tau^2 * KL(softmax(teacher/tau) || softmax(student/tau))`` over the classes in
    ``mask`` (all when ``None``), mean over the batch; 0 for an all-False mask.

    The tau^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et
    al.); LwF's distillation and TRM's alignment and consistency terms are this function.
    """
    t = jax.nn.log_softmax(mask_logits(teacher, mask) / temperature, axis=-1)
    s = jax.nn.log_softmax(mask_logits(student, mask) / temperature, axis=-1)
    kl = jnp.exp(t) * (t - s)
    if mask is not None:
        kl = jnp.where(mask, kl, 0.0)
    return temperature**2 * jnp.mean(jnp.sum(kl, axis=-1))
