"""Rule-based merges (docs/methods.md) as pure functions over parameter pytrees.

Every rule has the signature ``fn(base, task_vectors, *, <its own hparams>) -> params``
with ``task_vectors`` a list or tuple of pytrees shaped like ``base`` (tau_i = theta_i -
theta0) and returns ``theta0 + lam * merge(tau_1..tau_T)`` in each base leaf's dtype
(arithmetic in at least float32):

* ``average``          theta0 + (1/T) sum_i tau_i
* ``task_arithmetic``  theta0 + lam sum_i tau_i
* ``ties``             trim each tau_i to its top-k fraction of magnitudes (threshold over
                       the whole flattened tau_i), elect a sign per element by summed mass,
                       average the kept values that agree with it (disjoint mean); * lam
* ``dare``             drop each element with probability p, rescale by 1/(1-p), then
                       task arithmetic with lam
* ``magmax``           per element the tau_i with the largest |.|; * lam
* ``randmix``          per element a uniformly random tau_i; * lam

How they run: each public function validates on the host (tree structure and leaf
shapes, hparam ranges), then walks the leaves and calls a module-level jitted *leaf*
function on (base leaf, the T task-vector leaves): XLA fuses it into one pass over the
T inputs with no T-sized temporaries, it compiles once per distinct leaf shape (about ten
for a ViT, instead of one huge program whose compile time grows with the leaf count), and
dispatch is asynchronous, so peak memory is the inputs, the output and one leaf's scratch.

Non-finite inputs are detected without a second pass over the inputs: rules that could
hide a NaN/Inf (a select or a trim) add ``sum_i 0 * tau_i`` to their output, which is
exact for finite inputs and NaN otherwise; a reduction over the *output*, in the same
jitted leaf function, then flags it and a ``NonFiniteError`` names the
input leaves, so nothing non-finite is ever returned. Called inside an outer ``jit``, the
functions trace cleanly (shape checks still run) but cannot inspect values, so the
non-finite check is skipped there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax.errors import ConfigError
from trm_jax.merging.task_vectors import NonFiniteError, check_finite, check_like
from trm_jax.tree_util import PyTree, f32, is_traced, leaf_names, tree_size

# ----------------------------------------------------------------------------- helpers


def _prepare(base: PyTree, task_vectors: Sequence[PyTree], rule: str) -> tuple[PyTree, ...]:
    """Validate the inputs every rule shares and return the task vectors as a tuple."""
    if not isinstance(task_vectors, (list, tuple)):
        raise TypeError(
            f"{rule}: task_vectors must be a list or tuple of pytrees shaped like base, "
            f"got {type(task_vectors).__name__}"
        )
    if not task_vectors:
        raise ValueError(f"{rule}: needs at least one task vector")
    check_like(base, *task_vectors, names=[f"task_vectors[{i}]" for i in range(len(task_vectors))])
    return tuple(task_vectors)


def _finish(
    rule: str, merged: PyTree, finite: list[jax.Array], base: PyTree, tvs: tuple[PyTree, ...]
) -> PyTree:
    """Return ``merged`` if every leaf is finite (``finite``: one flag per leaf, computed by
    the leaf rule); otherwise raise ``NonFiniteError`` naming the non-finite input leaves,
    or the output leaves if every input is finite."""
    if is_traced(merged) or not finite:
        return merged
    ok = np.asarray(jnp.stack(finite), bool)  # one transfer for all the flags
    if ok.all():
        return merged
    check_finite(base, f"{rule}: base")
    for i, tv in enumerate(tvs):
        check_finite(tv, f"{rule}: task_vectors[{i}]")
    bad = [name for name, good in zip(leaf_names(merged), ok, strict=True) if not good]
    raise NonFiniteError(
        f"{rule}: merged parameters are non-finite in leaves {bad[:10]} although every "
        "input is finite (overflow: is lam too large?)"
    )


def _leafwise(
    rule: str, leaf_fn, base: PyTree, tvs: tuple[PyTree, ...], *args: Any, indexed: bool = False
) -> PyTree:
    """Merge leaf by leaf: ``leaf_fn(base_leaf, task_vector_leaves, *args[, j]) ->
    (merged_leaf, all_finite)``, a module-level jitted function (compiled per leaf shape,
    dispatched asynchronously); then the non-finite check on the returned flags."""
    leaves, treedef = jax.tree.flatten(base)
    columns = list(zip(*[jax.tree.leaves(tv) for tv in tvs], strict=True))
    outs, finite = [], []
    for j, (b, ts) in enumerate(zip(leaves, columns, strict=True)):
        out, ok = leaf_fn(b, ts, *args, *((j,) if indexed else ()))
        outs.append(out)
        finite.append(ok)
    return _finish(rule, jax.tree.unflatten(treedef, outs), finite, base, tvs)


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_range(rule: str, name: str, value: Any, lo: float, hi: float, hi_open: bool) -> None:
    """ConfigError unless lo <= value <= hi (or < hi); skipped for traced values."""
    if not _concrete(value):
        return
    v = float(value)
    if not (lo <= v and (v < hi if hi_open else v <= hi)):
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{rule}: {name}={v} is outside [{lo}, {hi}{bracket}")


def _fold_sum(xs: Sequence[jax.Array]) -> jax.Array:
    """Left-to-right sum in float32: the order the running forms use, so both agree."""
    total = f32(xs[0])
    for x in xs[1:]:
        total = total + f32(x)
    return total


def _poison(xs: Sequence[jax.Array]) -> jax.Array:
    """``sum_i 0 * x_i``: exactly zero for finite inputs, NaN if any input is NaN/Inf."""
    return _fold_sum([f32(x) * 0.0 for x in xs])


def _out(base_leaf: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The merged leaf in the base dtype, and whether all of it is finite."""
    out = (f32(base_leaf) + delta).astype(base_leaf.dtype)
    return out, jnp.all(jnp.isfinite(out))


def check_scalar(rule: str, name: str, value: Any) -> None:
    """``TypeError`` naming ``rule`` and ``name`` unless ``value`` is one real number: a
    Python int or float (not a bool), or a 0-d real numpy / jax array (also traced, so
    the rules stay jit-able). A string or an array of several values is a mistake that
    would otherwise broadcast or convert silently."""
    if isinstance(value, bool) or (
        not isinstance(value, int | float | np.number | np.ndarray | jax.Array)
    ):
        raise TypeError(f"{rule}: {name} must be a real number, got {type(value).__name__}")
    shape, dtype = np.shape(value), getattr(value, "dtype", None)
    if shape != () or (dtype is not None and not np.issubdtype(dtype, np.number)):
        raise TypeError(f"{rule}: {name} must be one real number, got an array of shape {shape}")
    if dtype is not None and np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{rule}: {name} must be real, got {dtype}")


def _scalar(x: Any, rule: str = "", name: str = "lam") -> jax.Array:
    """A float32 scalar on device once, not one host->device transfer per leaf call
    (``check_scalar`` first when the caller names the argument)."""
    if rule:
        check_scalar(rule, name, x)
    return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------------------ average / arithmetic


@jax.jit
def _task_arithmetic_leaf(b: jax.Array, ts: tuple[jax.Array, ...], lam: jax.Array):
    return _out(b, lam * _fold_sum(ts))


def average(base: PyTree, task_vectors: Sequence[PyTree]) -> PyTree:
    """``theta0 + (1/T) sum_i tau_i``: the plain mean of the fine-tuned models (computed as
    task arithmetic with lam = 1/T, the float operations the running form repeats)."""
    tvs = _prepare(base, task_vectors, "average")
    return _leafwise("average", _task_arithmetic_leaf, base, tvs, _scalar(1.0 / len(tvs)))


def task_arithmetic(
    base: PyTree, task_vectors: Sequence[PyTree], *, lam: float | jax.Array = 1.0
) -> PyTree:
    """``theta0 + lam * sum_i tau_i`` (Ilharco et al. 2023; MagMax uses lam = 1/T)."""
    tvs = _prepare(base, task_vectors, "task_arithmetic")
    return _leafwise(
        "task_arithmetic", _task_arithmetic_leaf, base, tvs, _scalar(lam, "task_arithmetic")
    )


# ---------------------------------------------------------------------------- magmax


@jax.jit
def _magmax_leaf(b: jax.Array, ts: tuple[jax.Array, ...], lam: jax.Array):
    # maxmag_leaves, with |best| tracked by a NaN-propagating maximum: it equals the
    # select for numbers, and 0 * max_i |t_i| is then the poison term at no extra cost.
    best, best_abs = f32(ts[0]), jnp.abs(f32(ts[0]))
    for t in ts[1:]:
        t_abs = jnp.abs(f32(t))
        best = jnp.where(t_abs > best_abs, f32(t), best)
        best_abs = jnp.maximum(best_abs, t_abs)
    return _out(b, lam * best + best_abs * 0.0)


def magmax(base: PyTree, task_vectors: Sequence[PyTree], *, lam: float | jax.Array = 0.5) -> PyTree:
    """``theta0 + lam * maxmag(tau_1..tau_T)`` (Marczak et al. 2024): per element the
    task-vector entry with the largest magnitude, ties to the earliest task."""
    tvs = _prepare(base, task_vectors, "magmax")
    return _leafwise("magmax", _magmax_leaf, base, tvs, _scalar(lam, "magmax"))


# ------------------------------------------------------------------------------ ties
#
# The TIES threshold is the r-th largest |tau_i| over the whole flattened task vector.
# Sorting or concatenating 86M elements per task is slow and doubles memory, so it is
# found by an exact radix select on float32 bit patterns (monotone in the value for
# non-negative floats): a 2^15-bin histogram of the high 15 bits picks the bucket holding
# the r-th largest, then a 2^16-bin histogram of the low 16 bits of the elements in that
# bucket picks the exact pattern. Two read passes over the task vectors, leaf by leaf,
# 384 KB of counters per task, exact for any data (ties included).

_HI_BITS, _LO_BITS = 15, 16  # radix digits of a non-negative float32 bit pattern (31 bits)


def _magnitude_bits(x: jax.Array) -> jax.Array:
    """``|x|`` as int32 bit patterns (same shape): monotone in ``|x|``, NaN above +inf."""
    return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)


@jax.jit
def _histogram_high(hist: jax.Array, ts: tuple[jax.Array, ...]) -> jax.Array:
    """Add each task's high-digit counts of one leaf to ``hist`` [T, 2^15]."""
    return jnp.stack(
        [
            h.at[(_magnitude_bits(t) >> _LO_BITS).reshape(-1)].add(1)
            for h, t in zip(hist, ts, strict=True)
        ]
    )


@jax.jit
def _histogram_low(hist: jax.Array, ts: tuple[jax.Array, ...], high: jax.Array) -> jax.Array:
    """Add each task's low-digit counts, restricted to its bucket ``high[i]``, to ``hist``."""
    rows = []
    for h, t, hi in zip(hist, ts, high, strict=True):
        bits = _magnitude_bits(t).reshape(-1)
        # Elements outside the bucket go to index 2^16, which mode='drop' discards.
        low = jnp.where((bits >> _LO_BITS) == hi, bits & (2**_LO_BITS - 1), 2**_LO_BITS)
        rows.append(h.at[low].add(1, mode="drop"))
    return jnp.stack(rows)


def _select_digit(hist: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Digit holding the ``rank``-th largest element (1-based) and its rank inside it."""
    n = hist.shape[0]
    at_or_above = jnp.cumsum(hist[::-1])[::-1]  # [d] = number of elements with digit >= d
    digit = jnp.sum(at_or_above >= rank).astype(jnp.int32) - 1
    above = jnp.where(digit + 1 < n, at_or_above[jnp.minimum(digit + 1, n - 1)], 0)
    return digit, rank - above


_select_digits = jax.jit(jax.vmap(_select_digit))


def ties_thresholds(task_vectors: Sequence[PyTree], ranks: jax.Array) -> jax.Array:
    """``[T]`` int32: the float32 bit pattern of the ``ranks[i]``-th largest ``|tau_i|``
    over every leaf of task vector i (exact; rank 0 gives 0x7FFFFFFF, above every finite
    magnitude, so nothing is kept). ``bitcast`` the result to float32 to read values."""
    columns = list(zip(*[jax.tree.leaves(tv) for tv in task_vectors], strict=True))
    ranks = jnp.asarray(ranks, jnp.int32)
    hist = jnp.zeros((len(task_vectors), 2**_HI_BITS), jnp.int32)
    for ts in columns:
        hist = _histogram_high(hist, ts)
    high, ranks = _select_digits(hist, ranks)
    hist = jnp.zeros((len(task_vectors), 2**_LO_BITS), jnp.int32)
    for ts in columns:
        hist = _histogram_low(hist, ts, high)
    low, _ = _select_digits(hist, ranks)
    return (high << _LO_BITS) | low


@jax.jit
def _ties_leaf(
    b: jax.Array, ts: tuple[jax.Array, ...], thresholds: jax.Array, lam: jax.Array
) -> tuple[jax.Array, jax.Array]:
    trimmed = [
        jnp.where(_magnitude_bits(t) >= thresholds[i], f32(t), 0.0) for i, t in enumerate(ts)
    ]
    elected = jnp.sign(_fold_sum(trimmed))  # sign of the summed mass; 0 keeps nothing
    agree = [x * elected > 0 for x in trimmed]  # non-zero and of the elected sign
    total = _fold_sum([jnp.where(a, x, 0.0) for a, x in zip(agree, trimmed, strict=True)])
    count = _fold_sum([a.astype(jnp.float32) for a in agree])
    return _out(b, lam * (total / jnp.maximum(count, 1.0)) + _poison(ts))


def ties(
    base: PyTree,
    task_vectors: Sequence[PyTree],
    *,
    k: float = 0.2,
    lam: float | jax.Array = 0.55,
) -> PyTree:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, scale by ``lam``.

    Trim: per task vector keep the entries whose magnitude is at least the r-th largest
    magnitude of the *whole flattened* task vector, r = floor(k * size) (the TIES
    reference code's rule; ties at the threshold are kept, r = 0 keeps nothing), found
    exactly by ``ties_thresholds``. Elect: the sign of the sum of the trimmed vectors per
    element. Disjoint mean: the mean of the trimmed entries of that sign (entries that are
    zero or disagree are left out; an element whose summed mass is exactly zero merges to
    zero). ``k`` must be a Python number (it fixes integer ranks); ``lam`` may be traced.
    """
    tvs = _prepare(base, task_vectors, "ties")
    check_scalar("ties", "k", k)
    if not _concrete(k):
        raise ConfigError("ties: k must be a concrete number in [0, 1], not a traced value")
    _check_range("ties", "k", k, 0.0, 1.0, hi_open=False)
    size = tree_size(base)
    if size >= 2**31:
        raise ValueError(f"ties: task vectors of {size} elements exceed the int32 counters (2^31)")
    rank = int(np.floor(float(k) * size))
    thresholds = ties_thresholds(tvs, np.full((len(tvs),), rank, np.int32))
    return _leafwise("ties", _ties_leaf, base, tvs, thresholds, _scalar(lam, "ties"))


# ------------------------------------------------------------------ dare and randmix
#
# Randomness: the typed key yields one 32-bit seed per (task, leaf) through jax.random;
# per-element bits are a counter-based hash of the flat element index and that seed,
# triple32(triple32(index) ^ seed) (C. Wellons' integer hash, a bijection with near-ideal
# avalanche). It is stateless, reproducible on every backend, partitions like any
# elementwise op, and costs ~10 integer ops per element: about 10x cheaper than threefry
# on CPU, where threefry alone would make these rules slower than NumPy. Not for
# cryptographic use.


def _triple32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 17)
    x = x * jnp.uint32(0xED5AD4BB)
    x = x ^ (x >> 11)
    x = x * jnp.uint32(0xAC4C1B51)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x31848BAB)
    return x ^ (x >> 14)


def element_bits(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """32 random bits per element of ``shape`` from a uint32 ``seed`` (see notes above)."""
    size = int(np.prod(shape, dtype=np.int64))
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return _triple32(_triple32(index) ^ seed.astype(jnp.uint32))


@functools.partial(jax.jit, static_argnums=(1, 2))
def dare_seeds(key: jax.Array, num_tasks: int, num_leaves: int) -> jax.Array:
    """``[T, L]`` uint32 seeds: row i = ``jax.random.bits(fold_in(key, i), (L,))``, so
    task i's drop masks depend only on (key, i), not on how many tasks are merged."""
    task_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_tasks))
    return jax.vmap(lambda k: jax.random.bits(k, (num_leaves,), jnp.uint32))(task_keys)


def dare_threshold(p: jax.Array) -> jax.Array:
    """``p`` rounded to a multiple of 2^-24, as the integer cut on the top 24 random bits."""
    return jnp.round(jnp.asarray(p, jnp.float32) * 2.0**24).astype(jnp.uint32)


@jax.jit
def _dare_leaf(b, ts, seeds, p, lam, j):
    cut = dare_threshold(p)
    # Rescale by the probability actually used (p rounded to 2^-24): E[merge] = arithmetic.
    scale = 2.0**24 / (2.0**24 - cut.astype(jnp.float32))
    kept = [
        jnp.where((element_bits(seeds[i, j], t.shape) >> 8) >= cut, f32(t), 0.0)
        for i, t in enumerate(ts)
    ]
    return _out(b, lam * (scale * _fold_sum(kept)) + _poison(ts))


def dare(
    base: PyTree,
    task_vectors: Sequence[PyTree],
    *,
    p: float | jax.Array,
    key: jax.Array,
    lam: float | jax.Array = 1.0,
) -> PyTree:
    """DARE (Yu et al. 2024): drop each task-vector entry with probability ``p``, rescale
    the kept ones by 1/(1-p), then task arithmetic: ``theta0 + lam * sum_i tau_i'``.

    Element (i, leaf j, flat index n) is kept iff ``element_bits(seeds[i, j])[n] >> 8 >=
    round(p * 2^24)`` with ``seeds = dare_seeds(key, T, L)``; ``p`` is thus rounded to a
    multiple of 2^-24 and the rescale uses that rounded value, keeping the merge unbiased.
    ``key`` is a typed key (``jax.random.key(seed)``); ``0 <= p < 1``.
    """
    tvs = _prepare(base, task_vectors, "dare")
    check_scalar("dare", "p", p)
    _check_range("dare", "p", p, 0.0, 1.0, hi_open=True)
    if _concrete(p) and int(dare_threshold(p)) >= 2**24:
        raise ConfigError(f"dare: p={float(p)} rounds to 1 at 2^-24 resolution")
    seeds = dare_seeds(key, len(tvs), len(jax.tree.leaves(base)))
    args = (seeds, _scalar(p), _scalar(lam, "dare"))
    return _leafwise("dare", _dare_leaf, base, tvs, *args, indexed=True)


def randmix_index(bits: jax.Array, num_tasks: int) -> jax.Array:
    """``floor(bits * T / 2^32)`` without 64-bit integers (exact for T < 2^16): an index
    in [0, T) whose probabilities differ from 1/T by at most 1/2^32."""
    t = jnp.uint32(num_tasks)
    high = (bits >> 16) * t + (((bits & 0xFFFF) * t) >> 16)
    return (high >> 16).astype(jnp.int32)


@jax.jit
def _randmix_leaf(b, ts, seeds, lam, j):
    cases = [f32(t) for t in ts]
    pick = randmix_index(element_bits(seeds[j], b.shape), len(ts))
    chosen = jax.lax.select_n(pick, *cases) if len(ts) > 1 else cases[0]
    return _out(b, lam * chosen + _poison(ts))


@functools.partial(jax.jit, static_argnums=1)
def randmix_seeds(key: jax.Array, num_leaves: int) -> jax.Array:
    """``[L]`` uint32 seeds: ``jax.random.bits(key, (L,))``."""
    return jax.random.bits(key, (num_leaves,), jnp.uint32)


def randmix(
    base: PyTree, task_vectors: Sequence[PyTree], *, key: jax.Array, lam: float | jax.Array = 1.0
) -> PyTree:
    """RandMix: per element a uniformly random task vector's entry, ``theta0 + lam * that``.

    Element n of leaf j takes ``tau_i`` with ``i = randmix_index(element_bits(s[j]), T)[n]``
    and ``s = randmix_seeds(key, L)``. ``key`` is a typed key.
    """
    tvs = _prepare(base, task_vectors, "randmix")
    if len(tvs) >= 2**16:
        raise ValueError(f"randmix: supports fewer than 65536 task vectors, got {len(tvs)}")
    seeds = randmix_seeds(key, len(jax.tree.leaves(base)))
    args = (seeds, _scalar(lam, "randmix"))
    return _leafwise("randmix", _randmix_leaf, base, tvs, *args, indexed=True)
