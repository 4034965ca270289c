"""TRM: Trajectory Regularized Merging, as an optimisation over a small coefficient set.

At the end of task ``t`` the merged model is searched for inside an *augmented trajectory
subspace* built from four models only: the pre-trained base ``theta0``, the previous merged
model ``theta_prev`` (θ̄_{t-1}) and ``K`` snapshots of task ``t``'s own fine-tuning
trajectory (the last one is the expert ``theta_t``). Per parameter leaf ``l`` the directions
are

* ``d_k = theta_t^(k) - theta_prev`` for ``k = 1..K``            (``'trajectory'``)
* ``h   = theta_prev - theta0``                                   (``'history'``)
* ``m   = theta0 + lam * maxmag(h / lam, theta_t - theta0) - theta_prev``
                                                     (``'consensus'``, MagMax pair; lam = 1)

stacked as ``D_l`` with shape ``[J, *leaf.shape]``, and the merged model is

    theta(alpha)_l = theta_init_l + sum_j (alpha_{g(l), j} - alpha_init_j) * D_{l, j}

where ``theta_init`` is the exact initial point (the MagMax pair merge by default) and
``g(l)`` the coefficient group of leaf ``l`` (one group per leaf by default). When the init
point's own direction is in the subspace this is the reference formulation
``theta_prev + sum_j alpha_j D_j``; writing it around ``theta_init`` makes ``steps=0`` return
the MagMax point bit for bit. The coefficients are fitted with Adam on minibatches of the
current task only, against

    L(alpha) = w_align * L_align + w_consistency * L_consistency
             + w_responsiveness * L_responsiveness + w_reg * ||alpha - alpha_init||^2.

Every objective is a separate pure function with the *objective protocol*
``fn(apply_fn, params, logits, batch, targets, ctx) -> scalar`` (``params`` = theta(alpha),
``logits = apply_fn(params, batch['image'])``, ``targets`` = per-batch constants computed once
without gradient, ``ctx`` = a :class:`Context`) and is looked up by name in a registry
(``ALIGN``, ``CONSISTENCY``, ``RESPONSIVENESS``); register your own function under a new name
and select it in the config to swap one objective without touching anything else.

The optimisation step (all objectives, the second-order responsiveness term, the Adam update
of the coefficients) is one module-level jitted function, :func:`train_step`; the model
function is a static argument and class sets are fixed-shape masks, so one compile serves
every merge of a stream. Nothing here knows about models: only pytrees and a pure
``apply_fn(params, images) -> logits``.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict
from tqdm.auto import tqdm

from trm_jax import sharding
from trm_jax.errors import ConfigError, DataError, TrainingError
from trm_jax.merging import task_vectors as tv

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

DIRECTIONS = ("trajectory", "history", "consensus")
INITS = ("magmax", "expert", "previous")
DIRECTION_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
G_REFS = ("base", "previous")
TERMS = ("align", "consistency", "responsiveness", "reg")


# ----------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """Every field :func:`merge` reads, with the reference formulation's defaults.

    The cost defaults (``steps``, ``learning_rate``, ``batch_size``, ``probe.batch_size``,
    ``responsiveness_every``, ``max_batches``, ``eval_batches``) were measured: 21x cheaper
    than 100 steps at 1e-2 on the caller's batches with L_GR every step, with the same
    validation accuracy on the embedded Fashion-MNIST stream (README, "Measured").

    * ``steps`` (30), ``learning_rate`` (5e-2): Adam on the coefficients only.
    * ``temperature`` (2.0): tau of the distillation / consistency KLs (scaled by tau^2).
    * ``weights.{align, consistency, responsiveness, reg}``: term weights; a weight of 0
      removes the term from the jitted step (it is not computed).
    * ``align``: ``'distill'`` (KL to the expert over the task's classes), ``'distill_seen'``
      (the same over every class seen so far), ``'ce'`` (labels over the task's classes),
      ``'ce_seen'`` (labels over every seen class), ``'param'`` (cosine to the expert's
      displacement, per leaf).
    * ``consistency``: ``'kl'`` (KL to the previous merged model over old classes) or
      ``'mse'`` (raw old-class logits).
    * ``responsiveness``: ``'probe'`` (squared gradient norm of a fixed random probe loss) or
      ``'fisher'`` (trace of the Fisher, labels sampled from the model).
    * ``directions``: any non-empty subset of ``('trajectory', 'history', 'consensus')``.
    * ``granularity``: ``'leaf'`` (one coefficient per leaf and direction), ``'global'`` (one
      per direction for the whole model) or name regexes (a string or a tuple of strings):
      leaves whose first matching regex matches the same text share coefficients, so
      ``'block_\\d+'`` gives one group per block; unmatched leaves keep their own.
    * ``init``: ``'magmax'`` (the consensus point, below), ``'expert'`` (theta_t) or
      ``'previous'`` (theta_prev).
    * ``lam`` (1.0): MagMax's lambda in the consensus point
      ``theta0 + lam * maxmag(h / lam, theta_t - theta0)``. 1 is the reference formulation's
      pair merge ``theta0 + maxmag(h, tau_t)``. With ``lam < 1`` and a previous model of the
      form ``theta0 + lam * M`` (a MagMax chain), ``h / lam = M`` and the point is exactly the
      running MagMax merge with that lambda (``theta0 + lam * maxmag(M, tau_t)``), so TRM
      starts from MagMax as the runner configures it instead of from its lambda = 1 form.
    * ``direction_dtype``: storage of the stacked directions, ``'float32'`` or ``'bfloat16'``.
    * ``g_ref``: the model whose responsiveness is the reference, ``'base'`` (theta0, fixed for
      the whole stream) or ``'previous'``.
    * ``probe.seed``, ``probe.num_classes`` (outputs of the random probe head; 0 = use the
      model's own seen-class logits), ``probe.batch_size`` (examples per batch used by the
      responsiveness term, whose memory and time are second order; 0 = the whole batch;
      default 16: ViT-B/16 needs ~0.5 GB per probe example in float32).
    * ``responsiveness_every``: compute the second-order responsiveness term (value and
      coefficient gradient) on every N-th step only and reuse the last computed gradient
      on the steps between ("lazy" regularisation); 1 = every step. Default 4.
    * ``batch_size``: examples per coefficient step; larger incoming batches are split into
      chunks of this size (a ragged rest is skipped), so the merge can use smaller batches
      than the caller's data pipeline; 0 = the batches as given. Default 32: the
      coefficients are few (J x leaves, a few hundred), so small batches suffice.
    * ``max_batches``: distinct (chunked) batches held, with their targets, and cycled over
      when ``steps`` exceeds them; 0 = up to ``steps``. Default 8: each held batch stays in
      memory (at 224 px a chunk of 32 float32 images is 19 MB, a batch of 128 is 77 MB).
    * ``eval_batches``: how many of the held batches the before/after report in ``info``
      (``terms_init``, ``terms_final``, ``g_*``) averages over; 0 = all (costs ~2 steps
      each). Default 1.
    * ``seed``: the key for the Fisher variant's sampled labels.
    """
    config = ml_collections.ConfigDict()
    config.steps = 30
    config.learning_rate = 5e-2
    config.temperature = 2.0
    config.weights = ml_collections.ConfigDict(
        {"align": 1.0, "consistency": 1.0, "responsiveness": 0.1, "reg": 0.01}
    )
    config.align = "distill"
    config.consistency = "kl"
    config.responsiveness = "probe"
    config.directions = DIRECTIONS
    # A string or a tuple of regexes: declared as an object field so either type is accepted.
    config.granularity = config_dict.FieldReference("leaf", field_type=object)
    config.init = "magmax"
    config.lam = 1.0
    config.direction_dtype = "float32"
    config.g_ref = "base"
    config.probe = ml_collections.ConfigDict({"seed": 0, "num_classes": 10, "batch_size": 16})
    config.responsiveness_every = 4
    config.batch_size = 32
    config.max_batches = 8
    config.eval_batches = 1
    config.seed = 0
    return config


def _choice(value: str, choices: Iterable[str], field: str) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"trm config '{field}' is {value!r}; choose one of {choices}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ConfigError`` (one line, naming the field and the valid choices) on a bad field."""
    if int(config.steps) != config.steps or config.steps < 0:
        raise ConfigError(f"trm config 'steps' must be an integer >= 0, got {config.steps!r}")
    if not config.learning_rate > 0:
        raise ConfigError(f"trm config 'learning_rate' must be > 0, got {config.learning_rate}")
    if not (np.isfinite(config.lam) and config.lam > 0):
        raise ConfigError(f"trm config 'lam' must be finite and > 0, got {config.lam}")
    if not config.temperature > 0:
        raise ConfigError(f"trm config 'temperature' must be > 0, got {config.temperature}")
    for term in TERMS:
        weight = config.weights[term]
        if not (np.isfinite(weight) and weight >= 0):
            raise ConfigError(f"trm config 'weights.{term}' must be finite and >= 0, got {weight}")
    _choice(config.align, ALIGN, "align")
    _choice(config.consistency, CONSISTENCY, "consistency")
    _choice(config.responsiveness, RESPONSIVENESS, "responsiveness")
    _choice(config.responsiveness, MEASURES, "responsiveness (its g measure in MEASURES)")
    _choice(config.init, INITS, "init")
    _choice(config.direction_dtype, DIRECTION_DTYPES, "direction_dtype")
    _choice(config.g_ref, G_REFS, "g_ref")
    directions = tuple(config.directions)
    if not directions or len(set(directions)) != len(directions):
        raise ConfigError(
            f"trm config 'directions' must be a non-empty subset of {list(DIRECTIONS)} "
            f"without repeats, got {directions!r}"
        )
    for name in directions:
        _choice(name, DIRECTIONS, "directions")
    _granularity_patterns(config.granularity)
    counts = {
        "probe.num_classes": config.probe.num_classes,
        "probe.batch_size": config.probe.batch_size,
        "batch_size": config.batch_size,
        "max_batches": config.max_batches,
        "eval_batches": config.eval_batches,
    }
    for field, value in counts.items():
        if int(value) != value or value < 0:
            raise ConfigError(f"trm config '{field}' must be an integer >= 0, got {value!r}")
    every = config.responsiveness_every
    if int(every) != every or every < 1:
        raise ConfigError(
            f"trm config 'responsiveness_every' must be an integer >= 1, got {every!r}"
        )


def _granularity_patterns(granularity: Any) -> tuple[str, ...] | str:
    """``'leaf'`` / ``'global'``, or the regexes as a tuple (each compiled once to check it)."""
    if granularity in ("leaf", "global"):
        return granularity
    patterns = (granularity,) if isinstance(granularity, str) else tuple(granularity)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(
            "trm config 'granularity' must be 'leaf', 'global' or non-empty name regexes, "
            f"got {granularity!r}"
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"trm config 'granularity' regex {pattern!r} is invalid: {err}"
            ) from None
    return patterns


# ----------------------------------------------------------------------------- subspace


class Layout(NamedTuple):
    """Static (hashable) description of the coefficient layout.

    ``groups[i]`` is the coefficient row of leaf ``i`` (``jax.tree.leaves`` order);
    ``group_names`` labels the rows; ``direction_names`` labels the columns (``d1..dK``,
    ``h``, ``m``); ``leaf_names`` are the ``a/b/c`` paths.
    """

    groups: tuple[int, ...]
    group_names: tuple[str, ...]
    direction_names: tuple[str, ...]
    leaf_names: tuple[str, ...]


class Subspace(NamedTuple):
    """The augmented trajectory subspace as arrays.

    ``anchor`` = theta(alpha_init), computed exactly (not as a sum of directions);
    ``directions`` = per leaf ``[J, *leaf.shape]`` in the storage dtype; ``alpha_init`` =
    ``[G, J]`` coordinates of the anchor (1 on the init point's direction when present).
    """

    anchor: PyTree
    directions: PyTree
    alpha_init: jax.Array


def coefficient_groups(
    names: Sequence[str], granularity: Any
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Assign each leaf name a coefficient group: ``(group index per leaf, group names)``.

    ``'leaf'``: one group per leaf. ``'global'``: one group. Regexes: the first regex that
    ``re.search``-matches a name decides, and the matched text is the group key (so
    ``'block_\\d+'`` groups per block); a leaf no regex matches forms its own group.
    """
    patterns = _granularity_patterns(granularity)
    keys: list[str] = []
    for name in names:
        if patterns == "leaf":
            keys.append(name)
        elif patterns == "global":
            keys.append("global")
        else:
            for pattern in patterns:
                match = re.search(pattern, name)
                if match is not None:
                    keys.append(f"{pattern}={match.group(0)}")
                    break
            else:
                keys.append(name)
    group_names = tuple(dict.fromkeys(keys))
    index = {key: i for i, key in enumerate(group_names)}
    return tuple(index[key] for key in keys), group_names


def direction_names(num_snapshots: int, directions: Sequence[str]) -> tuple[str, ...]:
    """Column labels in stacking order: ``d1..dK`` (trajectory), ``h``, ``m``."""
    names: list[str] = []
    if "trajectory" in directions:
        names += [f"d{k + 1}" for k in range(num_snapshots)]
    if "history" in directions:
        names.append("h")
    if "consensus" in directions:
        names.append("m")
    return tuple(names)


def coefficient_dtype(tree: PyTree) -> jnp.dtype:
    """float32, or float64 when the parameters are float64 (finite-difference checks)."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*jax.tree.leaves(tree)))


def build_subspace(
    base: PyTree,
    previous: PyTree,
    snapshots: Sequence[PyTree],
    *,
    directions: Sequence[str] = DIRECTIONS,
    granularity: Any = "leaf",
    init: str = "magmax",
    lam: float = 1.0,
    direction_dtype: str = "float32",
) -> tuple[Subspace, Layout]:
    """Stack the directions per leaf and compute the exact init point (see module docstring).

    Built leaf by leaf, so the peak extra memory is the stacked directions plus one leaf.
    """
    dtype = DIRECTION_DTYPES[direction_dtype]
    cols = direction_names(len(snapshots), directions)
    leaves_b = jax.tree.leaves(base)
    leaves_p = jax.tree.leaves(previous)
    leaves_s = [jax.tree.leaves(s) for s in snapshots]

    anchors, stacked = [], []
    for i, (b, p) in enumerate(zip(leaves_b, leaves_p, strict=True)):
        e = leaves_s[-1][i]
        h = p - b
        # The running MagMax merge with lambda when h = lam * M_{t-1}; at lam = 1 the pair
        # merge theta0 + maxmag(h, tau_t) exactly (x / 1 and 1 * x are exact in IEEE).
        consensus_point = b + lam * tv.maxmag2(h / lam, e - b)
        rows = []
        if "trajectory" in directions:
            rows += [s[i] - p for s in leaves_s]
        if "history" in directions:
            rows.append(h)
        if "consensus" in directions:
            rows.append(consensus_point - p)
        stacked.append(jnp.stack(rows).astype(dtype))
        anchors.append({"magmax": consensus_point, "expert": e, "previous": p}[init])
    treedef = jax.tree.structure(base)
    groups, group_names = coefficient_groups(tv.leaf_names(base), granularity)

    alpha_init = np.zeros((len(group_names), len(cols)), coefficient_dtype(base))
    init_col = {"magmax": "m", "expert": f"d{len(snapshots)}", "previous": None}[init]
    if init_col in cols:
        alpha_init[:, cols.index(init_col)] = 1.0
    subspace = Subspace(
        anchor=jax.tree.unflatten(treedef, anchors),
        directions=jax.tree.unflatten(treedef, stacked),
        alpha_init=_place_like(alpha_init, base),
    )
    layout = Layout(groups, group_names, cols, tuple(tv.leaf_names(base)))
    return subspace, layout


def _place_like(value: np.ndarray, tree: PyTree) -> jax.Array:
    """``value`` replicated over the mesh of ``tree``'s first mesh-sharded leaf (so the
    coefficients, and the optimiser state derived from them, live on the same devices as
    the parameters from step 0, and the jitted step compiles once); else a plain array."""
    for leaf in jax.tree.leaves(tree):
        placement = getattr(leaf, "sharding", None)
        if isinstance(placement, jax.sharding.NamedSharding):
            replicated = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec())
            return jax.device_put(value, replicated)
    return jnp.asarray(value)


def combine(subspace: Subspace, alpha: jax.Array, layout: Layout) -> PyTree:
    """theta(alpha): per leaf one contraction ``anchor + (alpha_g - alpha_init_g) . D``.

    Computed in the coefficients' precision, cast back to each anchor leaf's dtype; at
    ``alpha == alpha_init`` the result is the anchor exactly.
    """
    delta = alpha - subspace.alpha_init
    anchors = jax.tree.leaves(subspace.anchor)
    stacks = jax.tree.leaves(subspace.directions)
    out = []
    for a, d, g in zip(anchors, stacks, layout.groups, strict=True):
        compute = jnp.promote_types(delta.dtype, a.dtype)
        move = jnp.tensordot(delta[g].astype(compute), d.astype(compute), axes=1)
        out.append((a.astype(compute) + move).astype(a.dtype))
    return jax.tree.unflatten(jax.tree.structure(subspace.anchor), out)


def alpha_tree(alpha: jax.Array, layout: Layout, like: PyTree) -> PyTree:
    """Coefficients as a pytree shaped like the parameters: each leaf holds its ``[J]`` row."""
    rows = [alpha[g] for g in layout.groups]
    return jax.tree.unflatten(jax.tree.structure(like), rows)


# ----------------------------------------------------------------------------- objectives


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


def _f32(x: jax.Array) -> jax.Array:
    """Logits in at least float32 (bf16 models), float64 kept."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# Stands in for the logits of masked-out classes: exp() of it is exactly 0 in float32, and
# unlike -inf it keeps every value and gradient finite (also when a mask is all False).
_MASKED = -1e9


def masked(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``logits`` (at least float32) with the classes outside ``mask`` pushed to ``-1e9``:
    softmaxes and cross-entropies over the result range over the masked classes only."""
    logits = _f32(logits)
    return logits if mask is None else jnp.where(mask, logits, _MASKED)


def tempered_kl(
    teacher: jax.Array, student: jax.Array, temperature: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """``tau^2 * KL(softmax(teacher/tau) || softmax(student/tau))`` over the classes in
    ``mask`` (all when ``None``), mean over the batch; 0 for an all-False mask.

    The tau^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    t = jax.nn.log_softmax(masked(teacher, mask) / temperature, axis=-1)
    s = jax.nn.log_softmax(masked(student, mask) / temperature, axis=-1)
    kl = jnp.exp(t) * (t - s)
    if mask is not None:
        kl = jnp.where(mask, kl, 0.0)
    return temperature**2 * jnp.mean(jnp.sum(kl, axis=-1))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


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
    return _cross_entropy(masked(logits, ctx.task_mask), batch["label"])


def align_ce_seen(apply_fn, params, logits, batch, targets, ctx) -> jax.Array:
    """Variant: cross-entropy of the labels over every class seen so far.

    The only term that asks current-task inputs to score below the old classes' rows (the
    task-agnostic argmax), from the current task's labels alone."""
    return _cross_entropy(masked(logits, ctx.seen_mask), batch["label"])


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
    diff = _f32(logits) - _f32(targets["previous_logits"])
    total = jnp.sum(jnp.where(ctx.old_mask, jnp.square(diff), 0.0))
    return total / jnp.maximum(1, logits.shape[0] * jnp.sum(ctx.old_mask))


def _sq_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return sum(jnp.sum(jnp.square(_f32(x))) for x in leaves)


def _zero_cotangent(x: jax.Array) -> jax.Array:
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
    grads = jax.grad(loss_fn)(params, data)
    return _sq_norm(grads), (params, data, grads)


def _grad_sq_norm_bwd(loss_fn, residuals, cotangent):
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
        return _cross_entropy(masked(logits, seen), labels)
    return _cross_entropy(jnp.where(seen, _f32(logits), 0.0) @ head, labels)


def _seen_nll(apply_fn, params, data) -> jax.Array:
    """Mean negative log-likelihood of ``labels`` under the seen-class softmax."""
    images, labels, seen = data
    return _cross_entropy(masked(apply_fn(params, images), seen), labels)


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
    seen_logits = masked(apply_fn(params, images), ctx.seen_mask)
    sampled = jax.random.categorical(
        jax.random.fold_in(targets["key"], 1), jax.lax.stop_gradient(seen_logits), axis=-1
    )
    data = (images, sampled, ctx.seen_mask)
    return n * grad_sq_norm(functools.partial(_seen_nll, apply_fn), params, data)


def _log(x: jax.Array) -> jax.Array:
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


def reg_l2(alpha: jax.Array, alpha_init: jax.Array) -> jax.Array:
    """||alpha - alpha_init||^2 over every coefficient: stay near the rule-based start."""
    return jnp.sum(jnp.square(alpha - alpha_init))


ALIGN: dict[str, Callable] = {
    "distill": align_distill,
    "distill_seen": align_distill_seen,
    "ce": align_ce,
    "ce_seen": align_ce_seen,
    "param": align_param,
}
CONSISTENCY: dict[str, Callable] = {"kl": consistency_kl, "mse": consistency_mse}
RESPONSIVENESS: dict[str, Callable] = {
    "probe": responsiveness_probe,
    "fisher": responsiveness_fisher,
}
# The g measure behind each responsiveness objective: gives g_ref, g_init and g_final.
MEASURES: dict[str, Callable] = {"probe": g_probe, "fisher": g_fisher}


# ----------------------------------------------------------------------------- jitted pieces


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
    terms["reg"] = (
        jnp.zeros((), alpha.dtype) if spec.reg is None else spec.reg(alpha, subspace.alpha_init)
    )
    active = [name for name in TERMS if getattr(spec, name) is not None]
    loss = sum(
        (hyper.weights[name].astype(alpha.dtype) * terms[name] for name in active),
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


# ----------------------------------------------------------------------------- driver


def _chunks(batch: dict, size: int) -> list[dict]:
    """``batch`` split into consecutive chunks of ``size`` examples (a smaller rest last);
    ``[batch]`` when ``size`` is 0 or the batch is not larger."""
    n = int(np.shape(batch["label"])[0])
    if not size or n <= size:
        return [batch]
    return [jax.tree.map(lambda x, i=i: x[i : i + size], batch) for i in range(0, n, size)]


class _BatchCache:
    """Draws batches lazily, computes each one's targets once, cycles when they run out.

    Incoming batches are split into chunks of ``batch_size`` (0 = as given). Holds at most
    ``limit`` distinct chunks; chunks whose shapes differ from the first (a ragged last
    batch or rest) are skipped so the jitted step keeps one trace. Labels are checked on
    the host with ``sharding.fetch`` (arrays split across hosts are gathered: every process
    draws the same batches, as SPMD code does).
    """

    def __init__(self, batches, limit, make_targets, task_classes, batch_size=0):
        self._iter = iter(batches)
        self._limit = limit
        self._make_targets = make_targets
        self._task_classes = task_classes
        self._batch_size = batch_size
        self._pending: list[dict] = []
        self.entries: list[tuple[dict, dict]] = []
        self.skipped = 0
        self._exhausted = False

    def _next_chunk(self) -> dict | None:
        while not self._pending:
            raw = next(self._iter, None)
            if raw is None:
                return None
            if not isinstance(raw, dict) or "image" not in raw or "label" not in raw:
                raise DataError("trm.merge: each batch must be a dict with 'image' and 'label'")
            batch = {"image": raw["image"], "label": raw["label"]}
            labels = np.asarray(sharding.fetch(batch["label"]))
            outside = np.setdiff1d(labels, self._task_classes)
            if outside.size:
                raise DataError(
                    f"trm.merge: batch labels {outside[:10].tolist()} are not in task_classes; "
                    "batches must hold the current task's data only"
                )
            self._pending = _chunks(batch, self._batch_size)
        return self._pending.pop(0)

    def _draw(self) -> bool:
        while (batch := self._next_chunk()) is not None:
            shapes = jax.tree.map(np.shape, batch)
            if self.entries and shapes != jax.tree.map(np.shape, self.entries[0][0]):
                self.skipped += 1
                continue
            self.entries.append((batch, self._make_targets(batch, len(self.entries))))
            return True
        self._exhausted = True
        return False

    def get(self, step: int) -> tuple[dict, dict]:
        if not self._exhausted and (not self._limit or len(self.entries) < self._limit):
            if self._draw():
                return self.entries[-1]
        if not self.entries:
            raise DataError("trm.merge: no batches; pass at least one batch of the current task")
        return self.entries[step % len(self.entries)]


def make_context(
    previous: PyTree,
    expert: PyTree,
    task_classes: np.ndarray,
    old_classes: np.ndarray,
    config: ml_collections.ConfigDict,
    dtype: jnp.dtype = jnp.float32,
    *,
    num_logits: int,
) -> Context:
    """The :class:`Context` of one merge over ``num_logits`` outputs.

    The probe head is one fixed ``[num_logits, P]`` draw from ``probe.seed`` (so a class keeps
    its probe row along the stream), unseen rows zeroed, scaled by ``1/sqrt(#seen)``.
    """
    masks = []
    for ids in (task_classes, old_classes):
        mask = np.zeros(num_logits, bool)
        mask[np.asarray(ids, np.int64)] = True
        masks.append(mask)
    task_mask, old_mask = masks
    seen_mask = task_mask | old_mask
    probe_head = None
    if config.probe.num_classes:
        key = jax.random.fold_in(jax.random.key(config.probe.seed), 0)
        probe_head = jax.random.normal(key, (num_logits, config.probe.num_classes), dtype)
        probe_head = probe_head * jnp.asarray(seen_mask[:, None] / np.sqrt(seen_mask.sum()), dtype)
    return Context(
        task_mask=jnp.asarray(task_mask),
        old_mask=jnp.asarray(old_mask),
        seen_mask=jnp.asarray(seen_mask),
        temperature=jnp.asarray(config.temperature, dtype),
        probe_head=probe_head,
        previous=previous,
        expert=expert,
    )


def _class_ids(values: Any, label: str) -> np.ndarray:
    ids = np.asarray(values).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"trm.merge: {label} must hold integer class ids, got {ids.dtype}")
    ids = ids.astype(np.int32)
    if np.unique(ids).size != ids.size:
        raise ValueError(f"trm.merge: {label} repeats class ids")
    if ids.size and ids.min() < 0:
        raise ValueError(f"trm.merge: {label} holds negative class ids")
    return ids


def merge(
    apply_fn: ApplyFn,
    base: PyTree,
    previous: PyTree,
    snapshots: Sequence[PyTree],
    batches: Iterable[dict],
    *,
    task_classes: Any,
    old_classes: Any,
    config: ml_collections.ConfigDict,
    progress: str | None = None,
) -> tuple[PyTree, dict[str, Any]]:
    """TRM merge of task ``t`` (see the module docstring for the subspace and objectives).

    Args:
      apply_fn: pure ``(params, images) -> logits`` over every class of the stream.
      base: theta0. previous: theta_prev (= ``base`` for the first task).
      snapshots: the K >= 1 snapshots of task t's trajectory; the last is the expert theta_t.
      batches: iterable of ``{'image', 'label'}`` dicts from the current task only (numpy
        or jax arrays, sharded ones included); drawn lazily, split into chunks of
        ``config.batch_size``; at most ``config.max_batches`` (0: ``max(1, steps)``)
        distinct chunks are held and cycled over.
      task_classes: class ids of task t. old_classes: ids of earlier tasks (may be empty).
      config: :func:`default_config`.
      progress: a description to show a progress bar over the steps with (None: no bar).

    Returns:
      ``(params, info)``: the merged parameters (dtypes of ``base``) and a dict with
      ``alpha`` (coefficients, a pytree shaped like ``base`` with a numpy ``[J]`` row per
      leaf),
      ``alpha_groups`` (group name -> row), ``directions`` (column names), ``history``
      (per-step numpy arrays ``loss``, ``align``, ``consistency``, ``responsiveness``,
      ``reg``; terms at the coefficients *before* each step, unweighted; with
      ``responsiveness_every > 1`` the responsiveness value the step reused), ``g_ref``,
      ``g_init``, ``g_final`` (mean g at the reference, the init point and the result),
      ``terms_init`` / ``terms_final`` (mean loss and unweighted terms at ``alpha_init`` and
      at the result; these five average over the first ``eval_batches`` held batches),
      ``active`` (terms with a non-zero weight), ``batches`` / ``skipped_batches`` (held /
      ragged chunks) and
      ``seconds`` (wall time of the whole merge).

    Raises:
      ValueError: previous or a snapshot not shaped like base; bad class ids.
      ConfigError: a bad config field, or no snapshots.
      DataError: no batches, malformed batches, labels outside ``task_classes``, task and
        old classes overlapping, class ids beyond the logits.
      TrainingError: a non-finite loss (names the first step and term).
    """
    start = time.perf_counter()
    validate_config(config)
    snapshots = list(snapshots)
    if not snapshots:
        raise ConfigError("trm.merge: no snapshots (K = 0); keep at least the expert theta_t")
    tv.check_like(
        base,
        previous,
        *snapshots,
        names=["previous"] + [f"snapshots[{k}]" for k in range(len(snapshots))],
    )
    task_ids = _class_ids(task_classes, "task_classes")
    old_ids = _class_ids(old_classes, "old_classes")
    if task_ids.size == 0:
        raise DataError("trm.merge: task_classes is empty")
    overlap = np.intersect1d(task_ids, old_ids)
    if overlap.size:
        raise DataError(
            f"trm.merge: task_classes and old_classes overlap at {overlap[:10].tolist()}"
        )

    subspace, layout = build_subspace(
        base,
        previous,
        snapshots,
        directions=tuple(config.directions),
        granularity=config.granularity,
        init=config.init,
        lam=float(config.lam),
        direction_dtype=config.direction_dtype,
    )
    dtype = subspace.alpha_init.dtype
    weights = {name: float(config.weights[name]) for name in TERMS}
    spec = Spec(
        apply_fn=apply_fn,
        align=ALIGN[config.align] if weights["align"] else None,
        consistency=CONSISTENCY[config.consistency] if weights["consistency"] else None,
        responsiveness=(
            RESPONSIVENESS[config.responsiveness] if weights["responsiveness"] else None
        ),
        reg=reg_l2 if weights["reg"] else None,
        layout=layout,
        responsiveness_every=int(config.responsiveness_every),
    )
    hyper = Hyper(
        learning_rate=jnp.asarray(config.learning_rate, dtype),
        weights={name: jnp.asarray(w, dtype) for name, w in weights.items()},
    )
    measure = MEASURES[config.responsiveness]
    reference = base if config.g_ref == "base" else previous
    # Targets of inactive terms are not computed. g_ref (a second-order measurement per batch)
    # is measured only for the batches a step recomputes L_GR on: with responsiveness_every
    # N that is every N-th step, so most held batches never need it.
    needs = tuple(name for name, term in TARGETS.items() if weights[term] and name != "g_ref")
    if weights["responsiveness"]:
        needs += ("g_ref_later",)
    measured: set[int] = set()  # ids of the targets dicts whose g_ref is measured

    def with_g_ref(batch: dict, targets: dict) -> dict:
        if id(targets) not in measured:
            targets["g_ref"] = measure_g(
                reference, batch, targets, contexts[0], apply_fn=apply_fn, measure=measure
            )
            measured.add(id(targets))
        return targets

    seed_key = jax.random.key(config.seed)
    probe_key = jax.random.fold_in(jax.random.key(config.probe.seed), 1)
    contexts: list[Context] = []  # built from the first batch (the logits' count)

    def make_targets(batch: dict, index: int) -> dict:
        if not contexts:
            logits = jax.eval_shape(apply_fn, snapshots[-1], batch["image"])
            num_logits = int(logits.shape[-1])
            top = int(max(task_ids.max(), old_ids.max(initial=0)))
            if top >= num_logits:
                raise DataError(
                    f"trm.merge: class id {top} is beyond the {num_logits} logits apply_fn returns"
                )
            contexts.append(
                make_context(
                    previous, snapshots[-1], task_ids, old_ids, config, dtype, num_logits=num_logits
                )
            )
        ctx = contexts[0]
        size = int(np.shape(batch["label"])[0])
        probe_size = min(size, config.probe.batch_size) if config.probe.batch_size else size
        targets = compute_targets(
            reference,
            batch,
            ctx,
            jax.random.fold_in(seed_key, index),
            jax.random.fold_in(probe_key, index),
            apply_fn=apply_fn,
            measure=measure,
            probe_size=probe_size,
            needs=needs,
        )
        return targets

    limit = config.max_batches or max(1, config.steps)
    cache = _BatchCache(batches, limit, make_targets, task_ids, config.batch_size)
    state = init_state(subspace)
    records = []
    bar = tqdm(
        range(config.steps),
        desc=progress,
        leave=False,
        disable=progress is None,
        dynamic_ncols=True,
    )
    for step in bar:
        batch, targets = cache.get(step)
        if weights["responsiveness"] and step % spec.responsiveness_every == 0:
            targets = with_g_ref(batch, targets)
        state, terms = train_step(state, subspace, batch, targets, contexts[0], hyper, spec=spec)
        records.append(terms)
    if not cache.entries:
        cache.get(0)  # steps = 0: still draw one batch for the g measurements
    ctx = contexts[0]

    names = ("loss", *TERMS)
    stacked = [jnp.stack([r[name] for r in records]) for name in names] if records else []
    history = {
        name: np.asarray(values, np.float64).reshape(-1)
        for name, values in zip(names, sharding.fetch(stacked) or [[]] * len(names), strict=True)
    }
    _check_finite_history(history, [name for name in TERMS if weights[name]])

    params = combine(subspace, state.alpha, layout)
    g_ref, g_init, g_final, terms_init, terms_final = [], [], [], [], []
    g = functools.partial(measure_g, apply_fn=apply_fn, measure=measure)
    for batch, targets in cache.entries[: config.eval_batches or None]:
        if weights["responsiveness"]:  # the report's L_GR reads it too
            g_ref.append(with_g_ref(batch, targets)["g_ref"])
        else:
            g_ref.append(g(reference, batch, targets, ctx))
        loss, terms = evaluate(subspace.alpha_init, subspace, batch, targets, ctx, hyper, spec=spec)
        terms_init.append({"loss": loss, **terms})
        g_init.append(g(subspace.anchor, batch, targets, ctx))
        if config.steps:  # otherwise the result is the init point: same numbers
            loss, terms = evaluate(state.alpha, subspace, batch, targets, ctx, hyper, spec=spec)
            terms_final.append({"loss": loss, **terms})
            g_final.append(g(params, batch, targets, ctx))
    if not config.steps:
        terms_final, g_final = terms_init, g_init
    params = jax.block_until_ready(params)
    alpha, g_ref, g_init, g_final, terms_init, terms_final = sharding.fetch(
        (state.alpha, g_ref, g_init, g_final, terms_init, terms_final)
    )
    info = {
        "alpha": alpha_tree(alpha, layout, base),
        "alpha_groups": dict(zip(layout.group_names, alpha, strict=True)),
        "directions": layout.direction_names,
        "history": history,
        "g_ref": float(np.mean(g_ref)),
        "g_init": float(np.mean(g_init)),
        "g_final": float(np.mean(g_final)),
        "terms_init": _mean_terms(terms_init),
        "terms_final": _mean_terms(terms_final),
        "active": tuple(name for name in TERMS if weights[name]),
        "batches": len(cache.entries),
        "skipped_batches": cache.skipped,
        "seconds": time.perf_counter() - start,
    }
    return params, info


def _mean_terms(records: list[dict]) -> dict[str, float]:
    """Mean of each term over the held batches (host values), as Python floats."""
    return {name: float(np.mean([r[name] for r in records])) for name in records[0]}


def _check_finite_history(history: dict[str, np.ndarray], active: Sequence[str]) -> None:
    """Raise ``TrainingError`` naming the first step whose loss is not finite and the active
    terms that were not finite there."""
    bad = ~np.isfinite(history["loss"])
    if not bad.any():
        return
    step = int(np.argmax(bad))
    terms = [name for name in active if not np.isfinite(history[name][step])] or ["loss"]
    raise TrainingError(
        f"trm.merge: non-finite loss at step {step} (term {', '.join(terms)}: "
        f"{', '.join(f'{n}={history[n][step]}' for n in terms)}); lower learning_rate or "
        "that term's weight"
    )
