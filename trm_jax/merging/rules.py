"""Rule-based merges (docs/methods.md) as pure functions over parameter pytrees.

Every rule has the signature ``fn(base, task_vectors, *, <its own hparams>) -> params``
with ``task_vectors`` a list or tuple of pytrees shaped like ``base`` (tau_i = theta_i -
theta0) and returns ``theta0 + lam * merge(tau_1..tau_T)`` in each base leaf's dtype
(arithmetic in at least float32):

* ``average``          theta0 + (1/T) sum_i tau_i
* ``task_arithmetic``  theta0 + lam sum_i tau_i
* ``ties``             trim each tau_i to its top-k fraction of magnitudes (threshold over
                       the whole flattened tau_i), elect a sign per element by summed mass
                       (zero: the majority sign), average the kept values that agree with
                       it (disjoint mean); * lam. MagMax's reference semantics, ties included
* ``dare``             drop each element with probability p, rescale by 1/(1-p), then
                       task arithmetic with lam
* ``magmax``           per element the tau_i with the largest |.| (an exact tie: the later
                       task, as MagMax's reference code); * lam
* ``randmix``          per element a uniformly random tau_i; * lam

How they run: each public function validates on the host (tree structure and leaf
shapes; each hparam must be one real number, a Python number or a 0-d array, traced too
so the rules stay jit-able, and TIES's ``k`` concrete; a string or an array of several
values fails where it is passed, as does a value out of range), then walks the leaves
and calls a module-level jitted *leaf* function on (base leaf, the T task-vector
leaves): XLA fuses it into one pass over the T inputs with no T-sized temporaries, it
compiles once per distinct leaf shape (about ten for a ViT, instead of one huge program
whose compile time grows with the leaf count), and dispatch is asynchronous, so peak
memory is the inputs, the output and one leaf's scratch.

Non-finite inputs are detected without a second pass over the inputs: rules that could
hide a NaN/Inf (a select or a trim) add ``sum_i 0 * tau_i`` to their output (TIES: 0 times
its elected sign, which a kept NaN or Inf already poisons), which is exact for finite
inputs and NaN otherwise; a reduction over the *output*, in the same
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
from trm_jax.tree_util import PyTree, f32, is_traced, leaf_names, tree_size, under_trace

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
    """The merged leaf in the base dtype, and whether all of it is finite: ``sum(out *
    0)`` is NaN iff some entry is NaN or Inf, and XLA:CPU fuses that float sum into one
    cheap reduction (a boolean ``all(isfinite)`` first materialises a mask)."""
    out = (f32(base_leaf) + delta).astype(base_leaf.dtype)
    return out, jnp.isfinite(jnp.sum(f32(out) * 0.0))


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


def task_arithmetic(base: PyTree, task_vectors: Sequence[PyTree], *, lam: float = 1.0) -> PyTree:
    """``theta0 + lam * sum_i tau_i`` (Ilharco et al. 2023; MagMax uses lam = 1/T)."""
    tvs = _prepare(base, task_vectors, "task_arithmetic")
    return _leafwise(
        "task_arithmetic", _task_arithmetic_leaf, base, tvs, _scalar(lam, "task_arithmetic")
    )


# ---------------------------------------------------------------------------- magmax


@jax.jit
def _magmax_leaf(b: jax.Array, ts: tuple[jax.Array, ...], lam: jax.Array):
    # maxmag_leaves (an exact tie to the later task), with |best| tracked by a
    # NaN-propagating maximum: it equals the select for numbers, and 0 * max_i |t_i| is
    # then the poison term at no extra cost.
    best, best_abs = f32(ts[0]), jnp.abs(f32(ts[0]))
    for t in ts[1:]:
        t_abs = jnp.abs(f32(t))
        best = jnp.where(t_abs >= best_abs, f32(t), best)
        best_abs = jnp.maximum(best_abs, t_abs)
    return _out(b, lam * best + best_abs * 0.0)


def magmax(base: PyTree, task_vectors: Sequence[PyTree], *, lam: float = 0.5) -> PyTree:
    """``theta0 + lam * maxmag(tau_1..tau_T)`` (Marczak et al. 2024): per element the
    task-vector entry with the largest magnitude.

    Tasks are taken in order and an exact tie of magnitudes goes to the later task: the
    MagMax reference code's ``where(|cur| >= |best|, cur, best)``, which is also what
    ``running`` folds, so the running merge equals this one to the last bit.
    """
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


# Fast path, for concrete inputs. The two histogram passes above cost a scatter per
# element (a few ns each on CPU), most of the rule's time, and XLA:CPU has no cheaper
# exact histogram, sort or compaction. Elementwise passes are cheap, so instead:
#
# 1. Sample: a histogram of the top 18 bits of 1/61 of the magnitudes (4 consecutive
#    entries in every 244: a scatter over 1/61 of the data, reading 1/15 of its cache
#    lines) brackets the r-th largest of each task vector between bit patterns
#    ``low`` and ``high``: three binomial standard deviations of the sample rank either
#    side, widened to whole buckets, at most 2^18 patterns.
# 2. One dense pass, leaf by leaf: the leaf is viewed as 128 equal rows, and each column
#    (one entry of every row) yields a packed pair of words: how many of its 128 entries
#    lie above ``high`` and inside the bracket, and the largest and smallest bracket
#    offset ``bits - low``. The pass is one elementwise loop with a small output; the
#    few columns with 3 or more bracket entries are found by a two-level compaction and
#    their 128 entries gathered. Leaves under 65,536 entries (biases, norms: a few per
#    cent of a model) skip it, as per-leaf calls would cost more than they save.
# 3. Exact select: the bracket holds the r-th largest iff #above < r <= #above +
#    #inside; a 2^18-bin histogram of the bracket's entries (max and min of the other
#    columns, the gathered ones, the leaves' ragged tails) then gives it exactly.
#
# Every step is checked (bracket, caps, histogram total == #inside). A task failing a
# check (its rank outside the narrow bracket: about 0.3% of tasks) is redone alone with
# an eight-sigma bracket, then with the two-pass select above, so the result is exact
# for any data, ties included; only the speed depends on the sample being representative.

_COLUMN = 128  # entries per column in the candidate pass (its counts fit 8 bits)
_SAMPLE_STRIDE = 61  # sample density 1/61 (odd and prime: no aliasing with leaf dims)
_SAMPLE_BLOCK = 4  # consecutive entries per sampled block
_SAMPLE_SHIFT = 13  # sample buckets: bit pattern >> 13, i.e. 2^18 buckets
_OFFSET_BITS = 18  # bracket offsets a packed column word holds
_SIGMAS = (3.0, 8.0)  # bracket half-widths tried, in binomial sds of the sample rank
_SMALL_LEAF_COLUMNS = 512  # up to this, every column of a leaf is gathered on overflow
_LARGE_LEAF = _COLUMN * _SMALL_LEAF_COLUMNS  # smaller leaves go to the select unpacked


def _sample_size(size: int, stride: int) -> int:
    return size // (_SAMPLE_BLOCK * stride) * _SAMPLE_BLOCK


def _sample(flat: jax.Array, stride: int) -> jax.Array:
    """The middle 4 entries of every run of ``4 * stride`` (a ragged end is skipped)."""
    period = _SAMPLE_BLOCK * stride
    start = period // 2 - _SAMPLE_BLOCK // 2
    runs = flat[: flat.shape[0] // period * period].reshape(-1, period)
    return runs[:, start : start + _SAMPLE_BLOCK].reshape(-1)


@functools.partial(jax.jit, static_argnums=1)
def _sample_buckets(ts: tuple[jax.Array, ...], stride: int) -> jax.Array:
    """``[T, s]`` int32: the sample buckets of one leaf (``_sample``), every task; or of
    several small leaves flattened end to end, when ``ts`` holds one tuple per task."""
    if ts and isinstance(ts[0], tuple):
        ts = tuple(jnp.concatenate([x.reshape(-1) for x in leaves]) for leaves in ts)
    return jnp.stack([_magnitude_bits(_sample(t.reshape(-1), stride)) >> _SAMPLE_SHIFT for t in ts])


@jax.jit
def _sample_histogram(buckets: list[jax.Array]) -> jax.Array:
    """``[T, 2^18]`` int32 bucket counts of every leaf's sample (one scatter per task)."""
    allb = jnp.concatenate(buckets, axis=1)
    size = 2 ** (31 - _SAMPLE_SHIFT)
    return jnp.stack([jnp.zeros((size,), jnp.int32).at[row].add(1) for row in allb])


def _brackets(
    hist: np.ndarray, samples: int, size: int, rank: int, sigmas: float
) -> tuple[np.ndarray, float]:
    """``[T, 2]`` int32 (low, high): bit patterns that bracket the ``rank``-th largest of
    ``size`` magnitudes with high probability, from a histogram of ``samples`` of them;
    and the largest fraction of samples inside a bracket (it sizes the spill caps)."""
    q = rank / size
    center = rank * samples / size
    half = sigmas * np.sqrt(samples * q * (1.0 - q)) + 4.0
    from_top = np.cumsum(hist[:, ::-1], axis=1)  # [t, j]: samples in the top j + 1 buckets
    above = from_top[:, ::-1]  # [t, b]: samples in bucket >= b

    def bucket(r: int) -> np.ndarray:  # the bucket of the r-th largest sample
        top = np.array([np.searchsorted(row, r) for row in from_top], np.int64)
        return hist.shape[1] - 1 - top

    hi_rank, lo_rank = int(np.floor(center - half)), int(np.ceil(center + half))
    t = hist.shape[0]
    high = ((bucket(hi_rank) + 1) << _SAMPLE_SHIFT) - 1 if hi_rank >= 1 else np.full(t, 2**31 - 1)
    low = bucket(lo_rank) << _SAMPLE_SHIFT if lo_rank <= samples else np.zeros(t, np.int64)
    # Offsets must fit 18 bits: a wider bracket is cut to the 2^18 patterns centred on
    # the sample's estimate (the select's check then decides whether it holds the rank).
    if samples:
        middle = bucket(min(max(int(round(center)), 1), samples)) << _SAMPLE_SHIFT
        low = np.clip(
            middle - 2 ** (_OFFSET_BITS - 1), low, np.maximum(low, high - 2**_OFFSET_BITS + 1)
        )
    high = np.minimum(high, low + 2**_OFFSET_BITS - 1)
    inside = above[np.arange(t), low >> _SAMPLE_SHIFT] - np.where(
        high >> _SAMPLE_SHIFT < above.shape[1] - 1,
        above[np.arange(t), np.minimum((high >> _SAMPLE_SHIFT) + 1, above.shape[1] - 1)],
        0,
    )
    mass = float(np.clip(inside.max(), 0, samples)) / max(samples, 1)
    return np.stack([low, high], axis=1).astype(np.int32), mass


_UNROLL = 16  # rows per step of the column loop: one fused pass, fast to compile


def _column_words(rows: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """``[M, 2]`` uint32, one pair per column of ``rows`` [128, M]: word 0 = #entries
    above ``high`` (bits 0-7) | the largest offset ``bits - low`` inside [low, high]
    (bits 8-25); word 1 = #entries inside (bits 0-7) | the smallest offset inside (bits
    8-25). The offsets mean nothing in a column with no entry inside; the bracket must be
    at most 2^18 patterns wide.

    A loop over blocks of 16 rows, each block unrolled: as fast as unrolling all 128 rows
    (the accumulators are one column-sized array each) and several times faster to
    compile. The offset flipped by the sign bit orders as an unsigned number, so entries
    below the bracket compare above every entry inside it: the smallest needs no select.
    """
    sign = jnp.int32(-(2**31))
    width = high - low
    flipped_width = width ^ sign
    shape = rows.shape[1:]

    def block(k, acc):
        counts, largest, smallest = acc
        rows_k = jax.lax.dynamic_slice_in_dim(rows, k * _UNROLL, _UNROLL, axis=0)
        for j in range(_UNROLL):
            offset = _magnitude_bits(rows_k[j]) - low
            flipped = offset ^ sign
            is_in = flipped <= flipped_width
            counts = counts + jnp.where(offset > width, 1, jnp.where(is_in, 256, 0))
            largest = jnp.maximum(largest, jnp.where(is_in, offset, 0))
            smallest = jnp.minimum(smallest, flipped)
        return counts, largest, smallest

    zeros = jnp.zeros(shape, jnp.int32)
    counts, largest, smallest = jax.lax.fori_loop(
        0, _COLUMN // _UNROLL, block, (zeros, zeros, jnp.full(shape, jnp.int32(2**31 - 1)))
    )
    smallest = jnp.minimum(smallest ^ sign, 2**_OFFSET_BITS - 1)
    word0 = ((counts & 255) | (largest << 8)).astype(jnp.uint32)
    word1 = ((counts >> 8) | (smallest << 8)).astype(jnp.uint32)
    return jnp.stack([word0, word1], axis=-1)


def _compact(flags: jax.Array, cap: int) -> jax.Array:
    """Per row of ``flags`` [T, n], the indices of its first ``cap`` True entries in
    order, padded with ``n``: a running count and one scatter (``jnp.nonzero`` per row
    costs several times more in small XLA ops)."""
    t, n = flags.shape
    position = jnp.cumsum(flags, axis=1, dtype=jnp.int32) - 1
    slot = jnp.where(flags & (position < cap), position, cap)
    rows = jnp.broadcast_to(jnp.arange(t)[:, None], (t, n))
    out = jnp.full((t, cap + 1), n, jnp.int32)
    return out.at[rows, slot].set(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (t, n)))[:, :cap]


def _spill_caps(mass: float) -> tuple[int, int]:
    """Static caps for the overflow columns of a bracket holding fraction ``mass`` of the
    entries, as levels h (cap = count * 2^(-h/2)) for the words and the columns: 1.5
    times the expected number (Poisson with mean 128 * mass per column), plus a constant
    (``_capped``), rounded up to a half power of two so that few distinct caps are ever
    compiled."""
    lam = _COLUMN * mass
    columns = 1.0 - np.exp(-lam) * (1.0 + lam + lam * lam / 2.0)  # P(>= 3 per column)
    words = 1.0 - (1.0 - columns) ** 32  # P(a 32-column word holds one)
    level = lambda f: int(np.clip(np.floor(-2.0 * np.log2(min(1.0, 1.5 * f + 2.0**-12))), 0, 24))
    return level(words), level(columns)


def _capped(count: int, level: int, extra: int) -> int:
    return min(count, int(np.ceil(count * 2.0 ** (-level / 2))) + extra)


def _overflow_columns(inside: jax.Array, caps: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Per task (row of ``inside`` [T, M]), the indices (``[T, C]``, ``M`` = none) of the
    columns with 3 or more bracket entries, and whether they all fit the static cap C
    (``caps``: see ``_spill_caps``). Two levels: a bit per column packed 32 to a word,
    the non-zero words compacted, then their set bits."""
    t, m = inside.shape
    flags = inside >= 3
    if m <= _SMALL_LEAF_COLUMNS:
        return jnp.where(flags, jnp.arange(m), m), jnp.ones((t,), bool)
    words = -(-m // 32)
    padded = jnp.pad(flags, ((0, 0), (0, 32 * words - m))).reshape(t, 32, words)
    packed = functools.reduce(
        jnp.bitwise_or, [padded[:, j].astype(jnp.uint32) << j for j in range(32)]
    )  # [T, words]; bit j of word w: column j * words + w
    cap_words, cap_columns = _capped(words, caps[0], 16), _capped(m, caps[1], 8)
    word_ids = _compact(packed != 0, cap_words)  # [T, cap_words]
    word_bits = jnp.take_along_axis(packed, jnp.minimum(word_ids, words - 1), axis=1)
    word_bits = jnp.where(word_ids < words, word_bits, 0)
    is_set = (word_bits[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    columns = jnp.arange(32)[None, None, :] * words + word_ids[:, :, None]
    pick = _compact(is_set.reshape(t, -1) != 0, cap_columns)  # [T, cap_columns]
    padded_columns = jnp.pad(columns.reshape(t, -1), ((0, 0), (0, 1)), constant_values=m)
    chosen = jnp.take_along_axis(padded_columns, pick, axis=1)
    fits = (jnp.sum(packed != 0, axis=1) <= cap_words) & (jnp.sum(flags, axis=1) <= cap_columns)
    return jnp.minimum(chosen, m), fits


@jax.jit
def _candidate_words(t: jax.Array, bracket: jax.Array) -> jax.Array:
    """The column words ``[M, 2]`` of one leaf of one task vector (``bracket`` = (low,
    high)): the only dense pass. One task per call, so it compiles once per leaf shape
    whatever the number of tasks, and in its own jit, so that no consumer can fuse (and
    so recompute) the row loop."""
    n = t.size
    if n % _COLUMN == 0:  # a reshape of the whole leaf: a bitcast, no index arithmetic
        rows = t.reshape(_COLUMN, n // _COLUMN)
    else:  # a slice of the flattened leaf (slower: per-entry index arithmetic) and a tail
        rows = t.reshape(-1)[: n - n % _COLUMN].reshape(_COLUMN, -1)
    return _column_words(rows, bracket[0], bracket[1])


@functools.partial(jax.jit, static_argnums=3)
def _candidate_spill(
    ts: tuple[jax.Array, ...], words: list, brackets: jax.Array, caps: tuple[int, int]
) -> list:
    """Per task, for one leaf: (the ragged tail's bit patterns, the bracket offsets of the
    overflow columns' entries (-1: none), whether those columns fit the cap)."""
    m = words[0].shape[0]
    inside = jnp.stack([(w[:, 1] & 255).astype(jnp.int32) for w in words])
    columns, fits = _overflow_columns(inside, caps)
    out = []
    for i, t in enumerate(ts):
        low, high = brackets[i, 0], brackets[i, 1]
        flat = t.reshape(-1)
        n = flat.shape[0]
        where = columns[i][:, None] + m * jnp.arange(_COLUMN)[None, :]
        bits = _magnitude_bits(flat[jnp.minimum(where, max(n - 1, 0))])
        keep = (columns[i][:, None] < m) & (bits >= low) & (bits <= high)
        offsets = jnp.where(keep, bits - low, -1).reshape(-1)
        out.append((_magnitude_bits(flat[_COLUMN * m :]), offsets, fits[i]))
    return out


@jax.jit
def _select_in_bracket(
    words: list, spill: list, small: list, bracket: jax.Array, rank: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(int32 threshold bit pattern, bool exact)`` of one task from its candidate pass
    over the large leaves (``words`` and ``spill``: one entry per large leaf) and the raw
    entries of its small leaves (``small``). One task per call: it compiles once per tree
    structure whatever the number of tasks."""
    none = 2**_OFFSET_BITS
    low, high = bracket[0], bracket[1]
    word0 = jnp.concatenate([jnp.zeros((0,), jnp.uint32)] + [w[:, 0] for w in words])
    word1 = jnp.concatenate([jnp.zeros((0,), jnp.uint32)] + [w[:, 1] for w in words])
    word0, word1 = word0.astype(jnp.int32), word1.astype(jnp.int32)
    tail = jnp.concatenate(
        [jnp.zeros((0,), jnp.int32)]
        + [c[0] for c in spill]
        + [_magnitude_bits(x.reshape(-1)) for x in small]
    )
    spilled = jnp.concatenate([jnp.zeros((0,), jnp.int32)] + [c[1] for c in spill])
    fits = jnp.all(jnp.stack([jnp.ones((), bool)] + [c[2] for c in spill]))
    inside = word1 & 255
    tail_in = (tail >= low) & (tail <= high)
    n_above = jnp.sum(word0 & 255) + jnp.sum(tail > high)
    n_inside = jnp.sum(inside) + jnp.sum(tail_in)
    largest = jnp.where((inside >= 1) & (inside <= 2), word0 >> 8, none)
    smallest = jnp.where(inside == 2, word1 >> 8, none)
    hist = jnp.zeros((none,), jnp.int32)
    for idx in (largest, smallest, jnp.where(spilled >= 0, spilled, none)):
        hist = hist.at[idx].add(1, mode="drop")
    hist = hist.at[jnp.where(tail_in, tail - low, none)].add(1, mode="drop")
    digit, _ = _select_digit(hist, rank - n_above)
    exact = fits & (n_above < rank) & (rank <= n_above + n_inside) & (jnp.sum(hist) == n_inside)
    return low + digit, exact


def _bracketed_thresholds(columns: list, brackets: np.ndarray, mass: float, rank: int):
    """The candidate pass and exact select for the tasks of ``columns`` (leaf-major),
    ``mass`` the largest sampled fraction of entries inside a bracket. Leaves below
    ``_LARGE_LEAF`` entries skip the candidate pass: the select reads them directly."""
    caps = _spill_caps(mass)
    device_brackets = jnp.asarray(brackets)
    large = [ts for ts in columns if ts[0].size >= _LARGE_LEAF]
    small = [ts for ts in columns if ts[0].size < _LARGE_LEAF]
    words = [[_candidate_words(t, device_brackets[i]) for i, t in enumerate(ts)] for ts in large]
    spill = [
        _candidate_spill(ts, w, device_brackets, caps) for ts, w in zip(large, words, strict=True)
    ]
    rank = jnp.int32(rank)
    found = [
        _select_in_bracket(
            [w[i] for w in words],
            [s[i] for s in spill],
            [ts[i] for ts in small],
            device_brackets[i],
            rank,
        )
        for i in range(len(brackets))
    ]
    thresholds, exact = jax.device_get(found and list(zip(*found, strict=True)))
    return np.asarray(thresholds, np.int32), np.asarray(exact, bool)


def _sampled_thresholds(
    task_vectors: Sequence[PyTree], rank: int, stride: int = _SAMPLE_STRIDE
) -> tuple[np.ndarray, np.ndarray]:
    """``ties_thresholds_sampled`` and, per task, how it was found: 0 the narrow bracket,
    1 the wide one, 2 the two-pass select (tests sample more densely through ``stride``:
    a small tree's sample is too small for a 2^18-pattern bracket)."""
    leaves = [jax.tree.leaves(tv) for tv in task_vectors]
    columns = list(zip(*leaves, strict=True))
    # The small leaves are sampled in one call, as one vector (per-leaf calls cost more).
    large = [ts for ts in columns if ts[0].size >= _LARGE_LEAF]
    small_columns = [ts for ts in columns if ts[0].size < _LARGE_LEAF]
    small = list(zip(*small_columns, strict=True)) or [()] * len(leaves)
    sizes = [ts[0].size for ts in large] + [sum(x.size for x in small[0])]
    size, samples = sum(sizes), sum(_sample_size(n, stride) for n in sizes)
    parts = [_sample_buckets(ts, stride) for ts in large]
    if small[0]:
        parts.append(_sample_buckets(tuple(small), stride))
    hist = np.asarray(_sample_histogram(parts))
    thresholds, exact = _bracketed_thresholds(
        columns, *_brackets(hist, samples, size, rank, _SIGMAS[0]), rank
    )
    path = np.where(exact, 0, 1)
    for i in np.flatnonzero(~exact):
        wide = _brackets(hist[i : i + 1], samples, size, rank, _SIGMAS[1])
        one, ok = _bracketed_thresholds([(ts[i],) for ts in columns], *wide, rank)
        if ok[0]:
            thresholds[i] = one[0]
        else:
            thresholds[i] = np.asarray(ties_thresholds([task_vectors[i]], np.array([rank])))[0]
            path[i] = 2
    return thresholds, path


def ties_thresholds_sampled(task_vectors: Sequence[PyTree], rank: int) -> np.ndarray:
    """``[T]`` int32, equal to ``ties_thresholds(task_vectors, [rank] * T)`` (the
    ``rank``-th largest magnitude's bit pattern per task vector), by the sampled bracket
    and one dense pass described above; a task whose checks fail is redone alone with a
    wider bracket, then with the two-pass select. Needs concrete arrays and
    ``1 <= rank <= size``."""
    return _sampled_thresholds(task_vectors, rank)[0]


def ties_rank(size: int, k: float) -> int:
    """Rank, counted from the largest, of TIES's trim threshold in a task vector of
    ``size`` elements keeping fraction ``k``: ``int(size * k) + 1``.

    MagMax's reference code (``topk_values_mask``) keeps ``|x| >= kthvalue(|x|, size -
    int(size * k))``, the (size - int(size * k))-th smallest magnitude, which is this
    rank from the top; every entry tied with it is kept too. So k = 0 keeps the largest
    magnitude (and its ties) and k must be below 1: the reference's kthvalue has no rank 0
    (k = 1 fails there), while any k >= 1 - 1/size already keeps every entry. (For
    ``0 <= k < 1`` the float product ``size * k`` never rounds up to ``size``.)
    """
    return int(size * k) + 1


@jax.jit
def _ties_elected_leaf(ts: tuple[jax.Array, ...], thresholds: jax.Array) -> jax.Array:
    """``sum over the leaf of sign(sum_i trimmed_i)`` as int32: this leaf's share of the
    majority sign's vote."""
    kept = _fold_sum(
        [jnp.where(_magnitude_bits(t) >= thresholds[i], f32(t), 0.0) for i, t in enumerate(ts)]
    )
    return jnp.sum(jnp.sign(kept).astype(jnp.int32))


def ties_majority(task_vectors: Sequence[PyTree], thresholds: jax.Array) -> jax.Array:
    """The TIES majority sign (float32 scalar in {-1, 0, 1}): the sign of the sum, over
    every element of every leaf, of the elected signs ``sign(sum_i trimmed_i)`` (MagMax's
    ``resolve_zero_signs(..., "majority")``), counted exactly in int32."""
    columns = list(zip(*[jax.tree.leaves(tv) for tv in task_vectors], strict=True))
    votes = [_ties_elected_leaf(ts, thresholds) for ts in columns]
    return jnp.sign(jnp.sum(jnp.stack(votes))).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="tag_conflicts")
def _ties_leaf(
    b: jax.Array,
    ts: tuple[jax.Array, ...],
    thresholds: jax.Array,
    majority: jax.Array,
    lam: jax.Array,
    *,
    tag_conflicts: bool,
) -> tuple[jax.Array, jax.Array]:
    trimmed = [
        jnp.where(_magnitude_bits(t) >= thresholds[i], f32(t), 0.0) for i, t in enumerate(ts)
    ]
    elected = jnp.sign(_fold_sum(trimmed))
    # A zero elected sign takes the majority sign; with that sign still 0 (or -1) the
    # negative entries are averaged: the reference's where(sign > 0, x > 0, x < 0).
    positive = jnp.where(elected == 0, majority, elected) > 0
    chosen = [jnp.where(positive, x > 0, x < 0) for x in trimmed]
    total = _fold_sum([jnp.where(c, x, 0.0) for c, x in zip(chosen, trimmed, strict=True)])
    count = _fold_sum([c.astype(jnp.float32) for c in chosen])
    # Poison term: a NaN or Inf entry has the largest magnitude pattern, so it is kept
    # (or a NaN of the same task is), and the elected sign is NaN, or the Inf is chosen:
    # 0 * elected (one op, not the 2T of sum_i 0 * tau_i) brings any of them to the output.
    delta = lam * (total / jnp.maximum(count, 1.0)) + elected * 0.0
    if tag_conflicts:
        # Provisional majority +1: an element whose kept entries sum to exactly 0 but are
        # not all 0 depends on the true majority; NaN marks it (the finite check flags the
        # leaf, which is then merged again with the true majority).
        delta = jnp.where((elected == 0) & (count > 0), jnp.nan, delta)
    return _out(b, delta)


def ties(
    base: PyTree, task_vectors: Sequence[PyTree], *, k: float = 0.2, lam: float = 0.55
) -> PyTree:
    """TIES-merging (Yadav et al. 2023) exactly as MagMax's reference code runs it
    (``ties.py``: ``topk_values_mask``, ``resolve_sign`` with ``"mass"``,
    ``disjoint_merge`` with ``"dis-mean"``), then ``theta0 + lam * merged``.

    * Trim: task vector i keeps ``|x| >= v_i``, ``v_i`` the ``ties_rank(size, k)``-th
      largest magnitude of the *whole flattened* tau_i (all leaves), found exactly (by
      ``ties_thresholds_sampled``, or ``ties_thresholds`` under an outer ``jit``); every
      entry tied with ``v_i`` is kept. ``k`` is the fraction kept, a Python real number
      in [0, 1) (see ``ties_rank``: k = 0 keeps the largest magnitude, and its ties).
    * Elect: the sign of the sum of the trimmed vectors per element; where that is 0 the
      majority sign (``ties_majority``: the sign of the sum of all elected signs).
    * Disjoint mean: per element the mean of the trimmed entries with the elected sign
      (strictly positive if it is +1, strictly negative otherwise, so a sign still 0
      averages the negative ones, as the reference does); the count is clamped to 1, so
      an element with no such entry merges to 0.

    Sums are float32 left-to-right folds, whatever the leaf dtype (the reference sums in
    the tensors' dtype: identical for float32). The majority costs nothing unless some
    element's kept entries cancel exactly: the merge first runs with majority +1 and only
    the leaves holding such an element are merged again with the true majority (under an
    outer ``jit`` the majority is always computed first). See docs/methods.md section 5.
    """
    tvs = _prepare(base, task_vectors, "ties")
    check_scalar("ties", "k", k)
    if not _concrete(k):
        raise ConfigError("ties: k must be a concrete number in [0, 1), not a traced value")
    _check_range("ties", "k", k, 0.0, 1.0, hi_open=True)
    size = tree_size(base)
    if size >= 2**31:
        raise ValueError(f"ties: task vectors of {size} elements exceed the int32 counters (2^31)")
    rank = ties_rank(size, k)  # <= size: for k < 1 the product int(size * k) < size
    lam = _scalar(lam, "ties")
    if under_trace():  # inputs or not, values cannot be read on the host here
        thresholds = ties_thresholds(tvs, np.full((len(tvs),), rank, np.int32))
        majority = ties_majority(tvs, thresholds)
        leaf = functools.partial(_ties_leaf, tag_conflicts=False)
        return _leafwise("ties", leaf, base, tvs, thresholds, majority, lam)

    thresholds = jnp.asarray(ties_thresholds_sampled(tvs, rank))
    leaves, treedef = jax.tree.flatten(base)
    columns = list(zip(*[jax.tree.leaves(tv) for tv in tvs], strict=True))
    plus = jnp.ones((), jnp.float32)
    outs, finite = map(
        list,
        zip(
            *[
                _ties_leaf(b, ts, thresholds, plus, lam, tag_conflicts=True)
                for b, ts in zip(leaves, columns, strict=True)
            ],
            strict=True,
        ),
    )
    ok = np.asarray(jnp.stack(finite), bool)
    if not ok.all():  # exact-cancellation elements (or non-finite values): true majority
        majority = ties_majority(tvs, thresholds)
        for j in np.flatnonzero(~ok):
            outs[j], finite[j] = _ties_leaf(
                leaves[j], columns[j], thresholds, majority, lam, tag_conflicts=False
            )
    return _finish("ties", jax.tree.unflatten(treedef, outs), finite, base, tvs)


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
    p: float,
    key: jax.Array,
    lam: float = 1.0,
) -> PyTree:
    """DARE (Yu et al. 2024): drop each task-vector entry with probability ``p``, rescale
    the kept ones by 1/(1-p), then task arithmetic: ``theta0 + lam * sum_i tau_i'``.

    Element (i, leaf j, flat index n) is kept iff ``element_bits(seeds[i, j])[n] >> 8 >=
    round(p * 2^24)`` with ``seeds = dare_seeds(key, T, L)``; ``p`` is thus rounded to a
    multiple of 2^-24 and the rescale uses that rounded value, keeping the merge unbiased.
    ``key`` is a typed key (``jax.random.key(seed)``); ``0 <= p < 1``; ``p`` and ``lam``
    are Python real numbers.
    """
    tvs = _prepare(base, task_vectors, "dare")
    check_scalar("dare", "p", p)
    _check_range("dare", "p", p, 0.0, 1.0, hi_open=True)
    if np.round(np.float32(p) * np.float32(2**24)) >= 2**24:  # dare_threshold, on the host
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
    base: PyTree, task_vectors: Sequence[PyTree], *, key: jax.Array, lam: float = 1.0
) -> PyTree:
    """RandMix: per element a uniformly random task vector's entry, ``theta0 + lam * that``.

    Element n of leaf j takes ``tau_i`` with ``i = randmix_index(element_bits(s[j]), T)[n]``
    and ``s = randmix_seeds(key, L)``. ``key`` is a typed key; ``lam`` a Python real number.
    """
    tvs = _prepare(base, task_vectors, "randmix")
    if len(tvs) >= 2**16:
        raise ValueError(f"randmix: supports fewer than 65536 task vectors, got {len(tvs)}")
    seeds = randmix_seeds(key, len(jax.tree.leaves(base)))
    args = (seeds, _scalar(lam, "randmix"))
    return _leafwise("randmix", _randmix_leaf, base, tvs, *args, indexed=True)
