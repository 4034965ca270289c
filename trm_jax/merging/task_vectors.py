"""Task-vector tree arithmetic: the vocabulary every merge rule is written in.

A task vector is ``tau = finetuned - base``, leaf by leaf over a parameter pytree
(nested dicts of arrays). Everything here is pure and jit-able; structure or shape
mismatches raise ``TreeMismatchError`` (a ``ValueError``) naming the offending leaf path,
and NaN/Inf is reported as ``NonFiniteError`` (a ``ValueError``) naming every bad leaf,
so a wrong or diverged checkpoint never merges silently.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.errors import TrainingError, TRMError
from trm_jax.tree_util import PyTree, is_traced

# Re-exported: the merge rules and users name leaves through this module.
from trm_jax.tree_util import leaf_names as leaf_names  # noqa: E402
from trm_jax.tree_util import path_to_name as path_to_name  # noqa: E402


class TreeMismatchError(TRMError, ValueError):
    """Two parameter trees differ in structure or in a leaf's shape (message names the leaf)."""


class NonFiniteError(TrainingError, ValueError):
    """A merge input or output holds NaN or Inf (message names every bad leaf)."""


def check_like(reference: PyTree, *others: PyTree, names: Sequence[str] | None = None) -> None:
    """Raise ``TreeMismatchError`` unless every tree in ``others`` matches ``reference``.

    Checks tree structure first (reporting missing and extra leaf paths), then each
    leaf's shape (reporting the first mismatched path). ``names`` labels the trees in
    the message (default ``tree[i]``). Only shapes are read, so it also works under jit.
    """
    ref_structure = jax.tree.structure(reference)
    ref_shapes = [jnp.shape(x) for x in jax.tree.leaves(reference)]
    for i, other in enumerate(others):
        if jax.tree.structure(other) == ref_structure and ref_shapes == [
            jnp.shape(x) for x in jax.tree.leaves(other)
        ]:
            continue  # the common case, without building leaf names
        label = names[i] if names is not None else f"tree[{i}]"
        ref_names, other_names = leaf_names(reference), leaf_names(other)
        if other_names != ref_names or jax.tree.structure(other) != ref_structure:
            missing = sorted(set(ref_names) - set(other_names))
            extra = sorted(set(other_names) - set(ref_names))
            raise TreeMismatchError(
                f"{label} does not match the base tree structure: "
                f"missing {missing[:10]}, extra {extra[:10]}"
            )
        for name, a, b in zip(ref_names, ref_shapes, jax.tree.leaves(other), strict=True):
            if a != jnp.shape(b):
                raise TreeMismatchError(
                    f"{label} leaf '{name}' has shape {jnp.shape(b)}, base has {a}"
                )


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def finite_leaves(tree: PyTree) -> np.ndarray:
    """Boolean array, one entry per leaf (``leaf_names`` order): all values finite.

    One small jitted reduction per leaf (compiled once per leaf shape, dispatched
    asynchronously) and a single device->host transfer for the flags.
    """
    flags = [_all_finite(x) for x in jax.tree.leaves(tree)]
    return np.asarray(jax.device_get(flags), bool).reshape(len(flags))


def check_finite(tree: PyTree, label: str = "tree") -> None:
    """Raise ``NonFiniteError`` naming every leaf that holds NaN or Inf.

    Needs concrete values: under ``jit`` (tracer leaves) there is nothing to inspect and
    it returns without checking.
    """
    if is_traced(tree):
        return
    ok = finite_leaves(tree)
    if not ok.all():
        bad = [name for name, good in zip(leaf_names(tree), ok, strict=True) if not good]
        raise NonFiniteError(f"{label} has non-finite values in leaves {bad[:10]}")


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """``finetuned - base`` leaf by leaf (the task vector tau)."""
    check_like(base, finetuned, names=["finetuned"])
    return jax.tree.map(jnp.subtract, finetuned, base)


def apply(base: PyTree, tv: PyTree, lam: float | jax.Array = 1.0) -> PyTree:
    """``base + lam * tv`` leaf by leaf, kept in each base leaf's dtype."""
    check_like(base, tv, names=["task vector"])
    return jax.tree.map(lambda b, t: (b + lam * t).astype(jnp.result_type(b)), base, tv)


def maxmag2(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per element, the argument with the larger absolute value; an exact tie of
    magnitudes goes to ``b``, the later one (MagMax's ``where(|b| >= |a|, b, a)``).

    It is one step of the running MagMax fold (``a`` the merge so far, ``b`` the new task
    vector), so folding it left to right equals ``maxmag`` exactly, ties included.
    """
    return jnp.where(jnp.abs(b) >= jnp.abs(a), b, a)


def maxmag_leaves(*xs: jax.Array) -> jax.Array:
    """``maxmag`` of single arrays: a left fold of ``maxmag2`` carrying ``|best|``, so XLA
    fuses it into one pass over the inputs without recomputing the chain of selects."""
    best, best_abs = xs[0], jnp.abs(xs[0])
    for x in xs[1:]:
        x_abs = jnp.abs(x)
        take = x_abs >= best_abs
        best, best_abs = jnp.where(take, x, best), jnp.where(take, x_abs, best_abs)
    return best


def maxmag(*trees: PyTree) -> PyTree:
    """Per element, the value with the largest magnitude across ``trees`` (MagMax).

    Trees are taken in order and an exact tie of magnitudes goes to the later tree, as in
    the MagMax reference code (``merge_max_abs``: ``where(|cur| >= |best|, cur, best)``),
    so it is the left fold of ``maxmag2`` and equals the running form to the last bit.
    """
    if not trees:
        raise ValueError("maxmag needs at least one tree")
    return jax.tree.map(maxmag_leaves, *trees)


def check_real(rule: str, name: str, value: object) -> float:
    """``value`` as a Python float if it is a real number (``int``, ``float`` or a NumPy
    real scalar; ``bool`` excluded), else ``TypeError`` naming the argument and the rule.

    Merge hyper-parameters (``lam``, ``k``, ``p``) are checked with it at the API boundary:
    a string, an array or a traced value would otherwise be broadcast or silently
    promoted inside the leaf functions instead of failing where it was passed.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{rule}: {name} must be a real number (int or float, not bool), "
            f"got {type(value).__name__} {value!r}"
        )
    return float(value)


def name_mask(
    tree: PyTree,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> PyTree:
    """A pytree of Python bools: True where the leaf path matches ``include``
    (default: every leaf) and matches no ``exclude`` regex (``re.search`` on ``a/b/c``).

    Use it to leave chosen leaves (a head, norms) unmerged: see ``masked``.
    """
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    names = leaf_names(tree)
    flags = [
        (not inc or any(re.search(p, n) for p in inc)) and not any(re.search(p, n) for p in exc)
        for n in names
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), flags)


def masked(merged: PyTree, fallback: PyTree, mask: PyTree) -> PyTree:
    """Leaves of ``merged`` where ``mask`` is True, of ``fallback`` elsewhere."""
    return jax.tree.map(lambda m, f, keep: m if keep else f, merged, fallback, mask)
