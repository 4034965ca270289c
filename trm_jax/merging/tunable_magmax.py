"""Tunable MagMax: MagMax with a preference vector that fixes each task's share of elements.

Hiroshima, Uchida and Shirakawa, "Tunable MAGMAX: Preference-Aware Model Merging for
Continual Learning" (arXiv 2605.20803, ICPR 2026). The tunable part is a *preference vector*
``w`` (one non-negative weight per task, normalised to sum 1): in every parameter leaf of
``n`` elements, task i contributes exactly ``q_i = floor(n w_i)`` elements (the remainder
goes one element each to tasks 0, 1, ... in turn). Elements start as MagMax assigns them
(the task with the largest ``|tau_i|``) and are then moved until every task holds its quota:

1. tasks whose quota is 0 are zeroed (they never win a non-zero magnitude);
2. for i = T-1 down to 1: if task i holds more than ``q_i`` elements, a uniformly random
   subset of the excess is handed to the largest ``|tau_j|`` among the earlier tasks j < i;
3. task 0's excess (a uniformly random subset of its elements) goes to the later tasks that
   are still short: for j = T-1 down to 1, task j takes (at random, up to its deficit) the
   dropped elements whose largest ``|tau|`` among tasks 1..T-1 is its own; the deficits left
   are then filled with uniformly random dropped elements, j = 1, 2, ... in turn.

The merged model is ``theta0 + lam * tau_merged`` with ``lam = 0.5``. The preference is built
from a small sample of the target environment: with ``similarity_metric='labels'`` (the
authors' scripts), ``w_i`` is proportional to the number of target examples whose label is
one of task i's classes (``preference_from_labels``). Written from
``src/merging/task_vectors.py::merge_max_abs_masked_with_targetdata`` and
``src/merging/similarity.py::count_labels`` of KeiHiroshima/tunable-magmax (commit c8bddf3);
``docs/baselines.md`` lists the differences.

Storage: like batch MagMax the rule needs every task vector at merge time (it is not a fold:
the quotas re-balance all tasks), so it is storage-*heavy*, O(T) parameter trees; there is
no running form.

Runner integration: needs theta0, every task vector ``tau_i = theta_i - theta0`` so far (all
T of them at each merge), the class ids of each task and the labels of a small target sample
(or any non-negative per-task scores), and a PRNG key. No snapshots, optimiser state or
gradients. Keeps between tasks the list of task vectors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trm_jax.errors import ConfigError
from trm_jax.merging.task_vectors import check_finite, check_like
from trm_jax.tree_util import PyTree, f32, is_traced


def default_config() -> ml_collections.ConfigDict:
    """Tunable MagMax's hyper-parameters with the authors' defaults (``scripts/merge.sh``,
    ``merge_for_targetdata.py``).

    * ``lam`` (0.5): scale of the merged task vector (the only coefficient they run).
    * ``similarity_metric`` (``'labels'``): how the preference is built; only ``'labels'``
      is implemented here (their ``cosine``/``mmd``/``ot`` feature distances are not).
    * ``num_target_data`` (1000 for 5 tasks, 500 for 20, 200 for 50): target sample size.
    * ``seed`` (0): the random re-assignments.
    """
    config = ml_collections.ConfigDict()
    config.lam = 0.5
    config.similarity_metric = "labels"
    config.num_target_data = 1000
    config.seed = 0
    return config


def preference_from_scores(scores: Sequence[float]) -> np.ndarray:
    """Normalise per-task scores into a preference vector, as the authors do (score / total).

    Args:
        scores: one finite, non-negative score per task, not all zero.

    Returns:
        float64 ``[T]`` summing to 1; ``ConfigError`` for invalid scores.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.size == 0 or np.any(s < 0) or not np.all(np.isfinite(s)) or s.sum() <= 0:
        raise ConfigError(
            f"tunable_magmax: preference scores must be finite, >= 0 and not all 0, got {s}"
        )
    total = float(s.sum())
    return np.array([float(v) / total for v in s])


def preference_from_labels(
    target_labels: Sequence[int], task_classes: Sequence[Sequence[int]]
) -> np.ndarray:
    """The authors' ``'labels'`` preference: ``w_i`` proportional to how many target labels
    fall in task i's classes.

    Args:
        target_labels: labels of the target-environment sample.
        task_classes: class ids of each task, in task order.

    Returns:
        float64 ``[T]`` summing to 1.
    """
    labels = np.asarray(target_labels).reshape(-1)
    counts = [int(np.isin(labels, np.asarray(list(c))).sum()) for c in task_classes]
    return preference_from_scores(counts)


def quotas(num_elements: int, preference: Sequence[float]) -> np.ndarray:
    """How many elements of a leaf each task supplies.

    Args:
        num_elements: the leaf's size ``n``.
        preference: the normalised preference ``w`` (``[T]``).

    Returns:
        int64 ``[T]`` summing to ``n``: ``int(n * w_i)``, then the remainder one element each
        to tasks 0, 1, ... (cyclically), the authors' rule.
    """
    w = np.asarray(preference, np.float64)
    q = np.array([int(num_elements * float(v)) for v in w], np.int64)
    for i in range(int(num_elements - q.sum())):
        q[i % len(q)] += 1
    return q


def _choose(mask: jax.Array, k: jax.Array, key: jax.Array) -> jax.Array:
    """A uniformly random subset of ``k`` of the True entries of ``mask`` (all if fewer):
    the ``k`` masked entries with the smallest uniform priorities (stable argsort)."""
    n = mask.shape[0]
    u = jax.random.uniform(key, (n,))
    order = jnp.argsort(jnp.where(mask, u, 2.0), stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return mask & (rank < k)


def step_key(key: jax.Array, step: int | jax.Array) -> jax.Array:
    """The key of one random choice in a leaf's re-assignment (see ``assign``).

    Args:
        key: the leaf's key.
        step: ``i`` for task i's drop in the downward pass (``0`` for task 0's excess),
            ``T + j`` for task j's aligned picks, ``2T + j`` for its random fill.

    Returns:
        ``jax.random.fold_in(key, step)``.
    """
    return jax.random.fold_in(key, step)


@jax.jit
def assign(stacked: jax.Array, quota: jax.Array, key: jax.Array) -> jax.Array:
    """The task index of every element of one leaf, each task holding exactly its quota.

    Args:
        stacked: ``[T, n]`` flattened task vectors (already zeroed for zero quotas).
        quota: int ``[T]`` summing to n.
        key: this leaf's key (``step_key`` derives one per random choice).

    Returns:
        int32 ``[n]`` winners.
    """
    num_tasks = stacked.shape[0]
    mags = jnp.abs(f32(stacked))
    tasks = jnp.arange(num_tasks, dtype=jnp.int32)[:, None]
    quota = quota.astype(jnp.int32)
    win = jnp.argmax(mags, axis=0).astype(jnp.int32)  # MagMax; ties to the earliest task

    def pass_down(it, win):  # task i = T-1 .. 1 hands its excess to the best earlier task
        i = num_tasks - 1 - it
        won = win == i
        drop = _choose(won, jnp.maximum(won.sum() - quota[i], 0), step_key(key, i))
        best = jnp.argmax(jnp.where(tasks < i, mags, -1.0), axis=0).astype(jnp.int32)
        return jnp.where(drop, best, win)

    win = jax.lax.fori_loop(0, num_tasks - 1, pass_down, win)
    won = win == 0
    drop = _choose(won, jnp.maximum(won.sum() - quota[0], 0), step_key(key, 0))
    counts = jnp.sum(win[None, :] == tasks, axis=1)
    need = jnp.maximum(quota - counts, 0)
    best = jnp.argmax(jnp.where(tasks >= 1, mags, -1.0), axis=0).astype(jnp.int32)
    new = jnp.zeros_like(win)

    def aligned(it, carry):  # j = T-1 .. 1 takes dropped elements it is the best for
        new, taken, got = carry
        j = num_tasks - 1 - it
        pick = _choose(drop & (best == j) & ~taken, need[j], step_key(key, num_tasks + j))
        return jnp.where(pick, j, new), taken | pick, got.at[j].set(pick.sum())

    new, taken, got = jax.lax.fori_loop(
        0, num_tasks - 1, aligned, (new, jnp.zeros_like(drop), jnp.zeros_like(quota))
    )

    def fill(j, carry):  # j = 1 .. T-1 fills what is still missing at random
        new, taken = carry
        pick = _choose(drop & ~taken, need[j] - got[j], step_key(key, 2 * num_tasks + j))
        return jnp.where(pick, j, new), taken | pick

    new, _ = jax.lax.fori_loop(1, num_tasks, fill, (new, taken))
    return jnp.where(drop, new, win)


@jax.jit
def _merge_leaf(base, stacked, quota, key, lam):
    stacked = jnp.where((quota > 0)[:, None], f32(stacked), 0.0)
    win = assign(stacked, quota, key)
    chosen = jnp.take_along_axis(stacked, win[None, :], axis=0)[0]
    return (f32(base).reshape(-1) + lam * chosen).reshape(base.shape).astype(base.dtype), win


def merge(
    base: PyTree,
    task_vectors: Sequence[PyTree],
    *,
    preference: Sequence[float],
    key: jax.Array,
    lam: float | jax.Array = 0.5,
    return_winners: bool = False,
):
    """``theta0 + lam * tau_merged``, each task supplying its preference share of every leaf.

    Args:
        base: theta0.
        task_vectors: ``[tau_1, ..., tau_T]`` shaped like ``base``.
        preference: ``[T]`` non-negative scores (normalised here, as the authors do).
        key: a typed PRNG key; leaf j uses ``fold_in(key, j)``.
        lam: scale of the merged task vector.
        return_winners: also return the per-leaf winner indices (a tree of int32).

    Returns:
        The merged parameters (each base leaf's dtype), and the winners if asked.
    """
    if not isinstance(task_vectors, (list, tuple)) or not task_vectors:
        raise ValueError("tunable_magmax: needs a non-empty list of task vectors")
    check_like(base, *task_vectors, names=[f"task_vectors[{i}]" for i in range(len(task_vectors))])
    w = preference_from_scores(preference)
    if w.size != len(task_vectors):
        raise ConfigError(
            f"tunable_magmax: preference has {w.size} entries for {len(task_vectors)} tasks"
        )
    for i, tv in enumerate(task_vectors):
        if not is_traced(tv):
            check_finite(tv, f"tunable_magmax: task_vectors[{i}]")
    leaves, treedef = jax.tree.flatten(base)
    columns = list(zip(*[jax.tree.leaves(tv) for tv in task_vectors], strict=True))
    lam = jnp.asarray(lam, jnp.float32)
    outs, wins = [], []
    for j, (b, ts) in enumerate(zip(leaves, columns, strict=True)):
        n = int(np.prod(jnp.shape(b), dtype=np.int64))
        q = jnp.asarray(quotas(n, w), jnp.int32)
        stacked = jnp.stack([f32(t).reshape(-1) for t in ts])
        out, win = _merge_leaf(b, stacked, q, jax.random.fold_in(key, j), lam)
        outs.append(out)
        wins.append(win.reshape(jnp.shape(b)))
    merged = jax.tree.unflatten(treedef, outs)
    if return_winners:
        return merged, jax.tree.unflatten(treedef, wins)
    return merged


@functools.partial(jax.jit, static_argnames=("num_tasks",))
def winner_counts(winners: jax.Array, num_tasks: int) -> jax.Array:
    """How many elements of a leaf each task supplies.

    Args:
        winners: the winner indices of a leaf (any shape).
        num_tasks: ``T`` (static).

    Returns:
        int32 ``[T]``.
    """
    return jnp.sum(winners.reshape(1, -1) == jnp.arange(num_tasks)[:, None], axis=1)
