"""Task-vector tree arithmetic against NumPy, and every validation error path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import tree_util
from trm_jax.errors import TRMError
from trm_jax.merging import task_vectors as tv


def _tree(rng, scale=1.0):
    return {
        "blocks": [
            {
                "kernel": jnp.asarray(scale * rng.normal(size=(6, 5)), jnp.float32),
                "bias": jnp.asarray(scale * rng.normal(size=(5,)), jnp.float32),
            },
            {"kernel": jnp.asarray(scale * rng.normal(size=(5, 4)), jnp.float32)},
        ],
        "head": {"w": jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32)},
        "temp": jnp.asarray(scale * rng.normal(), jnp.float32),
    }


NAMES = ["blocks/0/bias", "blocks/0/kernel", "blocks/1/kernel", "head/w", "temp"]


def _np_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_leaf_names_and_size():
    tree = _tree(np.random.default_rng(0))
    assert tv.leaf_names(tree) == NAMES
    assert tree_util.tree_size(tree) == 5 + 30 + 20 + 12 + 1


def test_task_vector_and_apply_match_numpy():
    rng = np.random.default_rng(1)
    base, ft = _tree(rng), _tree(rng)
    tau = tv.task_vector(ft, base)
    for got, f, b in zip(_np_leaves(tau), _np_leaves(ft), _np_leaves(base), strict=True):
        np.testing.assert_allclose(got, f - b, rtol=1e-6, atol=1e-6)
    for lam in (0.0, 0.3, 1.0):
        out = tv.apply(base, tau, lam)
        for got, b, t in zip(_np_leaves(out), _np_leaves(base), _np_leaves(tau), strict=True):
            np.testing.assert_allclose(got, b + lam * t, rtol=1e-6, atol=1e-6)
    # lam = 1 recovers the fine-tuned model; lam = 0 the base, exactly.
    np.testing.assert_array_equal(
        jax.tree.leaves(tv.apply(base, tau, 0.0))[1], base["blocks"][0]["kernel"]
    )


def test_apply_keeps_dtype():
    base = {"w": jnp.ones((3,), jnp.bfloat16)}
    out = tv.apply(base, {"w": jnp.full((3,), 0.5, jnp.float32)}, 2.0)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [2.0, 2.0, 2.0])


def test_maxmag_matches_numpy_and_running_fold():
    rng = np.random.default_rng(2)
    trees = [_tree(rng) for _ in range(4)]
    got = tv.maxmag(*trees)
    for j, g in enumerate(jax.tree.leaves(got)):
        stack = np.stack([np.asarray(jax.tree.leaves(t)[j]) for t in trees])
        pick = len(trees) - 1 - np.argmax(np.abs(stack[::-1]), axis=0)  # ties: the latest
        np.testing.assert_array_equal(np.asarray(g), np.take_along_axis(stack, pick[None], 0)[0])
    fold = trees[0]
    for t in trees[1:]:
        fold = jax.tree.map(tv.maxmag2, fold, t)
    jax.tree.map(np.testing.assert_array_equal, got, fold)


def test_maxmag_ties_go_to_the_later_tree():
    """MagMax's merge_max_abs: where(|cur| >= |best|, cur, best), tasks in order."""
    a = {"x": jnp.array([1.0, -2.0, 0.0, -0.0, 3.0])}
    b = {"x": jnp.array([-1.0, 2.0, -0.5, 0.0, -1.0])}
    c = {"x": jnp.array([1.0, 2.0, 0.5, -0.0, 3.0])}
    np.testing.assert_array_equal(tv.maxmag(a, b)["x"], [-1.0, 2.0, -0.5, 0.0, 3.0])
    np.testing.assert_array_equal(tv.maxmag(b, a)["x"], [1.0, -2.0, -0.5, -0.0, 3.0])
    np.testing.assert_array_equal(tv.maxmag(a, b, c)["x"], [1.0, 2.0, 0.5, -0.0, 3.0])
    np.testing.assert_array_equal(tv.maxmag2(a["x"], b["x"]), tv.maxmag(a, b)["x"])
    # The sign of a zero comes from the later tree too (bitwise: -0.0 vs 0.0).
    assert np.signbit(np.asarray(tv.maxmag(a, b, c)["x"])[3])
    assert not np.signbit(np.asarray(tv.maxmag(a, b)["x"])[3])
    with pytest.raises(ValueError, match="at least one"):
        tv.maxmag()


def test_name_mask_and_masked():
    rng = np.random.default_rng(3)
    merged, fallback = _tree(rng), _tree(rng)
    mask = tv.name_mask(merged, include=r"^blocks/", exclude=[r"bias$"])
    assert jax.tree.leaves(mask) == [False, True, True, False, False]
    out = tv.masked(merged, fallback, mask)
    for keep, o, m, f in zip(
        jax.tree.leaves(mask),
        jax.tree.leaves(out),
        jax.tree.leaves(merged),
        jax.tree.leaves(fallback),
        strict=True,
    ):
        np.testing.assert_array_equal(o, m if keep else f)
    assert all(jax.tree.leaves(tv.name_mask(merged)))
    assert jax.tree.leaves(tv.name_mask(merged, exclude="head")) == [True, True, True, False, True]


def test_check_like_structure_error_names_leaf():
    rng = np.random.default_rng(4)
    base, other = _tree(rng), _tree(rng)
    del other["head"]
    other["extra"] = jnp.zeros(2)
    with pytest.raises(tv.TreeMismatchError, match=r"missing \['head/w'\], extra \['extra'\]") as e:
        tv.task_vector(other, base)
    assert isinstance(e.value, ValueError) and isinstance(e.value, TRMError)


def test_check_like_shape_error_names_leaf():
    rng = np.random.default_rng(5)
    base, other = _tree(rng), _tree(rng)
    other["blocks"][1]["kernel"] = jnp.zeros((4, 5))
    with pytest.raises(
        ValueError, match=r"leaf 'blocks/1/kernel' has shape \(4, 5\), base has \(5, 4\)"
    ):
        tv.check_like(base, other, names=["finetuned"])
    with pytest.raises(ValueError, match="task vector leaf 'blocks/1/kernel'"):
        tv.apply(base, other)


def test_check_finite_names_every_bad_leaf():
    rng = np.random.default_rng(6)
    tree = _tree(rng)
    tv.check_finite(tree)  # finite: no error
    tree["head"]["w"] = tree["head"]["w"].at[1, 2].set(jnp.inf)
    tree["temp"] = jnp.asarray(jnp.nan)
    with pytest.raises(
        tv.NonFiniteError, match=r"ckpt has non-finite values in leaves \['head/w', 'temp'\]"
    ):
        tv.check_finite(tree, "ckpt")
    np.testing.assert_array_equal(tv.finite_leaves(tree), [True, True, True, False, False])


def test_check_finite_is_a_no_op_under_jit():
    tree = {"w": jnp.array([1.0, jnp.nan])}

    @jax.jit
    def f(t):
        tv.check_finite(t)
        return t["w"] * 2

    assert np.isnan(f(tree)[1])
