"""OPCM: orthogonal-projection continual merging (Tang et al. 2025), O(1) state.

"Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual
Model Merging" (arXiv 2501.09522). Models arrive one at a time; each new task vector is
cleaned of the directions the merged task vector already occupies, added to the running
(unscaled) sum, and the sum is rescaled so that the merged task vector keeps the average
norm of the task vectors seen so far. Written from ``fusion_bench/method/opcm/opcm.py``
(``OPCMForCLIP``) of tanganke/fusion_bench; ``docs/baselines.md`` lists the differences.

Per task t >= 2, with ``Delta = theta_bar_{t-1} - theta0`` (the merged task vector as applied)
and ``lam_{t-1}`` (``lam_1 = 1``):

* every *linear* leaf (a dense kernel viewed as a matrix ``[fan_in, fan_out]``): the full SVD
  ``Delta = U diag(s) V^T``, the split rank ``k`` = the first index whose cumulative singular
  mass ``cumsum(s)/sum(s)`` exceeds ``alpha`` (0 when none does), ``M = U^T tau_t V``, then
  ``M_ii = 0`` for every i and ``M[:k, :k] = 0``, and ``P(tau_t) = U M V^T``;
* every other leaf (biases, norms, embeddings, conv kernels): ``P(tau_t) = tau_t``;
* leaves marked *frozen*: ``P(tau_t) = 0`` (they are only rescaled; see ``leaf_kinds``);
* ``S_t = lam_{t-1} * Delta + P(tau_t)`` leaf by leaf, ``N_t = mean_i ||tau_i||`` (norms over
  every leaf), ``lam_t = ||S_t|| / N_t`` and ``theta_bar_t = theta0 + S_t / lam_t``.

Task 1 is ``theta_bar_1 = theta_1``, ``lam_1 = 1``: the same formulas with ``Delta = 0`` and no
projection, which is how ``update`` treats an empty state, so one function serves every task.
The projection is invariant under transposing the matrix, so Flax's ``[in, out]`` kernels give
the same result as torch's ``[out, in]`` weights.

Runner integration: needs theta0 (the pre-trained model) and, after each task, theta_t (only
``tau_t = theta_t - theta0`` is used; no data, no snapshots, no optimiser state). Keeps
between tasks one float32 parameter-sized tree (``delta``) and three scalars (``lam``, the sum
of task-vector norms, the task count). ``merge_step(theta0, state, theta_t)`` returns the
merged model and the new state.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from trm_jax.errors import ConfigError
from trm_jax.merging.task_vectors import check_finite, check_like
from trm_jax.tree_util import PyTree, f32, is_traced, leaf_names

KINDS = ("linear", "other", "frozen")
_HIGHEST = jax.lax.Precision.HIGHEST


def default_config() -> ml_collections.ConfigDict:
    """OPCM's hyper-parameters with the authors' defaults (``config/method/opcm/opcm.yaml``).

    * ``alpha`` (0.5): the cumulative singular-mass threshold that sets the split rank.
    * ``linear_pattern`` (``'kernel$'``): regex (``re.search`` on ``a/b/c`` leaf names) of the
      leaves that are dense layers; 2-D and 3-D (attention) kernels among them are projected,
      4-D conv kernels are not (torch's ``Conv2d`` is not an ``nn.Linear``).
    * ``frozen_pattern`` (``''``: none): regex of leaves that are never merged, only rescaled;
      ``'class_embedding$'`` reproduces fusion_bench on Hugging Face CLIP, where that parameter
      belongs to a non-leaf module and is skipped by its layer loop.
    """
    config = ml_collections.ConfigDict()
    config.alpha = 0.5
    config.linear_pattern = r"kernel$"
    config.frozen_pattern = ""
    return config


class OPCMState(NamedTuple):
    """What OPCM keeps between tasks.

    ``delta`` is ``theta_bar - theta0`` in float32; the unscaled sum of projected task vectors
    is ``lam * delta``; ``norm_sum`` is ``sum_i ||tau_i||``; ``count`` the tasks merged.
    """

    delta: PyTree
    lam: jax.Array
    norm_sum: jax.Array
    count: jax.Array


def matrix_shape(name: str, shape: Sequence[int]) -> tuple[int, int] | None:
    """The ``[fan_in, fan_out]`` matrix view of a dense kernel, or None for other shapes.

    2-D kernels are used as they are. 3-D kernels are Flax attention projections:
    ``.../out/kernel`` is ``[heads, head_dim, width]`` (input axes first), every other one is
    ``[width, heads, head_dim]`` (query/key/value), the layouts of ``models/vit.py``; they are
    the single ``[width, width]`` linears of the torch models the reference merges.

    Args:
        name: the leaf's ``a/b/c`` path.
        shape: the leaf's shape.

    Returns:
        ``(rows, cols)`` or None (conv kernels, vectors, scalars).
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return shape
    if len(shape) == 3:
        if re.search(r"(^|/)out/kernel$", name):
            return (shape[0] * shape[1], shape[2])
        return (shape[0], shape[1] * shape[2])
    return None


def leaf_kinds(
    tree: PyTree, *, linear_pattern: str = r"kernel$", frozen_pattern: str = ""
) -> tuple[str, ...]:
    """One of ``KINDS`` per leaf (``leaf_names`` order): how ``update`` treats it.

    Args:
        tree: a parameter tree (only names and shapes are read).
        linear_pattern: regex of dense-layer leaves; those with a ``matrix_shape`` view are
            ``'linear'`` (projected).
        frozen_pattern: regex of leaves never merged after task 1, only rescaled
            (``'frozen'``); empty for none.

    Returns:
        A tuple of ``'linear'`` / ``'other'`` / ``'frozen'``, one per leaf.
    """
    kinds = []
    for name, leaf in zip(leaf_names(tree), jax.tree.leaves(tree), strict=True):
        if frozen_pattern and re.search(frozen_pattern, name):
            kinds.append("frozen")
        elif re.search(linear_pattern, name) and matrix_shape(name, jnp.shape(leaf)) is not None:
            kinds.append("linear")
        else:
            kinds.append("other")
    return tuple(kinds)


def split_rank(s: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """Index of the first singular value whose cumulative mass fraction exceeds ``alpha``.

    Args:
        s: singular values, sorted descending.
        alpha: the threshold.

    Returns:
        int32 scalar ``k``: the leading ``k x k`` block is zeroed. When no fraction exceeds
        ``alpha`` (all-zero ``s`` gives NaN fractions; ``alpha >= 1`` up to rounding) it is 0,
        as the reference's ``argmax`` of an all-False mask.
    """
    frac = jnp.cumsum(s) / jnp.sum(s)
    return jnp.argmax((frac > alpha).astype(jnp.int32)).astype(jnp.int32)


def project(delta: jax.Array, tau: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """``tau`` [m, n] cleaned of the merged matrix ``delta``'s principal directions.

    In the basis of ``delta``'s full SVD ``U diag(s) V^T``: ``M = U^T tau V``, zero every
    diagonal entry ``M_ii`` and the leading ``k x k`` block (``k = split_rank(s, alpha)``),
    return ``U M V^T``. Float32, matmuls at highest precision.

    Args:
        delta: the merged task vector of the layer, ``[m, n]``.
        tau: the new task vector of the layer, ``[m, n]``.
        alpha: split-rank threshold.

    Returns:
        float32 ``[m, n]``; ``tau`` unchanged when ``delta`` is all zero (a layer no task has
        changed yet has no principal directions).
    """
    d, t = f32(delta), f32(tau)
    u, s, vh = jnp.linalg.svd(d, full_matrices=True)
    k = split_rank(s, alpha)
    m = jnp.matmul(jnp.matmul(u.T, t, precision=_HIGHEST), vh.T, precision=_HIGHEST)
    rows = jax.lax.broadcasted_iota(jnp.int32, m.shape, 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, m.shape, 1)
    keep = (rows != cols) & ~((rows < k) & (cols < k))
    m = jnp.where(keep, m, 0.0)
    out = jnp.matmul(jnp.matmul(u, m, precision=_HIGHEST), vh, precision=_HIGHEST)
    # An all-zero delta has no principal directions (its SVD basis is arbitrary, so the
    # diagonal zeroing would depend on the LAPACK build): pass tau through unchanged.
    return jnp.where(jnp.sum(s) > 0, out, t)


@functools.partial(jax.jit, static_argnames=("kind", "matrix"))
def _sum_leaf(delta, tau, lam, first, alpha, *, kind: str, matrix):
    """``S = lam * delta + P(tau)`` for one leaf and ``sum(S^2)``."""
    d, t = f32(delta), f32(tau)
    if kind == "linear":
        p = project(d.reshape(matrix), t.reshape(matrix), alpha).reshape(t.shape)
        p = jnp.where(first, t, p)
    elif kind == "other":
        p = t
    else:  # frozen: merged once (task 1), then only rescaled
        p = jnp.where(first, t, jnp.zeros_like(t))
    s = lam * d + p
    return s, jnp.sum(s * s)


@jax.jit
def _scale_leaf(s: jax.Array, scale: jax.Array) -> jax.Array:
    return s * scale


@jax.jit
def _sq_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(f32(x)))


def init(like: PyTree) -> OPCMState:
    """Empty state (no task merged).

    Args:
        like: a tree shaped like the parameters.

    Returns:
        ``OPCMState`` with zero float32 ``delta``, ``lam = 1``, no norms, count 0.
    """
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), f32(jnp.asarray(x)).dtype), like)
    return OPCMState(
        zeros, jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    )


def _check_alpha(alpha) -> None:
    if isinstance(alpha, jax.core.Tracer):
        return
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"opcm: alpha={float(alpha)} is outside [0, 1]")


def update(
    state: OPCMState,
    tau: PyTree,
    *,
    alpha: float | jax.Array = 0.5,
    kinds: Sequence[str] | None = None,
) -> OPCMState:
    """Merge one more task vector ``tau = theta_t - theta0`` into the state.

    Args:
        state: from ``init`` (first task) or a previous ``update``.
        tau: the task's task vector, shaped like ``state.delta``.
        alpha: split-rank threshold in [0, 1] (may be traced).
        kinds: ``leaf_kinds`` of the tree (default: ``leaf_kinds(tau)`` with the default
            patterns); a tuple of Python strings, one per leaf.

    Returns:
        The new state; ``result(theta0, new_state)`` is theta_bar_t. Raises
        ``TreeMismatchError`` for a mis-shaped ``tau`` and ``NonFiniteError`` if the result
        is non-finite.
    """
    check_like(state.delta, tau, names=["task vector"])
    _check_alpha(alpha)
    kinds = leaf_kinds(tau) if kinds is None else tuple(kinds)
    names = leaf_names(tau)
    if len(kinds) != len(names) or any(k not in KINDS for k in kinds):
        raise ConfigError(f"opcm: kinds must be one of {KINDS} per leaf ({len(names)} leaves)")
    first = state.count == 0
    alpha = jnp.asarray(alpha, jnp.float32)
    lam = jnp.asarray(state.lam, jnp.float32)
    deltas, treedef = jax.tree.flatten(state.delta)
    taus = jax.tree.leaves(tau)
    sums, sq = [], []
    for name, kind, d, t in zip(names, kinds, deltas, taus, strict=True):
        matrix = matrix_shape(name, jnp.shape(t)) if kind == "linear" else None
        if kind == "linear" and matrix is None:
            raise ConfigError(f"opcm: leaf '{name}' of shape {jnp.shape(t)} has no matrix view")
        s, s2 = _sum_leaf(d, t, lam, first, alpha, kind=kind, matrix=matrix)
        sums.append(s)
        sq.append(s2)
    tau_norm = jnp.sqrt(sum(_sq_sum(t) for t in taus))
    count = state.count + 1
    norm_sum = state.norm_sum + tau_norm
    avg = norm_sum / count.astype(jnp.float32)
    total = jnp.sqrt(sum(sq))
    ok = total > 0  # S = 0 (only zero task vectors so far): delta stays 0, lam stays 1
    new_lam = jnp.where(ok, total / jnp.where(ok, avg, 1.0), 1.0)
    scale = jnp.where(ok, avg / jnp.where(ok, total, 1.0), 0.0)
    delta = jax.tree.unflatten(treedef, [_scale_leaf(s, scale) for s in sums])
    new = OPCMState(delta, new_lam.astype(jnp.float32), norm_sum, count)
    if not is_traced(delta):
        check_finite(delta, f"opcm: merged task vector after task {int(count)}")
    return new


@jax.jit
def _apply_leaf(b: jax.Array, d: jax.Array) -> jax.Array:
    return (f32(b) + d).astype(b.dtype)


def result(base: PyTree, state: OPCMState) -> PyTree:
    """The merged parameters ``theta0 + delta``.

    Args:
        base: theta0.
        state: a state after at least one ``update``.

    Returns:
        theta_bar_t in each base leaf's dtype.
    """
    if not isinstance(state.count, jax.core.Tracer) and int(state.count) == 0:
        raise ValueError("opcm: no task merged yet: call update() first")
    check_like(base, state.delta, names=["opcm state"])
    return jax.tree.map(_apply_leaf, base, state.delta)


def merge_step(
    base: PyTree,
    state: OPCMState,
    finetuned: PyTree,
    *,
    alpha: float | jax.Array = 0.5,
    kinds: Sequence[str] | None = None,
) -> tuple[PyTree, OPCMState]:
    """One runner step: fold ``finetuned - base`` in and return (theta_bar_t, new state).

    Args:
        base: theta0.
        state: the state after task t-1 (``init(base)`` before the first task).
        finetuned: theta_t.
        alpha: split-rank threshold.
        kinds: ``leaf_kinds`` (default patterns when None).

    Returns:
        ``(merged_params, new_state)``.
    """
    check_like(base, finetuned, names=["finetuned"])
    tau = jax.tree.map(lambda f, b: f32(f) - f32(b), finetuned, base)
    new = update(state, tau, alpha=alpha, kinds=kinds)
    return result(base, new), new


def kinds_from_config(tree: PyTree, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``leaf_kinds`` with the patterns of an OPCM config.

    Args:
        tree: a parameter tree.
        config: ``default_config()``-like (``linear_pattern``, ``frozen_pattern``).

    Returns:
        The per-leaf kinds.
    """
    return leaf_kinds(
        tree, linear_pattern=config.linear_pattern, frozen_pattern=config.frozen_pattern
    )
