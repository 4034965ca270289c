"""MagMax's published merge semantics, ties included, against NumPy references written here.

The references follow the MagMax repository's merging code (danielm1405/magmax:
``src/merging/task_vectors.py::merge_max_abs`` and ``src/merging/ties.py`` as driven by
``merge_splitted.py``: ``topk`` with ``reset_thresh=20``, ``resolve="mass"``,
``merge="dis-mean"``), restated from its semantics in float32 NumPy with the same order of
operations as the rules, so every comparison is exact (``assert_array_equal``), not a
tolerance. Task vectors are integer-valued or take a few distinct values, so exact ties of
magnitudes (MagMax) and of the trim threshold (TIES) are the common case, not a corner.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import merging
from trm_jax.merging import rules, running
from trm_jax.merging import task_vectors as tv

# Several leaves of different ranks (and a scalar), 111 elements in all.
SHAPES = {"a": (7, 5), "b": [(11,), (3, 4, 2)], "c": (), "d": (40,)}
SIZE = 111
# The case: 6,320 elements over two leaves.
SHAPES_6320 = {"kernel": (79, 40), "bias": (3160,)}
DTYPES = [jnp.float32, jnp.bfloat16]


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _tree(rng, dtype, shapes=SHAPES, values=(-3, -2, -1, 0, 1, 2, 3)):
    """A tree whose entries are drawn from ``values`` (exact in bfloat16)."""
    values = np.asarray(values, np.float32)
    leaf = lambda s: jnp.asarray(rng.choice(values, size=s), dtype)
    return jax.tree.map(leaf, shapes, is_leaf=_is_shape)


def _setup(seed, num_tasks, dtype, shapes=SHAPES, values=(-3, -2, -1, 0, 1, 2, 3)):
    rng = np.random.default_rng(seed)
    base = _tree(rng, dtype, shapes, values=(-1.5, -0.5, 0.25, 1.0))
    return base, [_tree(rng, dtype, shapes, values) for _ in range(num_tasks)]


def _np(tree):
    """Leaves as float32 NumPy arrays (bfloat16 values are exact in float32)."""
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


def _assert_equal(got, base, want):
    """``got`` has ``base``'s dtypes and equals ``want`` (float32 leaves) bit for bit
    once ``want`` is rounded to those dtypes."""
    for name, g, b, w in zip(
        merging.leaf_names(got), jax.tree.leaves(got), jax.tree.leaves(base), want, strict=True
    ):
        assert g.dtype == b.dtype, name
        expected = np.asarray(w.astype(np.asarray(b).dtype), np.float32)
        np.testing.assert_array_equal(np.asarray(g, np.float32), expected, err_msg=name)


# ----------------------------------------------------------------------- references


def ref_magmax(base, tvs, lam):
    """merge_max_abs: tasks in order, where(|cur| >= |best|, cur, best); then
    theta0 + lam * merged (apply_to with scaling_coef=lam)."""
    out = []
    for j, b in enumerate(_np(base)):
        best = _np(tvs[0])[j]
        for t in tvs[1:]:
            cur = _np(t)[j]
            best = np.where(np.abs(cur) >= np.abs(best), cur, best)
        out.append(b + np.float32(lam) * best)
    return out


def ref_ties_flat(flat, k):
    """MagMax's TIES on the stacked flattened task vectors ``flat`` [T, d] (float32):
    the merged task vector [d] before scaling."""
    num_tasks, d = flat.shape
    # topk_values_mask: k = d - int(d * K); keep |x| >= the k-th smallest |x| per row.
    kth = d - int(d * k)
    thresholds = np.sort(np.abs(flat), axis=1)[:, kth - 1]
    kept = np.where(np.abs(flat) >= thresholds[:, None], flat, np.float32(0))
    # resolve_sign("mass"): sign of the summed trimmed vectors, a left-to-right sum.
    mass = kept[0].copy()
    for row in kept[1:]:
        mass = mass + row
    sign = np.sign(mass)
    # resolve_zero_signs("majority"): zeros take the sign of the sum of all signs.
    sign[sign == 0] = np.sign(sign.sum())
    # disjoint_merge("dis-mean"): the selected entries' mean, counts clamped to 1.
    chosen = np.where(sign[None] > 0, kept > 0, kept < 0)
    selected = np.where(chosen, kept, np.float32(0))
    total = selected[0].copy()
    for row in selected[1:]:
        total = total + row
    count = (selected != 0).sum(0).astype(np.float32)
    return total / np.maximum(count, np.float32(1))


def ref_ties(base, tvs, k, lam):
    leaves_b = _np(base)
    flat = np.stack([np.concatenate([x.ravel() for x in _np(t)]) for t in tvs])
    merged = ref_ties_flat(flat, k)
    pieces = np.split(merged, np.cumsum([b.size for b in leaves_b])[:-1])
    return [b + np.float32(lam) * m.reshape(b.shape) for b, m in zip(leaves_b, pieces, strict=True)]


# ---------------------------------------------------------------------------- magmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magmax_equals_reference_under_ties(seed, dtype):
    base, tvs = _setup(seed, 4, dtype)
    _assert_equal(merging.magmax(base, tvs, lam=0.5), base, ref_magmax(base, tvs, 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_magmax_6320_elements_exact(dtype):
    base, tvs = _setup(3, 5, dtype, SHAPES_6320, values=(-2, -1, 0, 1, 2))
    _assert_equal(merging.magmax(base, tvs, lam=0.5), base, ref_magmax(base, tvs, 0.5))


def test_magmax_exact_tie_goes_to_the_later_task():
    base = {"w": jnp.zeros((4,))}
    tvs = [{"w": jnp.array(v, jnp.float32)} for v in ([2, -1, 3, 0], [-2, 1, 1, 0], [1, -1, -3, 0])]
    out = merging.magmax(base, tvs, lam=1.0)["w"]
    np.testing.assert_array_equal(out, [-2.0, -1.0, -3.0, 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_magmax_equals_batch_and_the_pair_fold_under_ties(dtype):
    base, tvs = _setup(4, 5, dtype)
    state = running.init("magmax", base)
    for t in tvs:
        state = running.update(state, t)
    batch = merging.magmax(base, tvs, lam=0.5)
    jax.tree.map(np.testing.assert_array_equal, running.result(base, state, lam=0.5), batch)
    # TRM's consensus is maxmag2(history, current): the same fold, pair by pair.
    fold = tvs[0]
    for t in tvs[1:]:
        fold = jax.tree.map(tv.maxmag2, fold, t)
    jax.tree.map(np.testing.assert_array_equal, tv.maxmag(*tvs), fold)
    jax.tree.map(
        lambda s, f: np.testing.assert_array_equal(s, np.asarray(f, np.float32)), state.best, fold
    )


# ------------------------------------------------------------------------------ ties


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "k", [0.0, 0.05, 0.2, 0.25, 0.5, 0.9, 1 - 1 / (2 * SIZE)], ids=lambda k: f"k{k:.3f}"
)
@pytest.mark.parametrize("num_tasks", [1, 3, 4])
def test_ties_equals_reference_under_ties(num_tasks, k, dtype):
    base, tvs = _setup(10 + num_tasks, num_tasks, dtype)
    got = merging.ties(base, tvs, k=k, lam=0.55)
    _assert_equal(got, base, ref_ties(base, tvs, k, 0.55))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_6320_elements_exact(dtype):
    base, tvs = _setup(5, 4, dtype, SHAPES_6320, values=(-2, -1, 0, 1, 2))
    for k in (0.2, 0.5):
        _assert_equal(merging.ties(base, tvs, k=k, lam=0.55), base, ref_ties(base, tvs, k, 0.55))


def test_ties_threshold_rank_is_magmax_kthvalue():
    """The kept set is |x| >= the (d - int(d k))-th smallest magnitude: int(d k) + 1 from
    the top, every tie of it included; k = 0 keeps the largest magnitude and its ties."""
    assert rules.ties_rank(10, 0.2) == 3 and rules.ties_rank(10, 0.0) == 1
    assert rules.ties_rank(111, 1 - 1 / 222) == 111
    w = jnp.array([5.0, -5.0, 4.0, 3.0, 3.0, -3.0, 2.0, 1.0, 0.0, 0.0])
    base = {"w": jnp.zeros((10,))}
    for k, kept in [(0.0, 2), (0.1, 2), (0.2, 3), (0.3, 6), (0.5, 6), (0.8, 8), (0.9, 10)]:
        out = np.asarray(merging.ties(base, [{"w": w}], k=k, lam=1.0)["w"])
        want = np.where(
            np.abs(np.asarray(w)) >= np.sort(np.abs(np.asarray(w)))[9 - int(10 * k)], w, 0
        )
        np.testing.assert_array_equal(out, want, err_msg=str(k))
        assert (out != 0).sum() == min(kept, 8), k  # the two zeros stay zero


@pytest.mark.parametrize(
    "t1,t2,want",
    [
        # Elected signs (0, 0, +1): majority +1, the zeros average the positive entries.
        ([2, -1, 1], [-2, 1, 1], [2, 1, 1]),
        # Elected signs (0, 0, -1): majority -1, the negative entries.
        ([2, -1, -1], [-2, 1, -1], [-2, -1, -1]),
        # Elected signs (0, 0, +1, -1): majority sign(0) = 0, which stays 0, and the
        # reference's where(sign > 0, x > 0, x < 0) then averages the negative entries.
        ([2, -1, 1, -1], [-2, 1, 1, -1], [-2, -1, 1, -1]),
    ],
    ids=["majority+1", "majority-1", "majority0"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_zero_elected_sign_takes_the_majority(t1, t2, want, dtype):
    n = len(t1)
    base = {"w": jnp.zeros((n,), dtype)}
    tvs = [{"w": jnp.array(t, dtype)} for t in (t1, t2)]
    k = 0.9  # int(n * 0.9) = n - 1: every entry kept
    got = merging.ties(base, tvs, k=k, lam=1.0)["w"]
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    # Inside jit the majority is computed first instead of on demand: same result.
    jitted = jax.jit(lambda b, t: merging.ties(b, t, k=k, lam=1.0))(base, tvs)["w"]
    np.testing.assert_array_equal(np.asarray(jitted, np.float32), want)
    flat = np.stack([np.asarray(t, np.float32) for t in (t1, t2)])
    np.testing.assert_array_equal(ref_ties_flat(flat, k), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_cancelling_entries_across_leaves_use_the_global_majority(dtype):
    """Entries cancel in one leaf; the majority comes from the other leaves' votes."""
    base, tvs = _setup(20, 3, dtype)
    tvs[1]["a"] = -tvs[0]["a"]  # leaf 'a' of tasks 0 and 1 cancel wherever both are kept
    for k in (0.3, 0.9):
        _assert_equal(merging.ties(base, tvs, k=k, lam=1.0), base, ref_ties(base, tvs, k, 1.0))
        traced = jax.jit(lambda b, t, k=k: merging.ties(b, t, k=k, lam=1.0))(base, tvs)
        jax.tree.map(np.testing.assert_array_equal, traced, merging.ties(base, tvs, k=k, lam=1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_all_zero_task_vectors(dtype):
    base, tvs = _setup(21, 3, dtype)
    zeros = jax.tree.map(jnp.zeros_like, tvs[0])
    # One all-zero task vector: its threshold is 0, it keeps only zeros and votes nothing.
    mixed = [tvs[0], zeros, tvs[2]]
    _assert_equal(merging.ties(base, mixed, k=0.2, lam=1.0), base, ref_ties(base, mixed, 0.2, 1.0))
    # Only zeros: the base, exactly.
    got = merging.ties(base, [zeros, zeros], k=0.2, lam=1.0)
    jax.tree.map(np.testing.assert_array_equal, got, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_threshold_shared_by_every_entry(dtype):
    """All magnitudes equal: the threshold is that magnitude, so any k keeps everything."""
    rng = np.random.default_rng(22)
    base = _tree(rng, dtype)
    tvs = [_tree(rng, dtype, values=(-1, 1)) for _ in range(3)]
    for k in (0.0, 0.2, 0.7):
        want = ref_ties(base, tvs, k, 0.55)
        _assert_equal(merging.ties(base, tvs, k=k, lam=0.55), base, want)
        _assert_equal(merging.ties(base, tvs, k=0.9, lam=0.55), base, want)


# ----------------------------------------------------------------- hparam validation

# 0-d arrays are accepted (the rules stay jit-able); arrays of several values are not.
BAD = ["0.5", jnp.asarray([0.5, 0.5]), np.asarray([0.5]), True, np.bool_(False), None, 1 + 0j]
KEY = jax.random.key(0)
RULE_CALLS = {  # (rule, scalar hparam) -> call with that hparam replaced
    ("task_arithmetic", "lam"): lambda b, t, v: merging.task_arithmetic(b, t, lam=v),
    ("magmax", "lam"): lambda b, t, v: merging.magmax(b, t, lam=v),
    ("ties", "lam"): lambda b, t, v: merging.ties(b, t, k=0.2, lam=v),
    ("ties", "k"): lambda b, t, v: merging.ties(b, t, k=v, lam=0.55),
    ("dare", "lam"): lambda b, t, v: merging.dare(b, t, p=0.5, key=KEY, lam=v),
    ("dare", "p"): lambda b, t, v: merging.dare(b, t, p=v, key=KEY),
    ("randmix", "lam"): lambda b, t, v: merging.randmix(b, t, key=KEY, lam=v),
}


@pytest.mark.parametrize("bad", BAD, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("rule,name", sorted(RULE_CALLS))
def test_scalar_hparams_must_be_real_numbers(rule, name, bad):
    base, tvs = _setup(30, 2, jnp.float32)
    with pytest.raises(TypeError, match=rf"^{rule}: {name} must be (a|one) real number"):
        RULE_CALLS[rule, name](base, tvs, bad)


@pytest.mark.parametrize("rule,name", sorted(RULE_CALLS))
def test_scalar_hparams_accept_ints_and_numpy_reals(rule, name):
    base, tvs = _setup(31, 2, jnp.float32)
    value = {"k": 0.2, "p": 0.5}.get(name, 1)
    want = RULE_CALLS[rule, name](base, tvs, value)
    for same in (np.float64(value), np.float32(value)) if name != "lam" else (1.0, np.int32(1)):
        jax.tree.map(np.testing.assert_array_equal, RULE_CALLS[rule, name](base, tvs, same), want)


@pytest.mark.parametrize("rule", ["task_arithmetic", "magmax"])
@pytest.mark.parametrize("bad", BAD, ids=lambda v: type(v).__name__)
def test_running_result_lam_must_be_a_real_number(rule, bad):
    base, tvs = _setup(32, 2, jnp.float32)
    state = functools.reduce(running.update, tvs, running.init(rule, base))
    with pytest.raises(
        TypeError, match=rf"running.result \({rule}\): lam must be (a|one) real number"
    ):
        running.result(base, state, lam=bad)
    jax.tree.map(
        np.testing.assert_array_equal,
        running.result(base, state, lam=1),
        merging.get(rule)(base, tvs, lam=1.0),
    )
