"""Running (incremental) merges with O(1) state: fold task vectors in one at a time.

A continual-learning stream should not keep every task vector: for the rules whose
merge is a fold, the state is one parameter-sized tree plus a counter, whatever the
number of tasks, and the result equals the batch rule in ``rules`` (same float
operations in the same order, so the two agree to the last bit on one device, exact ties
of MagMax magnitudes included: both give them to the later task)::

    state = running.init("magmax", base)
    for tau in task_vectors:            # e.g. one per task, as it is produced
        state = running.update(state, tau)
    merged = running.result(base, state, lam=0.5)   # == merging.magmax(base, taus, lam=0.5)

``result`` takes exactly the hparams of the matching batch rule (``average``: none;
``task_arithmetic`` and ``magmax``: ``lam``, a Python real number, checked like the batch
rule's), so ``merging.hparams_for`` serves both. States are NamedTuples (pytrees):
checkpoint them like any other state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from trm_jax.errors import UnknownNameError
from trm_jax.merging import rules
from trm_jax.merging.task_vectors import (
    NonFiniteError,
    check_finite,
    check_like,
    finite_leaves,
    maxmag2,
)
from trm_jax.tree_util import PyTree, f32, is_traced, leaf_names


class AverageState(NamedTuple):
    """Left-to-right float32 sum of the task vectors and how many were added."""

    total: PyTree
    count: jax.Array


class TaskArithmeticState(NamedTuple):
    """Left-to-right float32 sum of the task vectors and how many were added."""

    total: PyTree
    count: jax.Array


class MagMaxState(NamedTuple):
    """Per element the largest-magnitude entry so far (an exact tie goes to the later
    task, as in MagMax's reference code and in ``rules.magmax``)."""

    best: PyTree
    count: jax.Array


State = AverageState | TaskArithmeticState | MagMaxState

STATES: dict[str, type] = {
    "average": AverageState,
    "task_arithmetic": TaskArithmeticState,
    "magmax": MagMaxState,
}


def init(rule: str, like: PyTree) -> State:
    """Empty state for ``rule`` with leaves shaped like ``like`` (zeros, >= float32)."""
    if rule not in STATES:
        raise UnknownNameError(
            f"no running form for merge rule {rule!r}; choose one of {sorted(STATES)}"
        )
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), f32(jnp.asarray(x)).dtype), like)
    return STATES[rule](zeros, jnp.zeros((), jnp.int32))


@jax.jit
def _add_leaf(total: jax.Array, t: jax.Array) -> jax.Array:
    return total + f32(t)


@jax.jit
def _maxmag_leaf(best: jax.Array, t: jax.Array) -> jax.Array:
    # The ``+ 0 * t`` makes a NaN/Inf in t visible in the state (maxmag alone skips NaN).
    return maxmag2(best, f32(t)) + f32(t) * 0.0


def update(state: State, tv: PyTree) -> State:
    """Fold one task vector into the state. Raises ``TreeMismatchError`` (shape/structure)
    or ``NonFiniteError`` naming the task vector's NaN/Inf leaves."""
    if not isinstance(state, tuple(STATES.values())):
        raise TypeError(f"not a running-merge state: {type(state).__name__}")
    tree = state.best if isinstance(state, MagMaxState) else state.total
    check_like(tree, tv, names=["task vector"])
    # Leaf by leaf, each leaf's rule compiled once per shape (as in ``rules``).
    fold = _maxmag_leaf if isinstance(state, MagMaxState) else _add_leaf
    new_tree = jax.tree.map(fold, tree, tv)
    new = type(state)(new_tree, state.count + 1)
    if not is_traced(new_tree):
        ok = finite_leaves(new_tree)
        if not ok.all():
            check_finite(tv, f"task vector #{int(state.count)}")
            bad = [n for n, good in zip(leaf_names(new_tree), ok, strict=True) if not good]
            raise NonFiniteError(
                f"running merge overflowed to non-finite values in leaves {bad[:10]}"
            )
    return new


@jax.jit
def _scaled_leaf(b: jax.Array, s: jax.Array, scale: jax.Array) -> jax.Array:
    return (f32(b) + scale * s).astype(b.dtype)


def _scaled(base: PyTree, tree: PyTree, scale: Any) -> PyTree:
    scale = jnp.asarray(scale, jnp.float32)
    return jax.tree.map(lambda b, s: _scaled_leaf(b, s, scale), base, tree)


def _average_result(base: PyTree, state: AverageState) -> PyTree:
    # 1/count rounded exactly as the batch rule rounds 1/T (a Python float), when known.
    count = state.count
    scale = (
        1.0 / count.astype(jnp.float32) if isinstance(count, jax.core.Tracer) else 1.0 / int(count)
    )
    return _scaled(base, state.total, scale)


def _task_arithmetic_result(
    base: PyTree, state: TaskArithmeticState, *, lam: float = 1.0
) -> PyTree:
    return _scaled(base, state.total, lam)


def _magmax_result(base: PyTree, state: MagMaxState, *, lam: float = 0.5) -> PyTree:
    return _scaled(base, state.best, lam)


_RULES = {state: rule for rule, state in STATES.items()}

_RESULTS = {
    AverageState: _average_result,
    TaskArithmeticState: _task_arithmetic_result,
    MagMaxState: _magmax_result,
}


def result(base: PyTree, state: State, **hparams: Any) -> PyTree:
    """The merged parameters: ``base + (1/count) total`` (average), ``base + lam total``
    (task_arithmetic) or ``base + lam best`` (magmax), in each base leaf's dtype.
    ``hparams`` are exactly the batch rule's keyword arguments (defaults included); each
    must be one real number: a Python number or a 0-d array, traced too (``TypeError``
    naming it and the rule otherwise)."""
    fn = _RESULTS.get(type(state))
    if fn is None:
        raise TypeError(f"not a running-merge state: {type(state).__name__}")
    rule = _RULES[type(state)]
    if not isinstance(state.count, jax.core.Tracer) and int(state.count) == 0:
        raise ValueError("running merge has no task vectors yet: call update() first")
    check_like(base, state[0], names=["running state"])
    for name, value in hparams.items():
        rules.check_scalar(f"running.result ({rule})", name, value)
    return fn(base, state, **hparams)
