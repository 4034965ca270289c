"""The augmented trajectory subspace TRM searches, and theta(alpha) inside it.

Per parameter leaf the directions (``d1..dK`` = the task's trajectory snapshots minus
theta_prev, or ``i1..iK`` = its steps between snapshots; ``h`` = theta_prev - theta0;
``m`` = the MagMax consensus point minus theta_prev) are stacked once, in the storage
dtype, next to the exact init point (the anchor). A merged model is then one contraction
per leaf, ``anchor + (alpha_g - alpha_init_g) . D``: the coefficients are the only thing
optimised, and ``alpha = alpha_init`` gives the anchor bit for bit (docs/method.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.merging import task_vectors as tv
from trm_jax.merging.trm.config import DIRECTION_DTYPES, DIRECTIONS, _granularity_patterns
from trm_jax.tree_util import PyTree, leaf_names


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
    """Column labels in stacking order: ``d1..dK`` (trajectory) or ``i1..iK`` (increments),
    ``h``, ``m``."""
    names: list[str] = []
    if "trajectory" in directions:
        names += [f"d{k + 1}" for k in range(num_snapshots)]
    if "increments" in directions:
        names += [f"i{k + 1}" for k in range(num_snapshots)]
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
        if "increments" in directions:
            points = [p] + [s[i] for s in leaves_s]
            rows += [b1 - b0 for b0, b1 in zip(points[:-1], points[1:], strict=True)]
        if "history" in directions:
            rows.append(h)
        if "consensus" in directions:
            rows.append(consensus_point - p)
        stacked.append(jnp.stack(rows).astype(dtype))
        anchors.append({"magmax": consensus_point, "expert": e, "previous": p}[init])
    treedef = jax.tree.structure(base)
    groups, group_names = coefficient_groups(leaf_names(base), granularity)

    alpha_init = np.zeros((len(group_names), len(cols)), coefficient_dtype(base))
    init_col = {"magmax": "m", "expert": f"d{len(snapshots)}", "previous": None}[init]
    if init_col in cols:
        alpha_init[:, cols.index(init_col)] = 1.0
    if init == "expert" and "increments" in directions:  # theta_t = theta_prev + sum of steps
        alpha_init[:, [j for j, c in enumerate(cols) if c.startswith("i")]] = 1.0
    subspace = Subspace(
        anchor=jax.tree.unflatten(treedef, anchors),
        directions=jax.tree.unflatten(treedef, stacked),
        alpha_init=_place_like(alpha_init, base),
    )
    layout = Layout(groups, group_names, cols, tuple(leaf_names(base)))
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
