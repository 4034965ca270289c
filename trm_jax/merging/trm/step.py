"""The jitted pieces of a TRM merge: one Adam step on the coefficients, and the per-batch
constants it reads.

:func:`train_step` is a module-level jitted function whose static part (:class:`Spec`: the
model function, the active objectives, the coefficient layout) is hashable and whose traced
part (:class:`Hyper`, the :class:`State`, the batch, the :class:`Context`) has fixed shapes
along a stream, so one compile serves every merge of a stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from trm_jax.merging.trm.config import TERMS
from trm_jax.merging.trm.objectives import ApplyFn, Context
from trm_jax.merging.trm.subspace import Layout, Subspace, combine
from trm_jax.tree_util import PyTree


class Spec(NamedTuple):
    """Static part of a merge (hashable): the model, the active objectives, the layout.

    An objective is ``None`` when its weight is 0 (not computed, recorded as 0, kept out of
    the total so an unused term can never turn it into NaN). ``responsiveness_every`` = N:
    the responsiveness term is recomputed on steps 0, N, 2N, ... (see :func:`train_step`).
    """

    apply_fn: ApplyFn
    align: Callable | None
    consistency: Callable | None
    responsiveness: Callable | None
    reg: Callable | None
    layout: Layout
    responsiveness_every: int = 1

    @property
    def active(self) -> tuple[str, ...]:
        """The terms with a non-zero weight (those computed), in :data:`TERMS` order."""
        return tuple(name for name in TERMS if getattr(self, name) is not None)


class Hyper(NamedTuple):
    """Traced hyperparameters (changing them does not retrace)."""

    learning_rate: jax.Array
    weights: dict[str, jax.Array]


class State(NamedTuple):
    """Optimisation state: the coefficients ``[G, J]``, Adam's moments, the step count and
    the last computed responsiveness term (unweighted value and its gradient in ``alpha``),
    reused between recomputations when ``responsiveness_every > 1``."""

    alpha: jax.Array
    opt_state: optax.OptState
    step: jax.Array
    responsiveness: jax.Array
    responsiveness_grad: jax.Array


# Adam's preconditioner; the learning rate is applied in the step so it can be traced.
_ADAM = optax.scale_by_adam()


@jax.jit
def init_state(subspace: Subspace) -> State:
    """Adam state at ``alpha_init``.

    Jitted, so every leaf is placed like ``alpha_init`` (replicated over the parameters'
    mesh, see :func:`build_subspace`), where :func:`train_step` returns the state: the step
    compiles once on sharded inputs too, not once for a single-device state and again when
    the state has moved to the mesh.
    """
    alpha = subspace.alpha_init
    zero = jnp.zeros((), alpha.dtype)
    return State(alpha, _ADAM.init(alpha), jnp.zeros((), jnp.int32), zero, jnp.zeros_like(alpha))


def loss_terms(
    alpha: jax.Array,
    subspace: Subspace,
    batch: dict,
    targets: dict,
    ctx: Context,
    hyper: Hyper,
    *,
    spec: Spec,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss at ``alpha`` and each term (unweighted). Pure; differentiate it in ``alpha``."""
    params = combine(subspace, alpha, spec.layout)
    logits = spec.apply_fn(params, batch["image"])
    terms = {}
    for name in ("align", "consistency", "responsiveness"):
        fn = getattr(spec, name)
        if fn is None:
            terms[name] = jnp.zeros((), alpha.dtype)
        else:
            terms[name] = fn(spec.apply_fn, params, logits, batch, targets, ctx).astype(alpha.dtype)
    if spec.reg is None:
        terms["reg"] = jnp.zeros((), alpha.dtype)
    else:
        reg = spec.reg(alpha, subspace.alpha_init, params, subspace.anchor, ctx)
        terms["reg"] = reg.astype(alpha.dtype)
    loss = sum(
        (hyper.weights[name].astype(alpha.dtype) * terms[name] for name in spec.active),
        jnp.zeros((), alpha.dtype),
    )
    return loss, terms


def responsiveness_term(
    alpha: jax.Array,
    subspace: Subspace,
    batch: dict,
    targets: dict,
    ctx: Context,
    *,
    spec: Spec,
) -> jax.Array:
    """The (unweighted) responsiveness objective at ``alpha``; differentiable in ``alpha``.

    ``logits`` are passed per the objective protocol; the built-in objectives do not read
    them, so under ``jit`` that forward pass is dead code and is removed.
    """
    params = combine(subspace, alpha, spec.layout)
    logits = spec.apply_fn(params, batch["image"])
    value = spec.responsiveness(spec.apply_fn, params, logits, batch, targets, ctx)
    return value.astype(alpha.dtype)


@functools.partial(jax.jit, static_argnames=("spec",))
def train_step(
    state: State,
    subspace: Subspace,
    batch: dict,
    targets: dict,
    ctx: Context,
    hyper: Hyper,
    *,
    spec: Spec,
) -> tuple[State, dict[str, jax.Array]]:
    """One Adam step on the coefficients; returns the new state and the loss terms at the
    *old* coefficients (``loss`` plus each term).

    The first-order terms are differentiated every step. The second-order responsiveness
    term is differentiated on its own: on every step when ``spec.responsiveness_every`` is
    1, else on steps 0, N, 2N, ... (a ``lax.cond``, so the step still traces once) with the
    last value and gradient reused in between; the recorded ``responsiveness`` is the value
    that step used.
    """
    first_order = functools.partial(loss_terms, spec=spec._replace(responsiveness=None))
    (loss, terms), grad = jax.value_and_grad(first_order, has_aux=True)(
        state.alpha, subspace, batch, targets, ctx, hyper
    )
    value, value_grad = state.responsiveness, state.responsiveness_grad
    if spec.responsiveness is not None:
        fresh = functools.partial(
            jax.value_and_grad(functools.partial(responsiveness_term, spec=spec)),
            state.alpha,
            subspace,
            batch,
            targets,
            ctx,
        )
        if spec.responsiveness_every == 1:
            value, value_grad = fresh()
        else:
            value, value_grad = jax.lax.cond(
                state.step % spec.responsiveness_every == 0,
                fresh,
                lambda: (state.responsiveness, state.responsiveness_grad),
            )
        weight = hyper.weights["responsiveness"].astype(value.dtype)
        loss = loss + weight * value
        grad = grad + weight * value_grad
        terms = {**terms, "responsiveness": value}
    updates, opt_state = _ADAM.update(grad, state.opt_state, state.alpha)
    alpha = state.alpha - hyper.learning_rate.astype(updates.dtype) * updates
    new_state = State(alpha, opt_state, state.step + 1, value, value_grad)
    return new_state, {"loss": loss, **terms}


# loss_terms under jit: the total and each term at given coefficients, no update.
evaluate = jax.jit(loss_terms, static_argnames=("spec",))


# The optional per-batch targets and the term that reads each (computed only when active).
TARGETS = {"expert_logits": "align", "previous_logits": "consistency", "g_ref": "responsiveness"}


@functools.partial(jax.jit, static_argnames=("apply_fn", "measure", "probe_size", "needs"))
def compute_targets(
    reference: PyTree,
    batch: dict,
    ctx: Context,
    key: jax.Array,
    probe_key: jax.Array,
    *,
    apply_fn: ApplyFn,
    measure: Callable,
    probe_size: int,
    needs: tuple[str, ...] = tuple(TARGETS),
) -> dict[str, jax.Array]:
    """Per-batch constants, computed once and without gradient: the probe labels, the batch
    key and those of ``needs`` (a subset of :data:`TARGETS`): the expert's and the previous
    model's logits, and g at the reference model (a gradient norm: the costly one).

    ``'g_ref_later'`` in ``needs`` puts a NaN placeholder in ``g_ref`` instead (same shape and
    placement), for :func:`merge` to fill with :func:`measure_g` on the batches whose
    responsiveness is actually recomputed."""
    images = batch["image"]
    if ctx.probe_head is None:  # random seen class ids: positions into the seen ids, listed first
        seen_first = jnp.argsort(~ctx.seen_mask, stable=True)
        positions = jax.random.randint(probe_key, (probe_size,), 0, jnp.sum(ctx.seen_mask))
        probe_labels = seen_first[positions].astype(jnp.int32)
    else:
        probe_labels = jax.random.randint(probe_key, (probe_size,), 0, ctx.probe_head.shape[1])
    targets = {"probe_labels": probe_labels, "key": key}
    if "expert_logits" in needs:
        targets["expert_logits"] = apply_fn(ctx.expert, images)
    if "previous_logits" in needs:
        targets["previous_logits"] = apply_fn(ctx.previous, images)
    if "g_ref" in needs:
        targets["g_ref"] = measure(apply_fn, reference, batch, targets, ctx)
    elif "g_ref_later" in needs:
        targets["g_ref"] = jnp.full((), jnp.nan, ctx.temperature.dtype)
    return targets


@functools.partial(jax.jit, static_argnames=("apply_fn", "measure"))
def measure_g(params, batch, targets, ctx, *, apply_fn, measure) -> jax.Array:
    """g(params) on one batch with that batch's probe labels and key."""
    return measure(apply_fn, params, batch, targets, ctx)
