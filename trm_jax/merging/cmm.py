"""CMM: a holistic continual model merge in three switchable stages (Phan et al. 2025).

"Toward a Holistic Approach to Continual Model Merging" (arXiv 2509.23592). Written from
``finetune_splitted_linear.py`` (``interpolate_weights`` and the representation loop) and
``src/linearize.py`` of VietHoang1512/CMM (commit 5d36668, a fork of danielm1405/magmax);
``docs/baselines.md`` lists the differences.

(a) **Tangent-space fine-tuning** (pre-merging). Task t is fine-tuned in the linearisation
    of the network around the pre-trained theta0,
    ``f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0) (theta - theta0)``, starting from
    theta_bar_{t-1} (sequential fine-tuning); ``linearize`` / ``linearized_apply`` give this
    model as a pure function (one ``jax.jvp``).
(b) **Fisher-weighted merge** (during merging). The diagonal Fisher is read for free from
    Adam's second moments at the end of task t (``nu_t``, torch's ``exp_avg_sq``: the raw EMA
    of squared gradients, no bias correction, no normalisation, no epsilon). With the kept
    Fisher ``F_{t-1}`` of theta_bar_{t-1} and ``alpha`` (0.4 in the authors' scripts),

        theta_bar_t = ((1-alpha) F_{t-1} theta_bar_{t-1} + alpha nu_t theta_t)
                      / ((1-alpha) F_{t-1} + alpha nu_t)
        F_t         = (1-alpha) F_{t-1} + alpha nu_t

    element-wise; ``F_t`` is what is kept across tasks. Task 1: theta_bar_1 = theta_1,
    F_1 = nu_1. Computed as ``theta_bar_{t-1} + w (theta_t - theta_bar_{t-1})`` with
    ``w = alpha nu_t / den``, the same number, exact when the models agree; where ``den`` is
    0 the merge is the plain ``(1-alpha) theta_bar_{t-1} + alpha theta_t`` (the authors' code
    does that for parameters without optimiser state and divides 0/0 otherwise).
(c) **Representation correction** (post-merging). For one pass over task t's training
    batches, AdamW (lr 1e-7 in the scripts, torch's default weight decay 0.01, gradients
    clipped to global norm 1) moves only the image encoder's output projection
    (``visual_projection/kernel``, the ``[768, 512]`` matrix the authors select) of the merged
    model so that its image features on task t's images match those of the *previous* merged
    model theta_bar_{t-1} (L2 = mean squared error in the scripts, L1 the argparse default).
    ``representation_loss`` is the loss, ``representation_step`` one jitted step.

Each stage is switched by ``default_config()``'s ``linearize``, ``fisher_merge`` and
``representation``; with ``fisher_merge`` off the merge is the plain interpolation.

Runner integration: needs theta0 (the linearisation point, stage (a)); after task t,
theta_bar_{t-1} (its start point), theta_t and Adam's ``nu_t`` from a fresh optimiser per task
(``adam_nu`` finds it in an optax state; stage (b)); task t's image batches and a
``features_fn(params, images) -> image features`` (before the class head; stage (c)). No
snapshots. Keeps between tasks one float32 parameter-sized tree (the merged Fisher ``F_t``)
and a task counter; stage (a) also keeps theta0. ``merge_task`` runs stages (b) and (c) for
one task as the config switches them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from trm_jax.errors import ConfigError
from trm_jax.merging.task_vectors import check_finite, check_like
from trm_jax.tree_util import PyTree, f32, is_traced, leaf_names

REPRESENTATION_LOSSES = ("l1", "l2")


def default_config() -> ml_collections.ConfigDict:
    """CMM's hyper-parameters with the authors' defaults (``scripts/CIL/all.sh``, ``src/args.py``).

    * ``linearize`` (True), ``fisher_merge`` (True), ``representation`` (True): stages (a)-(c).
    * ``alpha`` (0.4): weight of the new model (``--alpha_merge``; the scripts sweep .3-.6).
    * ``fisher_damping`` (0.0): added to both Fishers in the merge weights only; 0 is the
      authors' formula (not in their code; a knob for tiny second moments).
    * ``representation_loss`` (``'l2'``, the scripts; the argparse default is ``'l1'``).
    * ``representation_lr`` (1e-7, the scripts; the argparse default is 2e-8).
    * ``representation_weight_decay`` (0.01, torch ``AdamW``'s default, which they keep).
    * ``representation_clip_norm`` (1.0): global-norm clip of the trainable gradients.
    * ``representation_trainable`` (``'visual_projection/kernel$'``): regex of the leaves
      stage (c) moves (the ``[768, 512]`` projection the authors pick by shape).
    * ``representation_steps`` (0): steps of stage (c); 0 = one pass over the batches given.

    Their fine-tuning settings (not merge hyper-parameters): AdamW lr 1e-5, weight decay
    0.1, batch 128, 10 epochs (ImageNet-R; 30 for CUB/Cars), cosine schedule with 500 warm-up
    steps, gradient clipping at 1.0, a frozen zero-shot head.
    """
    config = ml_collections.ConfigDict()
    config.linearize = True
    config.fisher_merge = True
    config.alpha = 0.4
    config.fisher_damping = 0.0
    config.representation = True
    config.representation_loss = "l2"
    config.representation_lr = 1e-7
    config.representation_weight_decay = 0.01
    config.representation_clip_norm = 1.0
    config.representation_trainable = r"visual_projection/kernel$"
    config.representation_steps = 0
    return config


# ---------------------------------------------------------------- (a) linearisation


def linearized_apply(apply_fn: Callable, params0: PyTree, params: PyTree, *args, **kwargs):
    """``f(x; params0) + J f(x; params0) (params - params0)``: the first-order Taylor model.

    Pure and jit-able with ``params0`` an ordinary (traced) argument, which is how to use it
    inside a jitted train step (closing over ``params0`` there would bake it in as a
    constant). One ``jax.jvp`` of ``apply_fn`` at ``params0``.

    Args:
        apply_fn: ``apply_fn(params, *args, **kwargs) -> pytree of arrays``.
        params0: the linearisation point theta0.
        params: where the linear model is evaluated.
        *args: model inputs, passed to ``apply_fn``.
        **kwargs: passed to ``apply_fn``.

    Returns:
        The linear model's output, structured like ``apply_fn``'s.
    """
    check_like(params0, params, names=["params"])
    tangent = jax.tree.map(lambda p, p0: (p - p0).astype(jnp.result_type(p0)), params, params0)
    out, dout = jax.jvp(lambda p: apply_fn(p, *args, **kwargs), (params0,), (tangent,))
    return jax.tree.map(jnp.add, out, dout)


def linearize(apply_fn: Callable, params0: PyTree) -> Callable:
    """``apply_lin(params, *args) = f(x; params0) + J(params0) (params - params0)``.

    Args:
        apply_fn: the network, ``apply_fn(params, *args, **kwargs)``.
        params0: the linearisation point (theta0).

    Returns:
        ``apply_lin`` with ``apply_fn``'s signature; ``apply_lin(params0, x) == apply_fn(
        params0, x)``. Under an outer ``jit`` prefer ``linearized_apply`` (see its note).
    """
    return functools.partial(linearized_apply, apply_fn, params0)


# --------------------------------------------------------------- (b) Fisher merge


class CMMState(NamedTuple):
    """The merged diagonal Fisher ``F_t`` (float32, shaped like the parameters) and how many
    tasks have been merged."""

    fisher: PyTree
    count: jax.Array


def init(like: PyTree) -> CMMState:
    """Empty state (no task merged).

    Args:
        like: a tree shaped like the parameters.

    Returns:
        ``CMMState`` with a zero float32 Fisher and count 0.
    """
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), like)
    return CMMState(zeros, jnp.zeros((), jnp.int32))


def adam_nu(opt_state: Any) -> PyTree:
    """The second moments ``nu`` of the single ``optax.ScaleByAdamState`` in ``opt_state``.

    Walks tuples (``optax.chain``, ``inject_hyperparams``, ``masked``), lists and dicts
    (``multi_transform``). optax's ``nu`` is torch's ``exp_avg_sq``: the un-corrected EMA of
    squared gradients, what the authors read.

    Args:
        opt_state: an optax optimiser state.

    Returns:
        The ``nu`` tree (shaped like the parameters). ``ConfigError`` when the state holds no
        Adam state or more than one.
    """
    found: list[PyTree] = []

    def visit(x):
        if isinstance(x, optax.ScaleByAdamState):
            found.append(x.nu)
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(opt_state)
    if len(found) != 1:
        raise ConfigError(
            f"cmm: the optimiser state holds {len(found)} Adam states; the Fisher merge "
            "needs exactly one (train with optax.adam/adamw or scale_by_adam)"
        )
    return found[0]


@jax.jit
def _fisher_leaf(t0, t1, f0, f1, alpha, damping, first):
    a = alpha
    g0, g1 = f32(f0), f32(f1)
    den = (1.0 - a) * (g0 + damping) + a * (g1 + damping)
    ok = den > 0
    w = jnp.where(ok, a * (g1 + damping) / jnp.where(ok, den, 1.0), a)
    x0, x1 = f32(t0), f32(t1)
    theta = jnp.where(first, x1, x0 + w * (x1 - x0))
    fisher = jnp.where(first, g1, (1.0 - a) * g0 + a * g1)
    return theta.astype(jnp.result_type(t1)), fisher


@jax.jit
def _interp_leaf(t0, t1, alpha, first):
    x0, x1 = f32(t0), f32(t1)
    return jnp.where(first, x1, (1.0 - alpha) * x0 + alpha * x1).astype(jnp.result_type(t1))


def _check_alpha(alpha) -> None:
    if not isinstance(alpha, jax.core.Tracer) and not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"cmm: alpha={float(alpha)} is outside [0, 1]")


def fisher_merge(
    theta_prev: PyTree,
    theta_new: PyTree,
    fisher_prev: PyTree,
    fisher_new: PyTree,
    *,
    alpha: float | jax.Array = 0.4,
    damping: float | jax.Array = 0.0,
) -> tuple[PyTree, PyTree]:
    """CMM's stage (b) for one pair: the Fisher-weighted interpolation and the merged Fisher.

    Args:
        theta_prev: theta_bar_{t-1}.
        theta_new: theta_t.
        fisher_prev: ``F_{t-1}`` (the kept Fisher).
        fisher_new: ``nu_t`` (Adam's second moments at the end of task t).
        alpha: the new model's weight in [0, 1].
        damping: added to both Fishers in the weights (0: the authors' formula).

    Returns:
        ``(theta_bar_t, F_t)``: parameters in ``theta_new``'s dtypes, the Fisher in float32.
    """
    return _fisher_merge(
        theta_prev, theta_new, fisher_prev, fisher_new, alpha, damping, jnp.asarray(False)
    )


def _fisher_merge(theta_prev, theta_new, fisher_prev, fisher_new, alpha, damping, first):
    check_like(
        theta_new,
        theta_prev,
        fisher_prev,
        fisher_new,
        names=["theta_prev", "fisher_prev", "fisher_new (Adam nu)"],
    )
    _check_alpha(alpha)
    a = jnp.asarray(alpha, jnp.float32)
    eps = jnp.asarray(damping, jnp.float32)
    pairs = jax.tree.map(
        lambda t0, t1, f0, f1: _fisher_leaf(t0, t1, f0, f1, a, eps, first),
        theta_prev,
        theta_new,
        fisher_prev,
        fisher_new,
    )
    outer = jax.tree.structure(theta_new)
    merged, fisher = jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
    return merged, fisher


def update(
    state: CMMState,
    theta_prev: PyTree,
    theta_new: PyTree,
    nu: PyTree | None,
    *,
    alpha: float | jax.Array = 0.4,
    damping: float | jax.Array = 0.0,
    use_fisher: bool = True,
) -> tuple[PyTree, CMMState]:
    """Stage (b) in the stream: merge task t and update the kept Fisher.

    Args:
        state: the state after task t-1 (``init`` before task 1).
        theta_prev: theta_bar_{t-1} (ignored at task 1).
        theta_new: theta_t.
        nu: Adam's second moments at the end of task t (``adam_nu``); may be None when
            ``use_fisher`` is False.
        alpha: the new model's weight.
        damping: see ``fisher_merge``.
        use_fisher: False switches stage (b) off: ``(1-alpha) theta_prev + alpha theta_new``.

    Returns:
        ``(theta_bar_t, new_state)``; task 1 returns theta_1 and keeps ``F_1 = nu_1``.
    """
    first = state.count == 0
    if use_fisher:
        if nu is None:
            raise ConfigError("cmm: fisher_merge needs Adam's second moments (nu)")
        merged, fisher = _fisher_merge(
            theta_prev, theta_new, state.fisher, nu, alpha, damping, first
        )
    else:
        check_like(theta_new, theta_prev, names=["theta_prev"])
        _check_alpha(alpha)
        a = jnp.asarray(alpha, jnp.float32)
        merged = jax.tree.map(lambda t0, t1: _interp_leaf(t0, t1, a, first), theta_prev, theta_new)
        fisher = state.fisher
    if not is_traced(merged):
        check_finite(merged, "cmm: merged parameters")
        check_finite(fisher, "cmm: merged Fisher")
    return merged, CMMState(fisher, state.count + 1)


# ------------------------------------------------------ (c) representation correction


def representation_loss(features: jax.Array, target: jax.Array, kind: str = "l2") -> jax.Array:
    """Stage (c)'s feature-alignment loss (float32 scalar).

    Args:
        features: the merged model's features ``[B, D]``.
        target: the previous merged model's features (a constant).
        kind: ``'l2'`` (torch ``MSELoss``) or ``'l1'`` (``L1Loss``), both mean-reduced over
            every element.

    Returns:
        ``mean((features - target)^2)`` or ``mean(|features - target|)``.
    """
    d = f32(features) - f32(target)
    if kind == "l2":
        return jnp.mean(jnp.square(d))
    if kind == "l1":
        return jnp.mean(jnp.abs(d))
    raise ConfigError(f"cmm: representation_loss={kind!r}; choices: {REPRESENTATION_LOSSES}")


def trainable_labels(params: PyTree, pattern: str) -> PyTree:
    """Which leaves stage (c) moves, as ``optax.multi_transform`` labels.

    Args:
        params: the parameter tree.
        pattern: regex (``re.search`` on ``a/b/c`` names) of the trainable leaves.

    Returns:
        A tree of ``'train'`` / ``'freeze'``; ``ConfigError`` when nothing matches.
    """
    names = leaf_names(params)
    labels = ["train" if re.search(pattern, n) else "freeze" for n in names]
    if "train" not in labels:
        raise ConfigError(
            f"cmm: representation_trainable={pattern!r} matches no parameter "
            f"(leaves look like {names[:3]})"
        )
    return jax.tree.unflatten(jax.tree.structure(params), labels)


def representation_optimizer(
    params: PyTree,
    *,
    pattern: str = r"visual_projection/kernel$",
    learning_rate: float = 1e-7,
    weight_decay: float = 0.01,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """Stage (c)'s optimiser, as the authors run it.

    On the matching leaves: global-norm clipping (over those leaves' gradients only) then
    AdamW (b1 .9, b2 .999, eps 1e-8, decoupled weight decay); every other leaf gets a zero
    update. It is a static argument of ``representation_step``: build it once per stream.

    Args:
        params: the parameter tree (for the labels).
        pattern: regex of the trainable leaves.
        learning_rate: AdamW's learning rate.
        weight_decay: AdamW's decoupled weight decay.
        clip_norm: the global-norm clip.

    Returns:
        An ``optax.GradientTransformation``.
    """
    inner = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay),
    )
    return optax.multi_transform(
        {"train": inner, "freeze": optax.set_to_zero()}, trainable_labels(params, pattern)
    )


def _features(features_fn, params, images, params0):
    if params0 is None:
        return features_fn(params, images)
    return linearized_apply(features_fn, params0, params, images)


@functools.partial(jax.jit, static_argnames=("features_fn", "optimizer", "kind"))
def representation_step(
    params: PyTree,
    opt_state: Any,
    target_params: PyTree,
    images: jax.Array,
    params0: PyTree | None = None,
    *,
    features_fn: Callable,
    optimizer: optax.GradientTransformation,
    kind: str = "l2",
) -> tuple[PyTree, Any, jax.Array]:
    """One step of stage (c): fit the merged model's features to ``target_params``' features.

    Args:
        params: the merged model being corrected.
        opt_state: ``optimizer.init(params)`` at the first step.
        target_params: theta_bar_{t-1}, the previous merged model (its features are the
            constant target).
        images: a batch of task t's images.
        params0: theta0 when the models are linearised (stage (a)); both feature maps are
            then ``linearized_apply(features_fn, params0, ., images)``. None: plain.
        features_fn: ``features_fn(params, images) -> [B, D]`` image features (static).
        optimizer: from ``representation_optimizer`` (static).
        kind: ``'l2'`` or ``'l1'`` (static).

    Returns:
        ``(params, opt_state, loss)`` with the loss before the step.
    """
    target = jax.lax.stop_gradient(_features(features_fn, target_params, images, params0))

    def loss(p):
        return representation_loss(_features(features_fn, p, images, params0), target, kind)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def representation_correction(
    features_fn: Callable,
    params: PyTree,
    target_params: PyTree,
    batches: Iterable[dict],
    *,
    config: ml_collections.ConfigDict | None = None,
    params0: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> tuple[PyTree, list[float]]:
    """Run stage (c) over ``batches`` (one pass, or ``representation_steps`` steps).

    Args:
        features_fn: ``features_fn(params, images) -> features`` (hashable, static).
        params: theta_bar_t from stage (b).
        target_params: theta_bar_{t-1}.
        batches: task t's batches (``{'image': ...}``).
        config: ``default_config()``-like; the ``representation_*`` fields are read.
        params0: theta0 when stage (a) is on (linearised feature maps), else None.
        optimizer: a prebuilt ``representation_optimizer`` (built from ``config`` if None).

    Returns:
        ``(corrected_params, losses)``, one loss per step (before that step).
    """
    config = default_config() if config is None else config
    if config.representation_loss not in REPRESENTATION_LOSSES:
        raise ConfigError(
            f"cmm: representation_loss={config.representation_loss!r}; "
            f"choices: {REPRESENTATION_LOSSES}"
        )
    check_like(params, target_params, names=["target_params"])
    if optimizer is None:
        optimizer = representation_optimizer(
            params,
            pattern=config.representation_trainable,
            learning_rate=config.representation_lr,
            weight_decay=config.representation_weight_decay,
            clip_norm=config.representation_clip_norm,
        )
    opt_state = optimizer.init(params)
    losses: list[float] = []
    for step, batch in enumerate(batches):
        if config.representation_steps and step >= config.representation_steps:
            break
        params, opt_state, value = representation_step(
            params,
            opt_state,
            target_params,
            batch["image"],
            params0,
            features_fn=features_fn,
            optimizer=optimizer,
            kind=config.representation_loss,
        )
        losses.append(value)
    losses = [float(v) for v in jax.device_get(losses)]
    if not is_traced(params):
        check_finite(params, "cmm: parameters after representation correction")
    return params, losses


def merge_task(
    state: CMMState,
    theta_prev: PyTree,
    theta_new: PyTree,
    nu: PyTree | None,
    *,
    config: ml_collections.ConfigDict | None = None,
    features_fn: Callable | None = None,
    batches: Iterable[dict] | None = None,
    params0: PyTree | None = None,
) -> tuple[PyTree, CMMState, list[float]]:
    """Stages (b) and (c) after task t, switched by ``config`` as the authors run them.

    Stage (b) is ``update`` (the plain interpolation when ``config.fisher_merge`` is off);
    stage (c), when ``config.representation`` is on, runs from task 2 on (task 1 has no
    previous model), aligning to ``theta_prev``'s features. Stage (a) is the runner's
    fine-tuning through ``linearize``; here it only decides whether the feature maps of
    stage (c) are linearised around ``params0``.

    Args:
        state: the state after task t-1.
        theta_prev: theta_bar_{t-1}.
        theta_new: theta_t.
        nu: Adam's second moments at the end of task t (None if ``fisher_merge`` is off).
        config: ``default_config()``-like.
        features_fn: ``features_fn(params, images) -> features`` (stage (c)).
        batches: task t's batches (stage (c)).
        params0: theta0 (stage (c) with ``linearize`` on).

    Returns:
        ``(theta_bar_t, new_state, representation_losses)``.
    """
    config = default_config() if config is None else config
    first = not isinstance(state.count, jax.core.Tracer) and int(state.count) == 0
    merged, new_state = update(
        state,
        theta_prev,
        theta_new,
        nu,
        alpha=config.alpha,
        damping=config.fisher_damping,
        use_fisher=config.fisher_merge,
    )
    losses: list[float] = []
    if config.representation and not first:
        if features_fn is None or batches is None:
            raise ConfigError("cmm: representation correction needs features_fn and batches")
        if config.linearize and params0 is None:
            raise ConfigError("cmm: linearize=True needs params0 (theta0) for stage (c)")
        merged, losses = representation_correction(
            features_fn,
            merged,
            theta_prev,
            batches,
            config=config,
            params0=params0 if config.linearize else None,
        )
    return merged, new_state, losses
