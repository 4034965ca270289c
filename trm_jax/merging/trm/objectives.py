"""TRM's objectives: pure functions of the merged model, looked up by name in registries.

Every objective follows the *objective protocol*
``fn(apply_fn, params, logits, batch, targets, ctx) -> scalar``: ``params`` = theta(alpha),
``logits = apply_fn(params, batch['image'])``, ``targets`` = per-batch constants computed once
without gradient, ``ctx`` = a :class:`Context`. The registries (``ALIGN``, ``CONSISTENCY``,
``RESPONSIVENESS``, and ``MEASURES`` for the g behind each responsiveness objective) are the
single dict objects the config validation and the step read: registering a function under a
new name makes it selectable from the config without touching anything else. The terms are
defined in docs/method.md; the variants beyond it say why in their docstrings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.losses import cross_entropy, mask_logits, tempered_kl
from trm_jax.tree_util import PyTree, f32

ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


class Context(NamedTuple):
    """Per-merge constants every objective may read (arrays or trees, passed through jit).

    ``task_mask`` / ``old_mask`` / ``seen_mask`` are boolean ``[C]`` masks over the ``C``
    logits (the current task's classes, the earlier tasks', both). Masks rather than id
    lists keep every shape fixed along the stream, so the jitted step compiles once for all
    tasks. ``probe_head`` is ``[C, P]`` (rows of unseen classes zero) or ``None`` (use the
    seen-class logits directly); ``previous`` / ``expert`` are the parameter trees of
    theta_prev and theta_t (references, no copies) for parameter-space objectives.
    """

    task_mask: jax.Array
    old_mask: jax.Array
    seen_mask: jax.Array
    temperature: jax.Array
    probe_head: jax.Array | None
    previous: PyTree
    expert: PyTree


def align_distill(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """L_TA = tau^2 KL(softmax(z_E[C_t]/tau) || softmax(z_alpha[C_t]/tau)): match the expert
    on the current task's classes (the reference formulation)."""
    return tempered_kl(targets["expert_logits"], logits, ctx.temperature, ctx.task_mask)


def align_distill_seen(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: the same KL over every class seen so far (old + current).

    Task-agnostic evaluation takes the argmax over all seen classes, so whether current-task
    inputs stay *away* from old classes matters as much as the ranking inside ``C_t``; the
    expert's full seen-class distribution carries that, the ``C_t`` slice does not.
    """
    return tempered_kl(targets["expert_logits"], logits, ctx.temperature, ctx.seen_mask)


def align_ce(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: cross-entropy of the labels over the current task's classes."""
    return cross_entropy(logits, batch["label"], ctx.task_mask)


def align_ce_seen(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: cross-entropy of the labels over every class seen so far.

    The only term that asks current-task inputs to score below the old classes' rows (the
    task-agnostic argmax), from the current task's labels alone."""
    return cross_entropy(logits, batch["label"], ctx.seen_mask)


def align_param(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: mean over leaves of ``1 - cos(theta(alpha) - theta_prev, theta_t - theta_prev)``
    (data-free; a leaf where either displacement is zero contributes 1)."""
    costs = []
    trees = (jax.tree.leaves(t) for t in (params, ctx.previous, ctx.expert))
    for p, q, e in zip(*trees, strict=True):
        a = (p - q).astype(jnp.promote_types(p.dtype, jnp.float32)).ravel()
        b = (e - q).astype(a.dtype).ravel()
        cos = jnp.dot(a, b) / jnp.sqrt(jnp.dot(a, a) * jnp.dot(b, b) + 1e-30)
        costs.append(1.0 - cos)
    return jnp.mean(jnp.stack(costs))


def consistency_kl(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """L_PC = tau^2 KL(softmax(z_P[C_<t]/tau) || softmax(z_alpha[C_<t]/tau)) on current data:
    keep the previous merged model's old-class behaviour. Zero when there are no old classes."""
    return tempered_kl(targets["previous_logits"], logits, ctx.temperature, ctx.old_mask)


def consistency_mse(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: mean squared difference of the raw old-class logits (keeps their scale, which
    a KL, being shift-invariant, does not). Zero when there are no old classes."""
    diff = f32(logits) - f32(targets["previous_logits"])
    total = jnp.sum(jnp.where(ctx.old_mask, jnp.square(diff), 0.0))
    return total / jnp.maximum(1, logits.shape[0] * jnp.sum(ctx.old_mask))


def mix_images(images: jax.Array) -> jax.Array:
    """Mixups of a batch: each image averaged with the next one (the last with the first),
    in the images' dtype. Deterministic, so the mixed inputs are the same every step."""
    mixed = 0.5 * (f32(images) + f32(jnp.roll(images, -1, axis=0)))
    return mixed.astype(images.dtype) if jnp.issubdtype(images.dtype, jnp.floating) else mixed


def consistency_kl_mix(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: the mean of :func:`consistency_kl` on the batch and the same KL on mixups of
    its images (:func:`mix_images`), the previous model's logits on those computed here
    without gradient.

    Current-task images are one small region of input space; mixing two of them gives
    inputs off that region, where theta_prev's old-class behaviour is probed from current
    data alone (no old data, nothing stored). Costs two more forward passes per step.
    """
    clean = tempered_kl(targets["previous_logits"], logits, ctx.temperature, ctx.old_mask)
    mixed = mix_images(batch["image"])
    teacher = jax.lax.stop_gradient(apply_fn(ctx.previous, mixed))
    student = apply_fn(params, mixed)
    return 0.5 * (clean + tempered_kl(teacher, student, ctx.temperature, ctx.old_mask))


def _sq_norm(tree: PyTree) -> jax.Array:
    """Squared L2 norm over every leaf, accumulated in at least float32 (bf16 models)."""
    leaves = jax.tree.leaves(tree)
    return sum(jnp.sum(jnp.square(f32(x))) for x in leaves)


def _zero_cotangent(x: jax.Array) -> jax.Array:
    """A zero cotangent for a non-optimised input; ``float0`` for integer leaves (labels),
    the only cotangent dtype JAX accepts for them."""
    if jnp.issubdtype(jnp.result_type(x), jnp.integer):
        return np.zeros(jnp.shape(x), jax.dtypes.float0)
    return jnp.zeros_like(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def grad_sq_norm(loss_fn: Callable, params: PyTree, data: PyTree) -> jax.Array:
    """``||grad_params loss_fn(params, data)||^2``, differentiable in ``params``.

    Its derivative, ``2 H g`` (``H`` the Hessian of the loss, ``g`` its gradient), is computed
    as a Hessian-vector product, forward-over-reverse (``jax.jvp`` of ``jax.grad``): the same
    value plain reverse-over-reverse autodiff gives, about 1.8x faster on a small ViT on CPU
    with the same memory. ``data`` gets a zero cotangent (it is not optimised).
    """
    return _sq_norm(jax.grad(loss_fn)(params, data))


def _grad_sq_norm_fwd(loss_fn, params, data):
    """The value, keeping the gradient as a residual: the backward's tangent is that gradient."""
    grads = jax.grad(loss_fn)(params, data)
    return _sq_norm(grads), (params, data, grads)


def _grad_sq_norm_bwd(loss_fn, residuals, cotangent):
    """``2 * cotangent * H g`` by one forward-over-reverse HVP; zeros for ``data``."""
    params, data, grads = residuals
    _, hvp = jax.jvp(lambda p: jax.grad(loss_fn)(p, data), (params,), (grads,))
    scale = 2 * cotangent
    return (
        jax.tree.map(lambda h: (scale * h).astype(h.dtype), hvp),
        jax.tree.map(_zero_cotangent, data),
    )


grad_sq_norm.defvjp(_grad_sq_norm_fwd, _grad_sq_norm_bwd)


def _probe_loss(apply_fn, params, data) -> jax.Array:
    """Cross-entropy of the probe head on the seen-class logits against the probe labels
    (without a head: of the seen-class softmax against labels that are seen class ids)."""
    images, labels, seen, head = data
    logits = apply_fn(params, images)
    if head is None:
        return cross_entropy(logits, labels, seen)
    return cross_entropy(jnp.where(seen, f32(logits), 0.0) @ head, labels)


def g_probe_relative(apply_fn, params, batch, targets, ctx) -> jax.Array:
    """Variant: :func:`g_probe` divided by the probe loss at ``params``.

    The squared gradient norm of a cross-entropy grows with the loss itself, so a point that
    fits its data worse looks more "responsive". Per unit of loss, g measures how steep the
    loss is for its height: the next task's learning speed rather than its starting loss
    (docs/diagnosis.md: the onset norm tracks the starting loss).
    """
    labels = targets["probe_labels"]
    images = batch["image"][: labels.shape[0]]
    data = (images, labels, ctx.seen_mask, ctx.probe_head)
    loss_fn = functools.partial(_probe_loss, apply_fn)
    return grad_sq_norm(loss_fn, params, data) / jnp.maximum(loss_fn(params, data), 1e-12)


def _seen_nll(apply_fn, params, data) -> jax.Array:
    """Mean negative log-likelihood of ``labels`` under the seen-class softmax."""
    images, labels, seen = data
    return cross_entropy(apply_fn(params, images), labels, seen)


def g_probe(apply_fn, params, batch, targets, ctx) -> jax.Array:
    """g(theta) = ||grad_theta l_probe(theta; x)||^2, l_probe = cross-entropy of a fixed random
    probe head on the seen-class logits against fixed random labels: how strongly a fresh
    objective (a stand-in for the next task) would move these parameters."""
    labels = targets["probe_labels"]
    images = batch["image"][: labels.shape[0]]
    data = (images, labels, ctx.seen_mask, ctx.probe_head)
    return grad_sq_norm(functools.partial(_probe_loss, apply_fn), params, data)


def g_fisher(apply_fn, params, batch, targets, ctx) -> jax.Array:
    """Variant: trace of the Fisher over the seen classes, labels sampled from the model.

    Estimated as ``n * ||grad mean_i log p(y_i | x_i)||^2`` with ``y_i ~ p(. | x_i)``: the
    score has zero mean under the model's own labels, so cross terms vanish in expectation and
    this is unbiased for ``tr F`` without per-example gradients. The sampled labels are held
    fixed under differentiation.
    """
    n = targets["probe_labels"].shape[0]
    images = batch["image"][:n]
    seen_logits = mask_logits(apply_fn(params, images), ctx.seen_mask)
    sampled = jax.random.categorical(
        jax.random.fold_in(targets["key"], 1), jax.lax.stop_gradient(seen_logits), axis=-1
    )
    data = (images, sampled, ctx.seen_mask)
    return n * grad_sq_norm(functools.partial(_seen_nll, apply_fn), params, data)


def _log(x: jax.Array) -> jax.Array:
    """``log(x + tiny)``: finite at g = 0, so the hinge and its gradient stay finite."""
    return jnp.log(x + jnp.finfo(x.dtype).tiny)


def responsiveness_probe(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """L_GR = softplus(log g_ref - log g(theta(alpha))) with g = :func:`g_probe`: a soft hinge
    on the log ratio, log 2 at g = g_ref, decaying towards 0 as g exceeds the reference and
    growing linearly in log(g_ref / g) below it (its gradient is a grad of a grad norm)."""
    g = g_probe(apply_fn, params, batch, targets, ctx)
    return jax.nn.softplus(_log(targets["g_ref"]) - _log(g))


def responsiveness_fisher(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: L_GR with g = :func:`g_fisher` (trace of the model's own Fisher)."""
    g = g_fisher(apply_fn, params, batch, targets, ctx)
    return jax.nn.softplus(_log(targets["g_ref"]) - _log(g))


def responsiveness_probe_relative(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: L_GR with g = :func:`g_probe_relative` (probe gradient norm per unit of loss)."""
    g = g_probe_relative(apply_fn, params, batch, targets, ctx)
    return jax.nn.softplus(_log(targets["g_ref"]) - _log(g))


def reg_l2(
    alpha: jax.Array,
    alpha_init: jax.Array,
    params: PyTree = None,
    anchor: PyTree = None,
    ctx: Context | None = None,
) -> jax.Array:
    """||alpha - alpha_init||^2 over every coefficient: stay near the rule-based start
    (the reference formulation). The other arguments are the ``REG`` protocol's, unused."""
    del params, anchor, ctx
    return jnp.sum(jnp.square(alpha - alpha_init))


def reg_theta(
    alpha: jax.Array, alpha_init: jax.Array, params: PyTree, anchor: PyTree, ctx: Context
) -> jax.Array:
    """Variant: ||theta(alpha) - theta_init||^2 / ||theta_t - theta_prev||^2, a leash on the
    parameters rather than on the coefficients.

    The directions' norms differ widely across leaves and kinds, so a unit of alpha moves
    theta by very different amounts and an L2 term on alpha does not bound how far the
    merge moves the model (docs/diagnosis.md, finding 5). This measures the move itself,
    relative to the task's own displacement (scale-free, so one weight serves any model);
    ``anchor`` = theta(alpha_init). Exact for any coefficient layout, one pass over the
    parameters per step.
    """
    del alpha, alpha_init

    def sq(a: PyTree, b: PyTree) -> jax.Array:
        return sum(jnp.sum(jnp.square(f32(x) - f32(y))) for x, y in zip(a, b, strict=True))

    move = sq(jax.tree.leaves(params), jax.tree.leaves(anchor))
    scale = sq(jax.tree.leaves(ctx.expert), jax.tree.leaves(ctx.previous))
    return move / jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)


# Every regulariser takes (alpha, alpha_init, params, anchor, ctx): params = theta(alpha).
REG: dict[str, Callable] = {"l2": reg_l2, "theta": reg_theta}
ALIGN: dict[str, Callable] = {
    "distill": align_distill,
    "distill_seen": align_distill_seen,
    "ce": align_ce,
    "ce_seen": align_ce_seen,
    "param": align_param,
}
CONSISTENCY: dict[str, Callable] = {
    "kl": consistency_kl,
    "mse": consistency_mse,
    "kl_mix": consistency_kl_mix,
}
RESPONSIVENESS: dict[str, Callable] = {
    "probe": responsiveness_probe,
    "fisher": responsiveness_fisher,
    "probe_relative": responsiveness_probe_relative,
}
# The g measure behind each responsiveness objective: gives g_ref, g_init and g_final.
MEASURES: dict[str, Callable] = {
    "probe": g_probe,
    "fisher": g_fisher,
    "probe_relative": g_probe_relative,
}
