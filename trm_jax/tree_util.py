"""Pytree utilities every part of the package shares (the neutral bottom layer).

Parameters, task vectors, optimiser moments and TRM's directions are plain pytrees
(nested dicts of arrays). The helpers here name their leaves (``a/b/c``, the form
the regexes over parameter names match), count their size, and copy them to the host.
They import nothing from the rest of ``trm_jax``, so any module may use them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

PyTree = Any

# Compute / storage dtype names accepted by config fields (train.dtype, the models'
# dtype, TRM's direction_dtype).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def leaf_names(tree: PyTree) -> list[str]:
    """Flattened leaf paths as ``a/b/c`` strings, in ``jax.tree.leaves`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [path_to_name(path) for path, _ in flat]


def tree_size(tree: PyTree) -> int:
    """Total number of elements over every leaf (static: works on tracers too)."""
    return sum(int(np.prod(jnp.shape(x), dtype=np.int64)) for x in jax.tree.leaves(tree))


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of every leaf as stored (what a checkpoint of ``tree`` holds)."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def is_traced(tree: PyTree) -> bool:
    """True when any leaf is a tracer (we are inside ``jit``/``grad``: values unknown)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def under_trace() -> bool:
    """True inside a ``jit``/``grad`` trace, even where every argument is concrete: there
    operations on constants are staged out too, so host-side value reads would fail."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def f32(x: jax.Array) -> jax.Array:
    """``x`` in at least float32: bf16 values are computed in float32, float64 is kept."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def fetch(tree: PyTree) -> PyTree:
    """Leaves as numpy on this host, whatever their sharding (multi-host safe).

    Fully addressable arrays are copied directly; replicated ones are read from a local
    replica; arrays split across hosts are all-gathered (collective: every process must
    call ``fetch`` on the same tree).
    """

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def batched_apply(fn, inputs: np.ndarray, batch_size: int, place=None) -> np.ndarray:
    """``fn`` over ``inputs`` in chunks of ``batch_size`` rows, results concatenated on the
    host. The last chunk is zero-padded to a full batch (its padded rows are dropped), so
    a jitted ``fn`` compiles one shape for every call. ``place`` (optional) moves a chunk
    onto devices first, e.g. split over a mesh."""
    n, out = len(inputs), []
    for s in range(0, n, batch_size):
        chunk = inputs[s : s + batch_size]
        m = len(chunk)
        if m < batch_size:
            pad = np.zeros((batch_size - m, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        if place is not None:
            chunk = place(chunk)
        out.append(np.asarray(fn(chunk))[:m])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
