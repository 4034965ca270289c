"""Task-vector tree arithmetic: the vocabulary every merge rule is written in.

A task vector is ``tau = finetuned - base``, leaf by leaf over a parameter pytree
(nested dicts of arrays). Everything here is pure and jit-able; structure or shape
mismatches raise ``ValueError`` naming the offending leaf path, so a wrong checkpoint
never merges silently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def leaf_names(tree: PyTree) -> list[str]:
    """Flattened leaf paths as ``a/b/c`` strings, in ``jax.tree.leaves`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [path_to_name(path) for path, _ in flat]


def path_to_name(path) -> str:
    """``(DictKey('a'), DictKey('b'))`` -> ``'a/b'`` (the form name regexes match)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(jax.tree_util.keystr((key,)))
    return "/".join(parts)


def check_like(reference: PyTree, *others: PyTree, names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` unless every tree in ``others`` matches ``reference``.

    Checks tree structure first (reporting missing and extra leaf paths), then each
    leaf's shape (reporting the first mismatched path). ``names`` labels the trees in
    the message (default ``tree[i]``).
    """
    ref_names = leaf_names(reference)
    ref_leaves = jax.tree.leaves(reference)
    for i, other in enumerate(others):
        label = names[i] if names is not None else f"tree[{i}]"
        other_names = leaf_names(other)
        if other_names != ref_names or (
            jax.tree.structure(other) != jax.tree.structure(reference)
        ):
            missing = sorted(set(ref_names) - set(other_names))
            extra = sorted(set(other_names) - set(ref_names))
            raise ValueError(
                f"{label} does not match the base tree structure: "
                f"missing {missing[:10]}, extra {extra[:10]}"
            )
        for name, a, b in zip(ref_names, ref_leaves, jax.tree.leaves(other), strict=True):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"{label} leaf '{name}' has shape {jnp.shape(b)}, base has {jnp.shape(a)}"
                )


def check_finite(tree: PyTree, label: str = "tree") -> None:
    """Raise ``ValueError`` naming every leaf that holds NaN or Inf (concrete arrays only)."""
    bad = [
        name
        for name, leaf in zip(leaf_names(tree), jax.tree.leaves(tree), strict=True)
        if not bool(jnp.all(jnp.isfinite(leaf)))
    ]
    if bad:
        raise ValueError(f"{label} has non-finite values in leaves {bad[:10]}")


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """``finetuned - base`` leaf by leaf (the task vector tau)."""
    check_like(base, finetuned, names=["finetuned"])
    return jax.tree.map(jnp.subtract, finetuned, base)


def apply(base: PyTree, tv: PyTree, lam: float | jax.Array = 1.0) -> PyTree:
    """``base + lam * tv`` leaf by leaf, kept in each base leaf's dtype."""
    check_like(base, tv, names=["task vector"])
    return jax.tree.map(lambda b, t: (b + lam * t).astype(jnp.result_type(b)), base, tv)


def maxmag2(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per element, the argument with the larger absolute value (ties go to ``a``)."""
    return jnp.where(jnp.abs(b) > jnp.abs(a), b, a)


def maxmag(*trees: PyTree) -> PyTree:
    """Per element, the value with the largest magnitude across ``trees`` (MagMax).

    Ties go to the earliest tree, so folding ``maxmag2`` left to right (the running
    form) gives exactly the same result as this all-at-once form.
    """
    if not trees:
        raise ValueError("maxmag needs at least one tree")
    out = trees[0]
    for tree in trees[1:]:
        out = jax.tree.map(maxmag2, out, tree)
    return out


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
