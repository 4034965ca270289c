"""Tunable MagMax against a NumPy transcription of the authors' re-assignment loop (fed the
same random priorities), its invariants (exact quotas, one-hot and MagMax-shaped
preferences, one task), the quota and preference helpers and the error paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax.errors import ConfigError
from trm_jax.merging import tunable_magmax as tm
from trm_jax.merging.task_vectors import NonFiniteError, TreeMismatchError

SHAPES = {"a": (7, 5), "b": (9,), "c": ()}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _tree(rng, quantize=False):
    def leaf(s):
        x = rng.normal(size=s)
        if quantize:  # many equal magnitudes: ties between tasks
            x = np.round(x * 2) / 2
        return jnp.asarray(x, jnp.float32)

    return jax.tree.map(leaf, SHAPES, is_leaf=_is_shape)


# ----------------------------------------------------------------- NumPy reference


def np_choose(mask, k, u):
    order = np.argsort(np.where(mask, u, 2.0), kind="stable")
    rank = np.empty(len(mask), np.int64)
    rank[order] = np.arange(len(mask))
    return mask & (rank < k)


def np_assign(x, q, leaf_key):
    """merge_max_abs_masked_with_targetdata's loop for one leaf, random choices replaced by
    'the k masked elements with the smallest priority' (the priorities JAX draws)."""
    t_count, n = x.shape
    u = lambda step: np.asarray(jax.random.uniform(tm.step_key(leaf_key, step), (n,)))
    mags = np.abs(x)
    win = np.argmax(mags, axis=0)
    for i in range(t_count - 1, 0, -1):
        won = win == i
        drop = np_choose(won, max(won.sum() - q[i], 0), u(i))
        win = np.where(drop, np.argmax(mags[:i], axis=0), win)
    won = win == 0
    drop = np_choose(won, max(won.sum() - q[0], 0), u(0))
    need = [q[j] - np.sum(win == j) for j in range(t_count)]
    best = 1 + np.argmax(mags[1:], axis=0) if t_count > 1 else np.zeros(n, int)
    new, taken, got = np.zeros(n, int), np.zeros(n, bool), [0] * t_count
    for j in range(t_count - 1, 0, -1):
        pick = np_choose(drop & (best == j) & ~taken, max(need[j], 0), u(t_count + j))
        new[pick], taken, got[j] = j, taken | pick, pick.sum()
    for j in range(1, t_count):
        pick = np_choose(drop & ~taken, need[j] - got[j], u(2 * t_count + j))
        new[pick], taken = j, taken | pick
    return np.where(drop, new, win)


def np_merge(base, tvs, pref, key, lam):
    w = np.asarray(pref, np.float64) / np.sum(pref)
    out = []
    for j, b in enumerate(jax.tree.leaves(base)):
        b = np.asarray(b, np.float64)
        x = np.stack([np.asarray(jax.tree.leaves(tv)[j], np.float64).reshape(-1) for tv in tvs])
        q = tm.quotas(b.size, w)
        x[q == 0] = 0.0
        win = np_assign(x, q, jax.random.fold_in(key, j))
        assert np.array_equal(np.bincount(win, minlength=len(tvs)), q)
        out.append(b + lam * x[win, np.arange(b.size)].reshape(b.shape))
    return out


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "pref", [[1, 1, 1, 1], [5, 1, 3, 1], [0, 2, 1, 7], [1, 0, 0, 3], [10, 1, 1, 1]]
)
@pytest.mark.parametrize("quantize", [False, True])
def test_matches_reference_and_meets_quotas(pref, quantize):
    rng = np.random.default_rng(sum(pref))
    base, tvs = _tree(rng), [_tree(rng, quantize) for _ in range(4)]
    key = jax.random.key(3)
    got, winners = tm.merge(base, tvs, preference=pref, key=key, lam=0.5, return_winners=True)
    want = np_merge(base, tvs, pref, key, 0.5)
    for g, w in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-6, atol=1e-6)
    w = np.asarray(pref) / np.sum(pref)
    for win in jax.tree.leaves(winners):
        counts = np.asarray(tm.winner_counts(win, 4))
        np.testing.assert_array_equal(counts, tm.quotas(win.size, w))


def test_one_hot_preference_is_that_task_vector():
    rng = np.random.default_rng(0)
    base, tvs = _tree(rng), [_tree(rng) for _ in range(3)]
    got = tm.merge(base, tvs, preference=[0, 1, 0], key=jax.random.key(0), lam=0.5)
    for g, b, t in zip(*(jax.tree.leaves(x) for x in (got, base, tvs[1])), strict=True):
        np.testing.assert_allclose(g, b + 0.5 * t, rtol=1e-6, atol=1e-7)


def test_magmax_shaped_quotas_leave_magmax_unchanged():
    # One leaf whose MagMax winner counts are exactly the quotas: nothing moves.
    x = np.array([[3.0, 0.1, 0.2, 0.0], [0.1, 2.0, 0.3, 0.0], [0.0, 0.1, 4.0, 5.0]], np.float32)
    base = {"a": jnp.zeros((4,), jnp.float32)}
    tvs = [{"a": jnp.asarray(r)} for r in x]
    got = tm.merge(base, tvs, preference=[1, 1, 2], key=jax.random.key(1), lam=1.0)
    np.testing.assert_array_equal(np.asarray(got["a"]), [3.0, 2.0, 4.0, 5.0])


def test_single_task_and_determinism():
    rng = np.random.default_rng(1)
    base, tv = _tree(rng), _tree(rng)
    got = tm.merge(base, [tv], preference=[2.0], key=jax.random.key(0), lam=0.5)
    for g, b, t in zip(*(jax.tree.leaves(x) for x in (got, base, tv)), strict=True):
        np.testing.assert_allclose(g, b + 0.5 * t, rtol=1e-6, atol=1e-7)
    tvs = [_tree(rng) for _ in range(3)]
    run = lambda k: tm.merge(base, tvs, preference=[1, 2, 3], key=jax.random.key(k))
    a, b, c = run(5), run(5), run(6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True)
    assert any(not np.array_equal(x, y) for x, y in pairs)


def test_zero_task_vectors_and_bfloat16():
    rng = np.random.default_rng(2)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(rng))
    zero = jax.tree.map(jnp.zeros_like, base)
    got = tm.merge(base, [zero, zero], preference=[1, 3], key=jax.random.key(0))
    for g, b in zip(jax.tree.leaves(got), jax.tree.leaves(base), strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(b, np.float32))


def test_quotas_and_preferences():
    np.testing.assert_array_equal(tm.quotas(10, [0.5, 0.5]), [5, 5])
    np.testing.assert_array_equal(tm.quotas(10, [1 / 3] * 3), [4, 3, 3])  # remainder to task 0
    np.testing.assert_array_equal(tm.quotas(1, [0.2, 0.8]), [1, 0])  # int() truncation, then 0
    np.testing.assert_array_equal(tm.quotas(7, [0.0, 1.0]), [0, 7])
    for n, w in [(37, [0.1, 0.2, 0.7]), (5, [0.25] * 4), (1000, [0.123, 0.456, 0.421])]:
        assert tm.quotas(n, w).sum() == n
    w = tm.preference_from_labels([0, 1, 1, 5, 9, 9, 9], [[0, 1], [4, 5], [8, 9]])
    np.testing.assert_allclose(w, [3 / 7, 1 / 7, 3 / 7])
    np.testing.assert_allclose(tm.preference_from_scores([2, 0, 2]), [0.5, 0.0, 0.5])
    for bad in ([0, 0], [-1, 2], [], [np.nan, 1]):
        with pytest.raises(ConfigError, match="preference"):
            tm.preference_from_scores(bad)
    with pytest.raises(ConfigError, match="preference"):
        tm.preference_from_labels([3, 3], [[0], [1]])  # no target label in any task


def test_errors():
    rng = np.random.default_rng(3)
    base, tvs = _tree(rng), [_tree(rng) for _ in range(2)]
    key = jax.random.key(0)
    with pytest.raises(ConfigError, match="entries"):
        tm.merge(base, tvs, preference=[1, 1, 1], key=key)
    with pytest.raises(ValueError, match="non-empty"):
        tm.merge(base, [], preference=[1], key=key)
    with pytest.raises(TreeMismatchError):
        tm.merge(base, [tvs[0], {"a": tvs[1]["a"]}], preference=[1, 1], key=key)
    bad = dict(tvs[1], b=tvs[1]["b"].at[0].set(jnp.nan))
    with pytest.raises(NonFiniteError):
        tm.merge(base, [tvs[0], bad], preference=[1, 1], key=key)
    assert tm.default_config().lam == 0.5
